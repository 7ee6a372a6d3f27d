"""The steps of the data flow, as functions of a batch: prefill, draft, verify, refresh, decode.

Each step reads the sequences it is given (``tokens``, ``plen``, ``dlen``, ``gamma``, ``auto``,
``params``, ``key``: see ``scheduler.Sequence``), runs the models through the
:class:`~tandem_rt.engine.model_runner.ModelRunner`, and returns one :class:`Commit` per sequence:
what the scheduler appends and which pool lengths the sequence then has. Steps never change a
sequence; the scheduler applies the commits (stop tokens, length limits, page-table roll-back).

Per sequence, ``n = len(tokens)``; ``plen`` = positions whose primary K/V is in the primary pool,
``dlen`` = positions whose drafting-model K/V is in its pool (the Tandem secondary's,
primary-derived below ``plen``, or the standalone drafter's). Between steps:

* ``verify`` sequences (``primary``, ``speed``, ``tandem-speed``) and ``tandem`` with the free
  token: ``plen = n - 1`` (the last committed token is the next block's first row).
* Tandem modes: every secondary entry below ``plen`` is primary-derived; ``dlen = plen``.
* ``tandem`` without the free token: ``plen = dlen = n``; the secondary's next query runs at
  position ``n - 1`` over primary-derived entries only, without writing (slot -1).
* page tables cover exactly ``max(plen, dlen)`` positions (rolled back after every step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from tandem_rt.engine.paged_model import build_meta, h2d
from tandem_rt.engine.refresh import feature_rows
from tandem_rt.engine.sampler import (RNG_DRAFT, RNG_SAMPLE, RNG_VERIFY, all_greedy, batch_rows, sample_rows,
                                      sample_undrafted)
from tandem_rt.engine.verification import BlockLayout, VerifyInputs
from tandem_rt.models.router import router_features


@dataclass
class Commit:
    """What a step produced for one sequence.

    Attributes:
        tokens: tokens to append (the scheduler stops at a stop token or the length limit).
        plen, dlen: the sequence's primary / drafting pool lengths after the step (before the
            scheduler clips them to the committed tokens).
        drafted: draft tokens the step proposed.
        accepted: drafts the primary accepted (None: the step had no verify block).
        primary_runs, secondary_runs: forward passes the sequence took part in.
    """

    tokens: list
    plen: int
    dlen: int
    drafted: int = 0
    accepted: Optional[int] = None
    primary_runs: int = 0
    secondary_runs: int = 0


# ---------------------------------------------------------------------------------------- prefill
def prefill(runner, seq_id, prompt: list, mode, dense: bool, chunk: int) -> torch.Tensor:
    """Process one prompt alone into the pools of ``mode`` -> next-token logits ``[V]`` of its
    target (modes ``tandem`` and ``secondary``; the prompts of the speculative modes are chunks of
    :func:`speculative_step`).

    The primary runs on it (with the Tandem refresh of its rows into the secondary pool for the
    Tandem modes; the Tandem secondary never runs on a prompt) and the standalone drafter prefills
    its own pool (``speed``); ``secondary`` prefills the secondary alone. ``dense``: the whole
    prompt in one forward with dense causal attention, else chunks of ``chunk`` rows. Sets the
    page manager's primary / secondary lengths."""
    pm = runner.page_manager
    runner.prepare_writes([seq_id], [0], [len(prompt)])
    if mode.target == "secondary":
        logits = _prompt(runner, "secondary", seq_id, prompt, False, dense, chunk)
        pm.set_secondary_len(seq_id, len(prompt))
        return logits
    logits = _prompt(runner, "primary", seq_id, prompt, mode.refresh, dense, chunk)
    pm.set_primary_len(seq_id, len(prompt))
    if mode.refresh:
        pm.set_secondary_len(seq_id, len(prompt))
    if mode.drafter == "drafter":
        _prompt(runner, "drafter", seq_id, prompt, False, dense, chunk)
        pm.set_secondary_len(seq_id, len(prompt))
    return logits


