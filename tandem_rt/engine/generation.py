"""The generation loop of one ``Engine.generate`` / ``Engine.stream`` call (all modes).

Per sequence the loop keeps ``tokens`` (prompt + committed output, ``n = len(tokens)``),
``plen`` (positions whose primary K/V is in the primary pool) and ``dlen`` (positions whose
drafting-model K/V is in its pool: the Tandem secondary's, primary-derived below ``plen``, or
the standalone drafter's). Invariants between iterations:

* ``primary``, ``speed``, ``tandem-speed``, ``tandem`` with the free token: ``plen = n - 1`` (the
  last committed token has not been processed by the primary yet).
* Tandem modes: every secondary entry below ``plen`` is primary-derived (refreshed after each
  primary pass, overwriting the secondary's own draft entries); ``dlen = plen``.
* ``tandem`` without the free token: ``plen = dlen = n``; the secondary's next query runs at
  position ``n - 1`` over primary-derived entries only, without writing (slot -1).
* page tables cover exactly ``max(plen, dlen)`` positions (rolled back after every block).

One speculative iteration (``speed`` / ``tandem-speed``): draft up to γ tokens with the drafting
model (the first step also catches up positions ``[dlen, n)``), verify ``[tokens[n-1], drafts...]``
on the primary in one block, refresh the secondary pool at every block position (``tandem-speed``),
``verify`` op -> accepted count ``a`` and ``a + 1`` emitted tokens, one host read, roll back.
The prompt is processed by the primary (and refreshed into the secondary pool); the Tandem
secondary never runs on it. The standalone drafter (``speed``) prefills its own pool.
"""
from __future__ import annotations

import collections
import os
import time
from typing import Iterator, Optional

import torch

from tandem_rt import ops
from tandem_rt.engine.paged_model import build_meta, h2d
from tandem_rt.engine.params import SamplingParams
from tandem_rt.engine.results import Result, StreamEvent
from tandem_rt.engine.verification import VerifyInputs
from tandem_rt.models.router import router_features

# purposes of a draw (the low bits of a per-sequence random offset; see Generation._row_rng)
RNG_SAMPLE, RNG_DRAFT, RNG_VERIFY = 0, 1, 2


def sequence_seed(seed: int, sample: int) -> int:
    """The Philox key (int64) of sample ``sample`` (0 .. n-1) of a request seeded ``seed``: a
    bijection of ``seed`` for each sample index, distinct across the samples of one request."""
    x = (seed * 0x9E3779B97F4A7C15 + (sample + 1) * 0xBF58476D1CE4E5B9) & (2 ** 64 - 1)
    return x - 2 ** 64 if x >= 2 ** 63 else x


class _Request:
    """One prompt with its ``n`` samples; ``sid`` holds the processed prompt until all are forked."""

    def __init__(self, index: int, prompt: list, n: int):
        self.index = index
        self.prompt = prompt
        self.n = n
        self.forked = 0
        self.sid = None
        self.logits = None      # [V] next-token logits after the prompt (modes with a prefill prediction)
        self.reserved = 0


class _Seq:
    __slots__ = ("sid", "req", "sample", "tokens", "prompt_len", "plen", "dlen", "finished",
                 "finish_reason", "stats", "reserved", "text_len", "result")

    def __init__(self, sid, req: _Request, sample: int, reserved: int):
        self.sid = sid
        self.req = req
        self.sample = sample
        self.tokens = list(req.prompt)
        self.prompt_len = len(req.prompt)
        self.plen = 0
        self.dlen = 0
        self.finished = False
        self.finish_reason = None
        self.reserved = reserved
        self.text_len = 0
        self.result = None
        self.stats = {"primary_runs": 0, "secondary_runs": 0, "drafted_tokens": 0, "accepted_tokens": 0,
                      "blocks": 0, "accepted_per_block": []}

    @property
    def n(self) -> int:
        return len(self.tokens)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


