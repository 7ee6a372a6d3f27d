"""The engine's paged forward (primary, and secondary over primary-derived entries) equals the
reference models' logits: prefill (chunked), decode, verify blocks, after rollbacks, ragged batches,
page sizes 8/16/32."""
from __future__ import annotations

import pytest
import torch

from conftest import random_tandem_model
from tandem_rt.engine import Engine
from tandem_rt.engine.paged_model import PagedLlama, build_meta
from tandem_rt.engine.refresh import TandemRefresh


def ref_primary(model, tokens):
    """Reference primary over one sequence -> (logits [T, V], hidden per layer map [T, d_L])."""
    logits, hidden = model.primary(torch.tensor([tokens]), hidden_layers=model.layer_map)
    return logits[0], [h[0] for h in hidden]


def ref_secondary(model, tokens, plen):
    """Reference Eq. (2): query i reads primary-derived K/V for p < min(plen, i + 1), its own after."""
    _, hidden = model.primary(torch.tensor([tokens]), hidden_layers=model.layer_map)
    T = len(tokens)
    boundary = torch.minimum(torch.full((T,), plen), torch.arange(T) + 1)
    return model.secondary_forward(torch.tensor([tokens]), hidden, boundary)[0]


class Harness:
    """Drives the engine's paged models directly on a ragged batch of sequences."""

    def __init__(self, model, page_size, cpu_layout=True):
        self.model = model
        self.e = Engine(model, num_pages=64, page_size=page_size, max_batch_size=4)
        self.pm = self.e.page_manager
        if not cpu_layout:  # the CUDA code path (transposed weight views, torch's norm / SiLU ops)
            self.e.primary = PagedLlama(model.primary, cpu_layout=False)
            self.e.secondary = PagedLlama(model.secondary, cpu_layout=False)
            self.e.refresh = TandemRefresh(model, self.e.secondary)
            assert not self.e.primary.layers[0].w_qkv.is_contiguous()

    def primary(self, sids, seqs, starts, refresh=True, dense=False):
        """Primary rows [starts[b], len(seqs[b])) of every sequence (writes); refresh the secondary."""
        e = self.e
        ends = [len(s) for s in seqs]
        for sid, a, b in zip(sids, starts, ends):
            assert not self.pm.prepare_write(sid, a, b)
        meta = build_meta(self.pm, sids, starts, ends, starts, "cpu", dense=dense)
        ids = torch.tensor([t for s, a in zip(seqs, starts) for t in s[a:]])
        logits, hidden = e.primary.forward(ids, meta, e.primary_cache.k, e.primary_cache.v,
                                           hidden_layers=e.layer_map)
        if refresh:
            e.refresh(hidden, meta.positions, meta.slot_mapping, e.secondary_cache.k, e.secondary_cache.v)
        return logits, ends

    def secondary(self, sids, seqs, starts, write_from):
        e = self.e
        ends = [len(s) for s in seqs]
        for sid, a, b in zip(sids, write_from, ends):
            if b > a:
                assert not self.pm.prepare_write(sid, min(a, self.pm.num_tokens(sid)), b)
        meta = build_meta(self.pm, sids, starts, ends, write_from, "cpu")
        ids = torch.tensor([t for s, a in zip(seqs, starts) for t in s[a:]])
        logits, _ = e.secondary.forward(ids, meta, e.secondary_cache.k, e.secondary_cache.v)
        return logits


def split(logits, seqs, starts):
    out, r = [], 0
    for s, a in zip(seqs, starts):
        out.append(logits[r:r + len(s) - a])
        r += len(s) - a
    return out