def prefill_pool(runner, pool: str, seq_id, prompt: list, dense: bool, chunk: int) -> None:
    """Process one prompt into ``pool`` alone (the standalone drafter's pool of a ``speed``
    request, whose primary rows ride in the speculative steps); sets its secondary length."""
    runner.prepare_writes([seq_id], [0], [len(prompt)])
    _prompt(runner, pool, seq_id, prompt, False, dense, chunk)
    runner.page_manager.set_secondary_len(seq_id, len(prompt))


def _prompt(runner, pool: str, seq_id, prompt: list, refresh: bool, dense: bool, chunk: int) -> torch.Tensor:
    model, cache = runner.pool(pool)
    pm, dev = runner.page_manager, runner.device
    if dense:
        meta = build_meta(pm, [seq_id], [0], [len(prompt)], [0], dev, dense=True)
        return runner.prompt_forward(model, cache, h2d(prompt, torch.int64, dev), meta, refresh)[0]
    for start in range(0, len(prompt), chunk):
        end = min(len(prompt), start + chunk)
        meta = build_meta(pm, [seq_id], [start], [end], [start], dev)
        logits = runner.prompt_forward(model, cache, h2d(prompt[start:end], torch.int64, dev), meta, refresh)
    return logits[0]


def first_tokens(logits: torch.Tensor, seqs: Sequence) -> list:
    """The first generated token of each of ``seqs`` (samples of one prompt) from the prompt's
    next-token ``logits [V]`` -> list of ints."""
    rows = logits.unsqueeze(0).expand(len(seqs), -1).contiguous()
    return sample_rows(rows, seqs, [s.n for s in seqs], RNG_SAMPLE)[0].tolist()


# ---------------------------------------------------------------------------------------- decode
def decode_step(runner, seqs: Sequence) -> list:
    """One plain decode step of the secondary (mode ``secondary``) -> a :class:`Commit` per sequence."""
    pm, dev = runner.page_manager, runner.device
    model, cache = runner.pool("secondary")
    starts = [s.n - 1 for s in seqs]
    ends = [s.n for s in seqs]
    sids = [s.sid for s in seqs]
    runner.prepare_writes(sids, starts, ends)
    meta = build_meta(pm, sids, starts, ends, starts, dev)
    logits, _ = runner.run(model, cache, h2d([s.tokens[-1] for s in seqs], torch.int64, dev), meta)
    toks = sample_rows(logits, seqs, ends, RNG_SAMPLE)[0].tolist()          # the one host read
    return [Commit([t], plen=s.plen, dlen=s.n, secondary_runs=1) for s, t in zip(seqs, toks)]


# ---------------------------------------------------------------------------------------- draft
def reduced_greedy_drafts(model, seqs: Sequence, want_probs: bool, router, device) -> bool:
    """Whether :func:`draft` takes its greedy drafts from the reduced vocabulary's logits: a model
    with a reduced draft vocabulary on the CPU, every sequence greedy, no draft probabilities and
    no router decision to make. The argmax over the ``N`` logits of the subset (its ids sorted: the
    same lowest-id tie-break as over the scattered full row) mapped to its token id is the full
    row's argmax, without scattering ``[B, V]`` logits and scanning them."""
    return (model.vocab_subset is not None and not want_probs and torch.device(device).type == "cpu"
            and all_greedy(seqs) and not (router is not None and any(s.auto for s in seqs)))