class Generation:
    """State of one call. Iterate :meth:`events`; pages are freed when it ends, fails or is closed."""

    def __init__(self, engine, prompts: list, params: SamplingParams, mode: str, gamma, free_token: bool):
        self.e = engine
        self.params = params
        self.mode = mode
        self.auto = gamma == "auto"
        router_cfg = engine.model.router.config if self.auto else None
        self.gamma = router_cfg.gamma_max if self.auto else int(gamma)
        self.threshold = router_cfg.threshold if self.auto else None
        # gamma="auto": read the router's stop decision one draft step late (see _draft) on CUDA,
        # where the host read would otherwise stall the queue every step
        self.router_lag = engine.router_lag if engine.router_lag is not None else engine.device.type == "cuda"
        self.free_token = free_token
        self.device = engine.device
        self.pm = engine.page_manager
        self.greedy = params.greedy
        self.stops = set(params.stop_token_ids)
        eos = engine.model.config.primary.eos_token_id
        if eos is not None and not params.ignore_eos:
            self.stops.add(eos)
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        self.pending = collections.deque(_Request(i, p, params.n) for i, p in enumerate(prompts))
        self.prefixes: list[_Request] = []
        self.active: list[_Seq] = []
        self.reserved = 0
        self.t0 = time.perf_counter()
        self._param_cache: dict = {}
        self.uses_prefill_token = mode != "tandem" or free_token
        # the model that drafts (speculative modes, tandem) and its pool
        if mode == "speed":
            self.dmodel, self.dpool = engine.drafter, engine.drafter_cache
        else:
            self.dmodel, self.dpool = engine.secondary, engine.secondary_cache
        self.ps = self.pm.page_size
        self.text_deltas = True             # decode text per event (streaming); generate() turns it off

    # ------------------------------------------------------------------ helpers
    def _pages(self, n_tokens: int) -> int:
        return -(-n_tokens // self.ps)

    def worst_case_pages(self, prompt_len: int) -> int:
        """Pages one sample of a prompt can hold at most (prompt + output + one draft block)."""
        return self._pages(prompt_len + self.params.max_new_tokens + self.gamma + 1)

    def _params(self, B: int):
        t = self._param_cache.get(B)
        if t is None:
            p = self.params
            t = (torch.full((B,), p.temperature, dtype=torch.float32, device=self.device),
                 torch.full((B,), p.top_k, dtype=torch.int32, device=self.device),
                 torch.full((B,), p.top_p, dtype=torch.float32, device=self.device))
            self._param_cache[B] = t
        return t

    def _row_rng(self, seqs, positions, kind: int) -> torch.Tensor:
        """Per-sequence random states int64 ``[B, 2]`` for the sampling ops: ``(sequence seed,
        4 * position + kind)``. A sequence's draws then depend only on its seed (the request's
        seed and its sample index) and on the position and purpose of the draw, never on the other
        sequences of the batch, so a seeded request reproduces its tokens whatever shares its batch
        and whatever ``max_batch_size`` is. ``kind``: RNG_SAMPLE (a token of the sequence),
        RNG_DRAFT (a draft token), RNG_VERIFY (the verify block whose first draft sits at
        ``position``): disjoint offsets, so a draft and the test that accepts it never share a
        uniform."""
        return h2d([[sequence_seed(self.seed, s.sample), 4 * p + kind] for s, p in zip(seqs, positions)],
                   torch.int64, self.device)

    def _sample(self, logits: torch.Tensor, seqs, positions, kind: int = 0, want_probs: bool = False):
        """``logits [B, V]`` of ``seqs`` (one row each) for the tokens at ``positions`` ->
        (tokens int64 ``[B]``, probabilities fp32 ``[B, V]`` or None)."""
        if self.greedy and not logits.is_cpu:
            return logits.argmax(-1), None
        # greedy on the CPU too: the op's argmax (lowest index on ties, as the verify op and
        # torch.argmax) costs 10 us for an 8192-word bf16 row where torch.argmax costs 33 us
        B, V = logits.shape
        probs = torch.empty(B, V, dtype=torch.float32, device=logits.device) if want_probs else None
        temp, top_k, top_p = self._params(B)
        rng = self._rng_greedy(B) if self.greedy else self._row_rng(seqs, positions, kind)
        # the raw op (the C++ op validates every argument; the wrapper's checks cost ~0.1 ms per call on CPU)
        tok = torch.ops.tandem_rt.sample(logits, temp, top_k, top_p, rng, probs)
        return tok.long(), probs

    def _sample_undrafted(self, logits: torch.Tensor, seqs) -> torch.Tensor:
        """The token after a verify block with no drafts (``logits [B, V]``, one row per sequence)
        -> int64 ``[B]``: drawn by the verify op with zero drafts, i.e. with the uniform a block of
        zero drafts uses inside a batch whose other sequences do draft, so a seeded sequence draws
        the same token whichever of the two steps its last token falls in."""
        if self.greedy:
            return self._sample(logits, seqs, [s.n for s in seqs])[0]
        B, V = logits.shape
        temp, top_k, top_p = self._params(B)
        rng = self._row_rng(seqs, [s.n for s in seqs], RNG_VERIFY)
        none = torch.empty(B, 0, dtype=torch.int64, device=self.device)
        zeros = torch.zeros(B, dtype=torch.int32, device=self.device)
        _, emitted = torch.ops.tandem_rt.verify(none, zeros, None, logits.view(B, 1, V), temp, top_k, top_p, rng)
        return emitted[:, 0]

    def _rng_greedy(self, B: int) -> torch.Tensor:
        """An unused random state for greedy rows (the ops read no random numbers for them)."""
        t = self._param_cache.get(("rng", B))
        if t is None:
            t = self._param_cache[("rng", B)] = torch.zeros(B, 2, dtype=torch.int64, device=self.device)
        return t

    def _prepare(self, seqs, starts, ends) -> None:
        """Make positions writable; run the copy-on-write page copies over every pool."""
        copies = []
        for s, a, b in zip(seqs, starts, ends):
            copies += self.pm.prepare_write(s.sid if isinstance(s, _Seq) else s, a, b)
        if copies:
            src = h2d([c[0] for c in copies], torch.int64, self.device)
            dst = h2d([c[1] for c in copies], torch.int64, self.device)
            ops.copy_pages(self.e.all_cache_tensors(), src, dst)

    def _set_lens(self, s: _Seq) -> None:
        keep = max(s.plen, s.dlen)
        self.pm.truncate(s.sid, keep)
        self.pm.set_primary_len(s.sid, min(s.plen, keep))
        self.pm.set_secondary_len(s.sid, min(s.dlen, keep))

    def _commit(self, s: _Seq, new_tokens: list) -> list:
        """Append tokens up to a stop token / the length limit; returns the tokens appended."""
        out = []
        limit = self.params.max_new_tokens
        for t in new_tokens:
            s.tokens.append(int(t))
            out.append(int(t))
            if t in self.stops:
                s.finished, s.finish_reason = True, "stop"
                break
            if s.generated >= limit:
                s.finished, s.finish_reason = True, "length"
                break
        return out

    def _event(self, s: _Seq, new: list) -> StreamEvent:
        text = ""
        tok = self.e.tokenizer
        if tok is not None and self.text_deltas and (new or s.finished):
            full = tok.decode(s.tokens[s.prompt_len:])
            text, s.text_len = full[s.text_len:], len(full)
        ev = StreamEvent(index=s.req.index * self.params.n + s.sample, prompt_index=s.req.index,
                         sample_index=s.sample, token_ids=new, text=text, finished=s.finished,
                         finish_reason=s.finish_reason)
        if s.finished:
            ev.result = s.result = self._result(s)
        return ev

    def _result(self, s: _Seq) -> Result:
        wall = time.perf_counter() - self.t0
        st = dict(s.stats)
        st["mean_accepted"] = st["accepted_tokens"] / st["blocks"] if st["blocks"] else 0.0
        st["wall_time_s"] = wall
        st["tokens_per_s"] = s.generated / wall if wall > 0 else 0.0
        ids = s.tokens[s.prompt_len:]
        text = self.e.tokenizer.decode(ids) if self.e.tokenizer is not None else ""
        return Result(token_ids=ids, text=text, finish_reason=s.finish_reason, stats=st,
                      prompt_index=s.req.index, sample_index=s.sample)

    # ------------------------------------------------------------------ main loop
    def events(self) -> Iterator[StreamEvent]:
        """Run the call to the end, yielding every sequence's new tokens per iteration."""
        try:
            while self.pending or self.prefixes or self.active:
                yield from self._admit()
                yield from self._retire()
                if self.active:
                    yield from self._step()
                    yield from self._retire()
        finally:
            self.release()

    def release(self) -> None:
        """Free every page this call holds (idempotent)."""
        for s in self.active:
            if self.pm.has_sequence(s.sid):
                self.pm.free(s.sid)
        self.active = []
        for r in self.prefixes:
            if r.sid is not None and self.pm.has_sequence(r.sid):
                self.pm.free(r.sid)
        self.prefixes = []
        self.pending.clear()
        self.reserved = 0

    def _retire(self) -> Iterator[StreamEvent]:
        keep = []
        for s in self.active:
            if s.finished:
                self.pm.free(s.sid)
                self.reserved -= s.reserved
            else:
                keep.append(s)
        self.active = keep
        return iter(())

    # ------------------------------------------------------------------ admission
    def _admit(self) -> Iterator[StreamEvent]:
        budget = self.pm.num_pages
        cap = self.e.max_batch_size
        # prefill new prompts while a sample slot and the pages of its worst case are free
        new = []
        while self.pending and len(self.active) + len(self.prefixes) + len(new) < cap:
            r = self.pending[0]
            need = self._pages(len(r.prompt)) + self.worst_case_pages(len(r.prompt))
            if self.reserved + need > budget:
                break
            self.pending.popleft()
            r.sid = self.e.new_seq_id()
            self.pm.add_sequence(r.sid)
            r.reserved = self._pages(len(r.prompt))
            self.reserved += r.reserved
            new.append(r)
        if new:
            self.prefixes.extend(new)           # (released by release() if the prefill fails)
            self._prefill(new)
        # fork samples from processed prompts
        events = []
        for r in list(self.prefixes):
            w = self.worst_case_pages(len(r.prompt))
            k = 0
            while r.forked + k < r.n and len(self.active) + k < cap and self.reserved + w <= budget:
                self.reserved += w
                k += 1
            if k == 0:
                continue
            children = []
            for _ in range(k):
                if r.forked == r.n - 1:          # the last sample takes over the prompt's sequence
                    sid = r.sid
                else:
                    sid = self.e.new_seq_id()
                    self.pm.fork(r.sid, sid)
                s = _Seq(sid, r, r.forked, w)
                r.forked += 1
                s.plen = self.pm.primary_len(sid)
                s.dlen = self.pm.secondary_len(sid)
                s.stats["primary_runs"] = int(self.mode != "secondary")
                s.stats["secondary_runs"] = int(self.mode in ("secondary", "speed"))
                children.append(s)
                self.active.append(s)
            if self.uses_prefill_token:
                logits = r.logits.unsqueeze(0).expand(k, -1).contiguous()
                toks, _ = self._sample(logits, children, [s.n for s in children], RNG_SAMPLE)
                for s, t in zip(children, toks.tolist()):
                    events.append(self._event(s, self._commit(s, [t])))
            if r.forked == r.n:
                self.reserved -= r.reserved
                self.prefixes.remove(r)
                r.sid = None
                r.logits = None
        return iter(events)

    def _prefill(self, reqs: list) -> None:
        """Process the prompts: the primary (+ tandem refresh), or the standalone model(s)."""
        e = self.e
        sids = [r.sid for r in reqs]
        lens = [len(r.prompt) for r in reqs]
        self._prepare(sids, [0] * len(reqs), lens)
        mode = self.mode
        if mode == "secondary":
            logits = self._chunked(e.secondary, e.secondary_cache, reqs, refresh=False)
            for r in reqs:
                self.pm.set_secondary_len(r.sid, len(r.prompt))
        else:
            logits = self._chunked(e.primary, e.primary_cache, reqs, refresh=mode in ("tandem", "tandem-speed"))
            for r in reqs:
                self.pm.set_primary_len(r.sid, len(r.prompt))
                if mode in ("tandem", "tandem-speed"):
                    self.pm.set_secondary_len(r.sid, len(r.prompt))
            if mode == "speed":
                self._chunked(e.drafter, e.drafter_cache, reqs, refresh=False)
                for r in reqs:
                    self.pm.set_secondary_len(r.sid, len(r.prompt))
        for r, row in zip(reqs, logits):
            r.logits = row

    def _chunked(self, model, cache, reqs, refresh: bool) -> list:
        """Prompt forward -> last-row logits per request: whole prompts with dense attention
        (``engine.dense_prefill``), else chunks of ``engine.prefill_chunk`` rows per sequence."""
        if self.e.dense_prefill:
            return self._dense(model, cache, reqs, refresh)
        C = self.e.prefill_chunk
        out = [None] * len(reqs)
        start = 0
        while True:
            idx = [i for i, r in enumerate(reqs) if len(r.prompt) > start]
            if not idx:
                break
            sub = [reqs[i] for i in idx]
            ends = [min(len(r.prompt), start + C) for r in sub]
            meta = build_meta(self.pm, [r.sid for r in sub], [start] * len(sub), ends, [start] * len(sub),
                              self.device)
            logits = self._prompt_forward(model, cache, meta, [r.prompt[start:e_] for r, e_ in zip(sub, ends)],
                                          refresh)
            for j, i in enumerate(idx):
                if ends[j] == len(reqs[i].prompt):
                    out[i] = logits[j]
            start += C
        return out

    def _dense(self, model, cache, reqs, refresh: bool) -> list:
        """Whole prompts, grouped up to ``engine.max_prefill_tokens`` rows per forward."""
        out, group, rows = [], [], 0

        def flush():
            meta = build_meta(self.pm, [r.sid for r in group], [0] * len(group), [len(r.prompt) for r in group],
                              [0] * len(group), self.device, dense=True)
            out.extend(self._prompt_forward(model, cache, meta, [r.prompt for r in group], refresh))

        for r in reqs:
            if group and rows + len(r.prompt) > self.e.max_prefill_tokens:
                flush()
                group, rows = [], 0
            group.append(r)
            rows += len(r.prompt)
        if group:
            flush()
        return out

    def _prompt_forward(self, model, cache, meta, chunks: list, refresh: bool):
        """One prefill forward over ``chunks`` (token lists, one per sequence of ``meta``) ->
        last-row logits ``[B, V]``; writes the pools and, with ``refresh``, the tandem refresh."""
        ids = h2d([t for c in chunks for t in c], torch.int64, self.device)
        logits, hidden = model.forward(ids, meta, cache.k, cache.v, logits_rows=meta.last_rows,
                                       hidden_layers=self.e.layer_map if refresh else ())
        if refresh:
            self.e.refresh(hidden, meta.positions, meta.slot_mapping, self.e.secondary_cache.k,
                           self.e.secondary_cache.v)
        return logits

    # ------------------------------------------------------------------ iterations
    def _step(self) -> Iterator[StreamEvent]:
        if self.mode in ("primary", "secondary"):
            return self._step_plain()
        if self.mode in ("speed", "tandem-speed"):
            return self._step_speculative()
        return self._step_tandem()

    def _step_plain(self) -> Iterator[StreamEvent]:
        e, seqs = self.e, self.active
        primary = self.mode == "primary"
        model, cache = (e.primary, e.primary_cache) if primary else (e.secondary, e.secondary_cache)
        starts = [s.n - 1 for s in seqs]
        ends = [s.n for s in seqs]
        self._prepare(seqs, starts, ends)
        meta = build_meta(self.pm, [s.sid for s in seqs], starts, ends, starts, self.device)
        ids = h2d([s.tokens[-1] for s in seqs], torch.int64, self.device)
        logits, _ = e.run(model, cache, ids, meta)
        toks, _ = self._sample(logits, seqs, ends, RNG_SAMPLE)
        events = []
        for s, t in zip(seqs, toks.tolist()):          # the one host read of the iteration
            if primary:
                s.plen = s.n
                s.stats["primary_runs"] += 1
            else:
                s.dlen = s.n
                s.stats["secondary_runs"] += 1
            new = self._commit(s, [t])
            if not s.finished:
                self._set_lens(s)
            events.append(self._event(s, new))
        return iter(events)

    def _draft(self, seqs, limits, block_tables, want_probs: bool):
        """Up to ``limits[b]`` drafting-model decode steps per sequence.

        Returns (drafts int64 ``[B, G]``, probs fp32 ``[B, G, V]`` or None, lens list).
        The first step runs positions ``[min(dlen, n-1), n)`` (catching up the drafter; a query-only
        row when the pool already holds position ``n - 1``), front-padded with query-only rows to the
        same row count for every sequence, so that the step can replay a CUDA graph.
        """
        B = len(seqs)
        G = max(limits)
        V = self.e.vocab_size
        drafts = torch.zeros(B, G, dtype=torch.int64, device=self.device)
        probs = torch.zeros(B, G, V, dtype=torch.float32, device=self.device) if want_probs else None
        lens = [0] * B
        act = [b for b in range(B) if limits[b] > 0]
        k = 0
        model, cache = self.dmodel, self.dpool
        pending = None   # (rows, device bool [rows]): the router's continue decisions not yet read
        while act:
            sub = [seqs[b] for b in act]
            sids = [s.sid for s in sub]
            bt = block_tables if len(act) == B else block_tables.index_select(
                0, h2d(act, torch.int64, self.device))
            if k == 0:
                # catch up the drafting model: positions [min(dlen, n-1), n) of each sequence, padded
                # at the front with query-only rows to a uniform count (a graph-capturable step)
                q_rows = max(s.n - min(s.dlen, s.n - 1) for s in sub)
                starts = [max(0, s.n - q_rows) for s in sub]
                ends = [s.n for s in sub]
                write = [s.dlen for s in sub]
                ids = h2d([t for s, a in zip(sub, starts) for t in s.tokens[a:]], torch.int64, self.device)
            else:
                starts = [s.n - 1 + k for s in sub]
                ends = [s.n + k for s in sub]
                write = starts
                idx = h2d(act, torch.int64, self.device)
                ids = drafts[:, k - 1].index_select(0, idx) if len(act) < B else drafts[:, k - 1]
            meta = build_meta(self.pm, sids, starts, ends, write, self.device, block_tables=bt)
            logits, _ = self.e.run(model, cache, ids, meta, last_rows_only=True)
            tok, pr = self._sample(logits, sub, [s.n + k for s in sub], RNG_DRAFT, want_probs)
            if len(act) == B:
                drafts[:, k] = tok
                if pr is not None:
                    probs[:, k] = pr
            else:
                idx = h2d(act, torch.int64, self.device)
                drafts[idx, k] = tok
                if pr is not None:
                    probs[idx, k] = pr
            for s, w, en in zip(sub, write, ends):
                s.stats["secondary_runs"] += 1
                s.dlen = max(s.dlen, en)      # (this step's K/V row is a kept draft's even if its output is not)
            # Lagged router read: the decision after step k-1 is read only now, with step k already
            # queued, so the device never idles on the host; a sequence told to stop has run one
            # step too many and that step's draft is dropped (lens not counted).
            stopped = set()
            if pending is not None:
                stopped = {b for b, c in zip(pending[0], pending[1].tolist()) if not c}
                pending = None
            kept = [b for b in act if b not in stopped]
            for b in kept:
                lens[b] += 1
            k += 1
            nxt = [b for b in kept if lens[b] < limits[b]]
            if self.auto and nxt:
                feats = router_features(logits, model.model.model.embed_tokens.weight, self.e.router_top_k)
                cont = (1.0 - self.e.model.router(feats)) >= self.threshold     # device [len(act)]
                if self.router_lag:
                    rows = {b: j for j, b in enumerate(act)}
                    pending = (nxt, cont[h2d([rows[b] for b in nxt], torch.int64, self.device)]
                               if len(nxt) < len(act) else cont)
                else:
                    go = cont.tolist()                                         # the router's stop decision
                    nxt = [b for b in nxt if go[act.index(b)]]
            act = nxt
        for s, n_ in zip(seqs, lens):
            s.stats["drafted_tokens"] += n_
        return drafts, probs, lens

    def _step_speculative(self) -> Iterator[StreamEvent]:
        e, seqs = self.e, self.active
        tandem = self.mode == "tandem-speed"
        B = len(seqs)
        limits = [min(self.gamma, self.params.max_new_tokens - s.generated - 1) for s in seqs]
        firsts = [min(s.dlen, s.n - 1) for s in seqs]
        G = max(limits)
        # every sequence gets slots for a full block of G drafts: the verify block is uniform
        # ([B, G+1] rows, one CUDA graph per bucket) even when draft lengths are ragged; rows past a
        # sequence's drafts hold padding tokens, are ignored by `verify` and rolled back below.
        # (n + G stays inside the sequence's worst-case page reservation.)
        self._prepare(seqs, firsts, [s.n + G for s in seqs])
        sids = [s.sid for s in seqs]
        bt = h2d(self.pm.block_table(sids), torch.int32, self.device)
        if G > 0:
            drafts, probs, lens = self._draft(seqs, limits, bt, want_probs=not self.greedy)
            G = max(lens)
            drafts = drafts[:, :G].contiguous()
            if probs is not None:
                probs = probs[:, :G].contiguous()
        else:
            lens = [0] * B
        # verify block [tokens[n-1], drafts...] on the primary
        starts = [s.n - 1 for s in seqs]
        ends = [s.n + G for s in seqs]
        meta = build_meta(self.pm, sids, starts, ends, starts, self.device, block_tables=bt)
        last = h2d([s.tokens[-1] for s in seqs], torch.int64, self.device)
        hidden_layers = e.layer_map if tandem else ()
        if G == 0:
            logits, _ = e.run(e.primary, e.primary_cache, last, meta, hidden_layers=hidden_layers, refresh=tandem)
            toks = self._sample_undrafted(logits, seqs)
            accepted = [0] * B
            emitted = [[t] for t in toks.tolist()]             # the one host read
        else:
            # verify block [B, G+1] = [tokens[n-1], drafts...]; the verification runs right after the
            # forward (and the refresh), inside the same CUDA graph when graphs are on
            block = torch.cat([last.unsqueeze(1), drafts], 1).reshape(-1)
            rng = self._rng_greedy(B) if self.greedy else self._row_rng(seqs, [s.n for s in seqs], RNG_VERIFY)
            verify = VerifyInputs(h2d(lens, torch.int32, self.device), probs, *self._params(B), rng)
            _, _, acc, em = e.run(e.primary, e.primary_cache, block, meta, hidden_layers=hidden_layers,
                                  refresh=tandem, verify=verify)
            both = torch.cat([acc.view(B, 1).long(), em.long()], 1).tolist()   # the one host read
            accepted = [row[0] for row in both]
            emitted = [row[1:row[0] + 2] for row in both]
        events = []
        for s, a, em_b, g in zip(seqs, accepted, emitted, lens):
            n = s.n
            st = s.stats
            st["primary_runs"] += 1
            st["blocks"] += 1
            st["accepted_tokens"] += a
            hist = st["accepted_per_block"]
            if len(hist) <= a:
                hist.extend([0] * (a + 1 - len(hist)))
            hist[a] += 1
            s.plen = n + a
            s.dlen = n + a if tandem else min(s.dlen, n + a)
            new = self._commit(s, em_b)
            if not s.finished:
                self._set_lens(s)
            events.append(self._event(s, new))
        return iter(events)

    def _step_tandem(self) -> Iterator[StreamEvent]:
        """Tandem as a standalone generator (not lossless): the secondary's tokens are committed;
        the primary processes them (and, with the free token, predicts one more)."""
        e, seqs = self.e, self.active
        B = len(seqs)
        if self.free_token:
            limits = [min(self.gamma, self.params.max_new_tokens - s.generated - 1) for s in seqs]
            firsts = [s.n - 1 for s in seqs]
            ends = [s.n + g for s, g in zip(seqs, limits)]
        else:
            limits = [min(self.gamma, self.params.max_new_tokens - s.generated) for s in seqs]
            firsts = [s.n - 1 for s in seqs]
            ends = [s.n + g for s, g in zip(seqs, limits)]
        self._prepare(seqs, firsts, ends)
        sids = [s.sid for s in seqs]
        bt = h2d(self.pm.block_table(sids), torch.int32, self.device)
        G = max(limits)
        if G > 0:
            drafts, _, lens = self._draft(seqs, limits, bt, want_probs=False)
            G = max(lens)
            drafts = drafts[:, :G]
        else:
            lens = [0] * B
        events = []
        if self.free_token:
            starts = [s.n - 1 for s in seqs]
            ends = [s.n + g for s, g in zip(seqs, lens)]
            meta = build_meta(self.pm, sids, starts, ends, starts, self.device, block_tables=bt)
            last = h2d([s.tokens[-1] for s in seqs], torch.int64, self.device)
            if G > 0:
                block = torch.cat([last.unsqueeze(1), drafts], 1)
                flat = h2d([b * (G + 1) + t for b in range(B) for t in range(lens[b] + 1)], torch.int64,
                           self.device)
                ids = block.reshape(-1).index_select(0, flat)
            else:
                ids = last
            logits, _ = e.run(e.primary, e.primary_cache, ids, meta, last_rows_only=True,
                              hidden_layers=e.layer_map, refresh=True)
            free, _ = self._sample(logits, seqs, [s.n + g for s, g in zip(seqs, lens)], RNG_SAMPLE)
            rows = torch.cat([drafts, free.view(B, 1)], 1).tolist() if G > 0 else free.view(B, 1).tolist()
            for s, row, g in zip(seqs, rows, lens):                 # one host read above
                n = s.n
                s.stats["primary_runs"] += 1
                s.plen = s.dlen = n + g
                new = self._commit(s, row[:g] + [row[-1]])
                if not s.finished:
                    self._set_lens(s)
                events.append(self._event(s, new))
            return iter(events)
        # free_token=False: commit the secondary's tokens, then the primary processes them
        rows = drafts.tolist()                                        # the one host read
        todo, pos = [], []
        for s, row, g in zip(seqs, rows, lens):
            n = s.n
            new = self._commit(s, row[:g])
            events.append(self._event(s, new))
            if not s.finished:
                todo.append(s)
                pos.append((n, s.n))
        if todo:
            meta = build_meta(self.pm, [s.sid for s in todo], [a for a, _ in pos], [b for _, b in pos],
                              [a for a, _ in pos], self.device)
            ids = h2d([t for s, (a, b) in zip(todo, pos) for t in s.tokens[a:b]], torch.int64, self.device)
            e.run(e.primary, e.primary_cache, ids, meta, last_rows_only=True, hidden_layers=e.layer_map,
                  refresh=True)
            for s in todo:
                s.stats["primary_runs"] += 1
                s.plen = s.dlen = s.n
                self._set_lens(s)
        return iter(events)