@pytest.mark.parametrize("page_size, cpu_layout", [(8, True), (16, True), (32, True), (16, False)])
def test_paged_logits_match_reference(page_size, cpu_layout):
    model = random_tandem_model(seed=page_size)
    h = Harness(model, page_size, cpu_layout)
    g = torch.Generator().manual_seed(page_size)
    V = model.config.primary.vocab_size
    rnd = lambda n: torch.randint(0, V, (n,), generator=g).tolist()  # noqa: E731
    seqs = [rnd(13), rnd(40), rnd(1)]
    sids = [0, 1, 2]
    for sid in sids:
        h.pm.add_sequence(sid)
    tol = dict(atol=2e-4, rtol=2e-4)

    def check_primary(starts):
        idx = [b for b in range(len(seqs)) if starts[b] < len(seqs[b])]
        sub, sub_starts = [seqs[b] for b in idx], [starts[b] for b in idx]
        logits, _ = h.primary([sids[b] for b in idx], sub, sub_starts)
        for b, got in zip(idx, split(logits, sub, sub_starts)):
            ref, _ = ref_primary(model, seqs[b])
            torch.testing.assert_close(got, ref[starts[b]:], **tol)

    # prefill in chunks of <= 32 rows: [0, 32) then the rest
    first = [min(len(s), 32) for s in seqs]
    full = [list(s) for s in seqs]
    seqs = [s[:f] for s, f in zip(full, first)]
    check_primary([0, 0, 0])
    seqs = full
    check_primary(first)
    plen = [len(s) for s in seqs]

    # secondary drafts 3 tokens over primary-derived entries (first step writes its own entry)
    for step in range(3):
        starts = [len(s) - 1 for s in seqs]
        if step == 0:
            # last token was processed by the primary: query-only row for position plen-1, then
            # give each sequence a new token the primary has not seen
            logits = h.secondary(sids, seqs, starts, [len(s) for s in seqs])
            for b, got in enumerate(split(logits, seqs, starts)):
                torch.testing.assert_close(got, ref_secondary(model, seqs[b], plen[b])[starts[b]:], **tol)
            seqs = [s + rnd(1) for s in seqs]
            starts = [len(s) - 1 for s in seqs]
        logits = h.secondary(sids, seqs, starts, starts)
        for b, got in enumerate(split(logits, seqs, starts)):
            torch.testing.assert_close(got, ref_secondary(model, seqs[b], plen[b])[starts[b]:], **tol)
        seqs = [s + [int(l.argmax())] for s, l in zip(seqs, split(logits, seqs, starts))]

    # verify block on the primary over the unprocessed tokens, then roll back to a ragged prefix
    starts = list(plen)
    check_primary(starts)
    keep = [plen[0] + 1, plen[1] + 3, plen[2]]      # accepted prefixes (ragged)
    seqs = [s[:k] for s, k in zip(seqs, keep)]
    for sid, k in zip(sids, keep):
        h.pm.truncate(sid, k)
    plen = keep
    # new block of different tokens after the rollback; primary entries below plen stay valid
    seqs = [s + rnd(2) for s in seqs]
    starts = list(plen)
    logits = h.secondary(sids, seqs, [p - 1 for p in plen], [p for p in plen])
    for b, got in enumerate(split(logits, seqs, [p - 1 for p in plen])):
        torch.testing.assert_close(got, ref_secondary(model, seqs[b], plen[b])[plen[b] - 1:], **tol)
    check_primary(starts)
    # decode steps (one row each) after the block
    plen = [len(s) for s in seqs]
    for _ in range(2):
        seqs = [s + rnd(1) for s in seqs]
        check_primary([len(s) - 1 for s in seqs])
    h.pm.check_invariants()