def draft(runner, pool: str, seqs: Sequence, limits: Sequence[int], block_tables: torch.Tensor,
          want_probs: bool, router=None, router_lag: bool = False):
    """Up to ``limits[b]`` drafting-model decode steps per sequence on ``pool`` (``"secondary"`` or
    ``"drafter"``).

    Returns (drafts int64 ``[B, G]``, probs fp32 ``[B, G, V]`` or None, lens list, dlens list: the
    drafting pool's length per sequence afterwards, runs list: draft steps each sequence took part
    in, a dropped lagged step included). The first step runs positions
    ``[min(dlen, n-1), n)`` (catching up the drafter; a query-only row when the pool already holds
    position ``n - 1``), front-padded with query-only rows to the same row count for every
    sequence, so that the step can replay a CUDA graph. ``router``: ``(router module, top_k,
    threshold, min_accept)`` for the sequences with ``auto``: a sequence stops drafting when the
    predicted acceptance ``α = 1 - tv`` of its last draft falls under the threshold; and a draft
    whose ``p`` (the product of the block's ``α`` so far: the probability that its row brings a
    token) is under ``min_accept`` is dropped and ends the block (``draft_policy.py``; the first
    draft too, so a block may have none). With ``router_lag`` the threshold decision is read one
    step late (the host never waits on the device; the extra step's draft is dropped) and
    ``min_accept`` is not applied. A secondary with the feature input adds, to every row of a
    sequence, the feature-pool entry of its position ``plen - 1`` (``refresh.feature_rows``).
    """
    pm, dev = runner.page_manager, runner.device
    model, cache = runner.pool(pool)
    B = len(seqs)
    features = None   # [B, d_S]: each sequence's input offset (the feature input)
    if pool == "secondary" and runner.feature_pool is not None:
        features = feature_rows(runner.feature_pool, pm, seqs, dev)
    G = max(limits)
    subset = model.vocab_subset
    reduced = reduced_greedy_drafts(model, seqs, want_probs, router, dev)
    drafts = torch.zeros(B, G, dtype=torch.int64, device=dev)
    probs = torch.zeros(B, G, runner.vocab_size, dtype=torch.float32, device=dev) if want_probs else None
    lens = [0] * B
    dlens = [s.dlen for s in seqs]
    runs = [0] * B
    cum = [1.0] * B            # predicted probability that every draft so far is accepted
    act = [b for b in range(B) if limits[b] > 0]
    k = 0
    pending = None   # (rows, device bool [rows]): the router's continue decisions not yet read
    while act:
        sub = [seqs[b] for b in act]
        sids = [s.sid for s in sub]
        full = len(act) == B
        idx = None if full else h2d(act, torch.int64, dev)
        bt = block_tables if full else block_tables.index_select(0, idx)
        if k == 0:
            q_rows = max(s.n - min(s.dlen, s.n - 1) for s in sub)
            starts = [max(0, s.n - q_rows) for s in sub]
            ends = [s.n for s in sub]
            write = [s.dlen for s in sub]
            ids = h2d([t for s, a in zip(sub, starts) for t in s.tokens[a:]], torch.int64, dev)
        else:
            starts = [s.n - 1 + k for s in sub]
            ends = [s.n + k for s in sub]
            write = starts
            ids = drafts[:, k - 1] if full else drafts[:, k - 1].index_select(0, idx)
        meta = build_meta(pm, sids, starts, ends, write, dev, block_tables=bt)
        offset = None
        if features is not None:
            offset = features if full else features.index_select(0, idx)
            if k == 0 and q_rows > 1:
                offset = offset.repeat_interleave(h2d([e - a for a, e in zip(starts, ends)], torch.int64, dev), 0)
        logits, _ = runner.run(model, cache, ids, meta, last_rows_only=True, feature_offset=offset, reduced=reduced)
        tok, pr = sample_rows(logits, sub, [s.n + k for s in sub], RNG_DRAFT, want_probs)
        if reduced:
            tok = subset.index_select(0, tok)
        if full:
            drafts[:, k] = tok
            if pr is not None:
                probs[:, k] = pr
        else:
            drafts[idx, k] = tok
            if pr is not None:
                probs[idx, k] = pr
        for b, en in zip(act, ends):
            runs[b] += 1
            dlens[b] = max(dlens[b], en)      # (this step's K/V row is a kept draft's even if its output is not)
        stopped = set()
        if pending is not None:
            stopped = {b for b, c in zip(pending[0], pending[1].tolist()) if not c}
            pending = None
        kept = [b for b in act if b not in stopped]
        for b in kept:
            lens[b] += 1
        k += 1
        nxt = [b for b in kept if lens[b] < limits[b]]
        if router is not None:
            module, top_k, threshold, min_accept = router
            auto = [b for b in nxt if seqs[b].auto]
            # the cost rule also judges the draft just made (it may drop it: zero drafts is allowed)
            judged = [b for b in kept if seqs[b].auto] if (min_accept > 0 and not router_lag) else auto
            if judged:
                feats = router_features(logits, model.model.model.embed_tokens.weight, top_k)
                alpha = 1.0 - module(feats)                                  # device [len(act)]
                rows = {b: j for j, b in enumerate(act)}
                if router_lag:
                    pending = (auto, (alpha >= threshold)[h2d([rows[b] for b in auto], torch.int64, dev)])
                else:
                    al = alpha.tolist()                                      # the router's stop decision
                    stop = set()
                    for b in judged:
                        a = al[rows[b]]
                        cum[b] *= a          # P(every draft of the block so far is accepted)
                        if cum[b] < min_accept:
                            lens[b] -= 1     # the row would cost more than it is expected to bring
                            stop.add(b)
                        elif a < threshold:
                            stop.add(b)
                    nxt = [b for b in nxt if b not in stop]
        act = nxt
    return drafts, probs, lens, dlens, runs


# ---------------------------------------------------------------------------------------- verify
@dataclass
class PromptChunk:
    """Rows ``[start, end)`` of a prompt riding in a speculative step's primary forward (chunked
    prefill): written to the primary pool (and, with ``refresh``, refreshed into the secondary
    pool); ``final`` chunks return the next-token logits of their last row."""

    seq_id: object
    tokens: list
    start: int
    end: int
    refresh: bool
    final: bool


def speculative_step(runner, seqs: Sequence, router=None, router_lag: bool = False, prompts: Sequence = ()):
    """One speculative iteration of ``verify`` sequences (``primary``, ``speed``, ``tandem-speed``;
    each with its own γ, 0 = plain decode): the drafting models draft, then one primary forward
    holds a block ``[tokens[n-1], drafts...]`` per sequence, verifying every sequence's drafts, and
    the rows of the :class:`PromptChunk` s after them (prompts are prefilled inside the step, so the
    primary's weights are read once for both). The forward refreshes the secondary pool at every
    row when a Tandem sequence or chunk is in it (entries written for other sequences are never
    read: their drafting pool is another, or none).

    Returns (a :class:`Commit` per sequence, the next-token logits ``[V]`` of each final prompt
    chunk, None for the others)."""
    pm, dev = runner.page_manager, runner.device
    B = len(seqs)
    limits = [min(s.gamma, s.params.max_new_tokens - s.generated - 1) for s in seqs]
    uniform = runner.uniform_blocks
    G_max = max(limits, default=0)
    firsts = [min(s.dlen, s.n - 1) for s in seqs]
    # uniform blocks give every sequence slots for G_max drafts (one CUDA graph per bucket; rows
    # past a sequence's drafts are padding, ignored by `verify` and rolled back); ragged blocks
    # only its own (n + limit stays inside the sequence's worst-case page reservation)
    ends = [s.n + (G_max if uniform else g) for s, g in zip(seqs, limits)]
    sids = [s.sid for s in seqs]
    runner.prepare_writes(sids + [c.seq_id for c in prompts], firsts + [c.start for c in prompts],
                          ends + [c.end for c in prompts])
    bt = h2d(pm.block_table(sids + [c.seq_id for c in prompts]), torch.int32, dev)
    greedy = all_greedy(seqs)
    drafts, probs = None, None
    lens = [0] * B
    runs = [0] * B
    dlens = [s.dlen for s in seqs]
    for pool in ("drafter", "secondary"):
        group = [b for b, s in enumerate(seqs) if s.mode.drafter == pool and limits[b] > 0]
        if not group:
            continue
        sub = [seqs[b] for b in group]
        gbt = bt[:B] if len(group) == B else bt.index_select(0, h2d(group, torch.int64, dev))
        d, p, ln, dl, rn = draft(runner, pool, sub, [limits[b] for b in group], gbt, not greedy, router, router_lag)
        for j, b in enumerate(group):
            lens[b], dlens[b], runs[b] = ln[j], dl[j], rn[j]
        if drafts is None:
            drafts = torch.zeros(B, G_max, dtype=torch.int64, device=dev)
            probs = None if greedy else torch.zeros(B, G_max, runner.vocab_size, dtype=torch.float32, device=dev)
        gi = h2d(group, torch.int64, dev)
        drafts[:, :d.shape[1]].index_copy_(0, gi, d)
        if probs is not None:
            probs[:, :d.shape[1]].index_copy_(0, gi, p)
    G = max(lens, default=0)
    starts = [s.n - 1 for s in seqs]
    ends = [s.n + (G if uniform else g) for s, g in zip(seqs, lens)]
    rows = [e - a for a, e in zip(starts, ends)]
    T = sum(rows)
    last = h2d([s.tokens[-1] for s in seqs], torch.int64, dev)
    if G == 0:
        block = last
    elif uniform:
        block = torch.cat([last.unsqueeze(1), drafts[:, :G]], 1).reshape(-1)
    else:
        keep = h2d([b * (G + 1) + t for b in range(B) for t in range(lens[b] + 1)], torch.int64, dev)
        block = torch.cat([last.unsqueeze(1), drafts[:, :G]], 1).reshape(-1).index_select(0, keep)
    ids = block
    logits_rows = None
    finals = []
    if prompts:
        ids = torch.cat([block, h2d([t for c in prompts for t in c.tokens], torch.int64, dev)])
        at, keep_rows = T, list(range(T))
        for c in prompts:
            at += c.end - c.start
            if c.final:
                finals.append(len(keep_rows))
                keep_rows.append(at - 1)
        logits_rows = h2d(keep_rows, torch.int64, dev)
    meta = build_meta(pm, sids + [c.seq_id for c in prompts], starts + [c.start for c in prompts],
                      ends + [c.end for c in prompts], starts + [c.start for c in prompts], dev, block_tables=bt)
    refresh = any(s.mode.refresh for s in seqs) or any(c.refresh for c in prompts)
    hidden_layers = runner.layer_map if refresh else ()
    model, cache = runner.pool("primary")
    accepted, emitted = [], []
    if G == 0:
        logits, _ = runner.run(model, cache, ids, meta, hidden_layers=hidden_layers, refresh=refresh,
                               logits_rows=logits_rows)
        if B:
            toks = sample_undrafted(logits[:B], seqs, [s.n for s in seqs])
            accepted = [0] * B
            emitted = [[t] for t in toks.tolist()]                      # the one host read
    else:
        verify = VerifyInputs(h2d(lens, torch.int32, dev), None if probs is None else probs[:, :G].contiguous(),
                              *batch_rows(seqs, [s.n for s in seqs], RNG_VERIFY, dev),
                              layout=BlockLayout.of(rows) if prompts else None)
        logits, _, acc, em = runner.run(model, cache, ids, meta, hidden_layers=hidden_layers, refresh=refresh,
                                        verify=verify, logits_rows=logits_rows)
        both = torch.cat([acc.view(B, 1).long(), em.long()], 1).tolist()   # the one host read
        accepted = [row[0] for row in both]
        emitted = [row[1:row[0] + 2] for row in both]
    out = []
    for s, a, em_b, g, dl, rn in zip(seqs, accepted, emitted, lens, dlens, runs):
        n = s.n
        out.append(Commit(em_b, plen=n + a, dlen=n + a if s.mode.refresh else min(dl, n + a), drafted=g,
                          accepted=a if s.mode.drafts else None, primary_runs=1, secondary_runs=rn))
    it = iter(finals)
    prompt_logits = [logits[next(it)] if c.final else None for c in prompts]
    return out, prompt_logits