def test_secondary_refresh_overwrites_draft_entries():
    """After the primary catches up, the secondary's own (draft) entries below plen are replaced:
    the result equals a reference in which those positions were never drafted."""
    model = random_tandem_model(seed=5)
    h = Harness(model, 8)
    V = model.config.primary.vocab_size
    toks = torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    h.pm.add_sequence(0)
    h.primary([0], [toks[:6]], [0])
    # the secondary drafts positions 6..9 with its own entries
    for p in range(6, 10):
        h.secondary([0], [toks[:p + 1]], [p], [p])
    # the primary processes 6..9 and refreshes them
    h.primary([0], [toks[:10]], [6])
    logits = h.secondary([0], [toks[:11]], [10], [10])
    torch.testing.assert_close(logits[0], ref_secondary(model, toks[:11], 10)[10], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("page_size", [8, 32])
def test_dense_prefill_matches_reference(page_size):
    """Whole prompts (ragged, longer than paged_attention's 32 query rows) in one dense forward:
    every row's logits equal the reference, and the pools it wrote serve later paged decode and
    secondary steps exactly as the reference says."""
    model = random_tandem_model(seed=11 + page_size)
    h = Harness(model, page_size)
    g = torch.Generator().manual_seed(page_size)
    V = model.config.primary.vocab_size
    rnd = lambda n: torch.randint(0, V, (n,), generator=g).tolist()  # noqa: E731
    seqs = [rnd(45), rnd(1), rnd(70)]
    sids = [0, 1, 2]
    for sid in sids:
        h.pm.add_sequence(sid)
    tol = dict(atol=2e-4, rtol=2e-4)
    logits, _ = h.primary(sids, seqs, [0, 0, 0], dense=True)
    for b, got in enumerate(split(logits, seqs, [0, 0, 0])):
        torch.testing.assert_close(got, ref_primary(model, seqs[b])[0], **tol)
    plen = [len(s) for s in seqs]
    # the secondary reads the refreshed (primary-derived) entries the dense prefill wrote
    seqs = [s + rnd(1) for s in seqs]
    starts = [len(s) - 1 for s in seqs]
    logits = h.secondary(sids, seqs, starts, starts)
    for b, got in enumerate(split(logits, seqs, starts)):
        torch.testing.assert_close(got, ref_secondary(model, seqs[b], plen[b])[starts[b]:], **tol)
    # paged decode on the primary over the dense-prefilled pool
    logits, _ = h.primary(sids, seqs, starts)
    for b, got in enumerate(split(logits, seqs, starts)):
        torch.testing.assert_close(got, ref_primary(model, seqs[b])[0][starts[b]:], **tol)
    h.pm.check_invariants()


def test_dense_prefill_needs_position_zero():
    model = random_tandem_model(seed=3)
    h = Harness(model, 8)
    h.pm.add_sequence(0)
    assert not h.pm.prepare_write(0, 0, 10)
    with pytest.raises(ValueError, match="dense prefill"):
        build_meta(h.pm, [0], [4], [10], [4], "cpu", dense=True)


@pytest.mark.parametrize("bias", [False, True])
def test_engine_weights_are_the_only_copy(tmp_path, bias):
    """The engine's matrices (fused QKV (+ bias), o_proj, fused gate/up, down, LM head)
    are the storage of the modules' own parameters (no second copy), the reference forward still
    runs on them, and the served model still saves and loads."""
    from tandem_rt.checkpoint import load_checkpoint, save_checkpoint

    model = random_tandem_model(seed=3, primary_bias=bias)
    assert (model.primary.model.layers[0].self_attn.q_proj.bias is not None) == bias
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    before = ref_primary(model, tokens)[0]
    e = Engine(model, num_pages=16, page_size=8)
    for paged, ref in ((e.primary, model.primary), (e.secondary, model.secondary), (e.drafter, model.drafter)):
        # [out, in] as the parameters (rows layout: bf16 / fp32 on the CPU) or [in, out]
        rows = (lambda w: w) if paged.rows_layout else (lambda w: w.t())
        fused = [(rows(paged.lm_head), (ref.output_weight,))]
        for lw, layer in zip(paged.layers, ref.model.layers):
            a, m = layer.self_attn, layer.mlp
            fused += [(rows(lw.w_qkv), (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)),
                      (rows(lw.w_o), (a.o_proj.weight,)),
                      (rows(lw.w_gate_up), (m.gate_proj.weight, m.up_proj.weight)),
                      (rows(lw.w_down), (m.down_proj.weight,))]
            if a.q_proj.bias is not None:
                fused.append((lw.b_qkv, (a.q_proj.bias, a.k_proj.bias, a.v_proj.bias)))
        for whole, parts in fused:
            ptr = whole.untyped_storage().data_ptr()
            assert all(p.untyped_storage().data_ptr() == ptr for p in parts)
            torch.testing.assert_close(whole, torch.cat([p.detach() for p in parts]), rtol=0, atol=0)
    torch.testing.assert_close(ref_primary(model, tokens)[0], before, rtol=1e-6, atol=1e-6)
    save_checkpoint(model, tmp_path / "ckpt")
    again = load_checkpoint(tmp_path / "ckpt")
    torch.testing.assert_close(ref_primary(again, tokens)[0], before, rtol=1e-6, atol=1e-6)


def test_bf16_paged_logits_match_bf16_reference():
    """bf16 on the CPU (the engine's own linear_rows / rms_norm / silu_and_mul ops for decode and verify
    rows, torch for the prompt) against the reference model run in bf16 by torch."""
    model = random_tandem_model(seed=21).to(torch.bfloat16)
    h = Harness(model, 16)
    g = torch.Generator().manual_seed(21)
    V = model.config.primary.vocab_size
    seqs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (20, 9)]
    for sid in (0, 1):
        h.pm.add_sequence(sid)
    logits, _ = h.primary([0, 1], [s[:-4] for s in seqs], [0, 0])          # prompt (many rows: torch)
    for starts in ([len(s) - 4 for s in seqs], [len(s) - 1 for s in seqs]):   # verify block of 3, decode
        cut = [s[:-1] if st == len(s) - 4 else s for s, st in zip(seqs, starts)]
        logits, _ = h.primary([0, 1], cut, starts)
        for b, got in enumerate(split(logits, cut, starts)):
            ref, _ = ref_primary(model, cut[b])
            ref = ref[starts[b]:].float()
            torch.testing.assert_close(got.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