# ---------------------------------------------------------------------------------------- tandem
def tandem_step(runner, seqs: Sequence, router=None, router_lag: bool = False) -> list:
    """One block of the Tandem model as a generator (mode ``tandem``, not lossless): the secondary
    generates up to γ tokens, which are committed; the primary processes them (refreshing the
    secondary pool) and, with the free token, its prediction after the block is committed too."""
    pm, dev = runner.page_manager, runner.device
    free = [s.free_token for s in seqs]
    limits = [min(s.gamma, s.params.max_new_tokens - s.generated - (1 if f else 0)) for s, f in zip(seqs, free)]
    sids = [s.sid for s in seqs]
    runner.prepare_writes(sids, [s.n - 1 for s in seqs], [s.n + g for s, g in zip(seqs, limits)])
    bt = h2d(pm.block_table(sids), torch.int32, dev)
    B = len(seqs)
    lens = [0] * B
    runs = [0] * B
    rows = [[] for _ in range(B)]
    act = [b for b in range(B) if limits[b] > 0]
    if act:
        sub = [seqs[b] for b in act]
        sbt = bt if len(act) == B else bt.index_select(0, h2d(act, torch.int64, dev))
        d, _, ln, _, rn = draft(runner, "secondary", sub, [limits[b] for b in act], sbt, False, router, router_lag)
        for j, (b, row) in enumerate(zip(act, d.tolist())):       # the one host read of the drafts
            lens[b], runs[b] = ln[j], rn[j]
            rows[b] = row[:ln[j]]
    out = [None] * B
    model, cache = runner.pool("primary")
    # the primary processes [tokens[n-1], drafts...] (free token: its last row predicts one more)
    # or, without the free token, the committed drafts [n, n + g) (nothing when the sequence ends)
    todo, starts, ends, ids = [], [], [], []
    for b, s in enumerate(seqs):
        if free[b]:
            todo.append(b)
            starts.append(s.n - 1)
            ends.append(s.n + lens[b])
            ids += [s.tokens[-1]] + rows[b]
        else:
            kept, finished = s.clip(rows[b])
            out[b] = Commit(kept, plen=s.n + len(kept), dlen=s.n + len(kept), drafted=lens[b], secondary_runs=runs[b])
            if not finished and kept:
                todo.append(b)
                starts.append(s.n)
                ends.append(s.n + len(kept))
                ids += kept
    if todo:
        tseqs = [seqs[b] for b in todo]
        tbt = bt if len(todo) == B else bt.index_select(0, h2d(todo, torch.int64, dev))
        meta = build_meta(pm, [s.sid for s in tseqs], starts, ends, starts, dev, block_tables=tbt)
        logits, _ = runner.run(model, cache, h2d(ids, torch.int64, dev), meta, last_rows_only=True,
                               hidden_layers=runner.layer_map, refresh=True)
        fb = [j for j, b in enumerate(todo) if free[b]]
        if fb:
            fseqs = [tseqs[j] for j in fb]
            lg = logits if len(fb) == len(todo) else logits.index_select(0, h2d(fb, torch.int64, dev))
            toks = sample_rows(lg, fseqs, [ends[j] for j in fb], RNG_SAMPLE)[0].tolist()
            for j, t in zip(fb, toks):
                b = todo[j]
                n = seqs[b].n
                out[b] = Commit(rows[b] + [t], plen=n + lens[b], dlen=n + lens[b], drafted=lens[b],
                                primary_runs=1, secondary_runs=runs[b])
        for b in todo:
            if not free[b]:
                out[b].primary_runs = 1
    for b, s in enumerate(seqs):
        if out[b] is None:                # the free-token sequence had no rows to process (cannot happen)
            out[b] = Commit([], plen=s.plen, dlen=s.dlen)
    return out
