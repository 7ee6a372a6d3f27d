"""``tandem_rt._C.cpu``: the step ops without the dispatcher give the results of
``torch.ops.tandem_rt`` (bit for bit: the same CPU functions) and refuse bad arguments with the
same ValueError."""
from __future__ import annotations

import pytest
import torch

from tandem_rt._ext import _C
from tandem_rt.quantized import pack_rows16

OPS = torch.ops.tandem_rt


def test_direct_ops_equal_the_torch_ops():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 64, generator=g).to(dtype)
        w = torch.randn(48, 64, generator=g).to(dtype)
        add = torch.randn(48, generator=g).to(dtype)
        assert torch.equal(_C.cpu.linear_rows(x, w, add), OPS.linear_rows(x, w, add))
        assert torch.equal(_C.cpu.linear_rows(x, w), OPS.linear_rows(x, w, None))
        nw = torch.rand(64, generator=g).to(dtype)
        assert torch.equal(_C.cpu.rms_norm(x, nw, 1e-5), OPS.rms_norm(x, nw, 1e-5))
        assert torch.equal(_C.cpu.silu_and_mul(x), OPS.silu_and_mul(x))
    blocks = torch.randint(0, 256, (32, 2 * 34), dtype=torch.uint8, generator=g)
    blocks.view(32, 2, 34)[..., :2] = torch.tensor([0, 0x3C], dtype=torch.uint8)   # fp16 scale 1.0
    x = torch.randn(2, 64, generator=g)
    assert torch.equal(_C.cpu.linear_rows_q(x, blocks, 0), OPS.linear_rows_q(x, blocks, 0, None))
    packed = pack_rows16(blocks, "Q8_0")
    assert torch.equal(_C.cpu.linear_rows_q16(x, packed, 0), OPS.linear_rows_q16(x, packed, 0, None))
    # rope + cache write, then paged attention over it
    T, H, Hkv, D, pages, ps = 3, 4, 2, 16, 4, 8
    q = torch.randn(T, H, D, generator=g)
    k, v = torch.randn(T, Hkv, D, generator=g), torch.randn(T, Hkv, D, generator=g)
    pos = torch.tensor([0, 1, 2])
    slots = torch.tensor([8, 9, 10])
    caches = [torch.zeros(pages, ps, Hkv, D) for _ in range(4)]
    q1, q2, k1, k2 = q.clone(), q.clone(), k.clone(), k.clone()
    _C.cpu.rope_cache_write(k1, v, pos, slots, caches[0], caches[1], 10000.0, q1)
    OPS.rope_cache_write(k2, v, pos, slots, caches[2], caches[3], 10000.0, q2)
    assert torch.equal(q1, q2) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    bt = torch.tensor([[1, 2]], dtype=torch.int32)
    lens = torch.tensor([3], dtype=torch.int32)
    qsl = torch.tensor([0, 3], dtype=torch.int32)
    o1, o2 = torch.empty(T, H, D), torch.empty(T, H, D)
    _C.cpu.paged_attention(o1, q1, caches[0], caches[1], bt, lens, qsl, 0.25, 3, 3, True)
    OPS.paged_attention(o2, q1, caches[0], caches[1], bt, lens, qsl, 0.25, 3, 3, True)
    assert torch.equal(o1, o2)


def test_direct_ops_validate_their_arguments():
    with pytest.raises(ValueError, match="qtype must be 0"):
        _C.cpu.linear_rows_q16(torch.randn(2, 64), torch.zeros(1, 640, dtype=torch.uint8), 7)
    with pytest.raises(ValueError, match="gate_up.shape\\[1\\] must be even"):
        _C.cpu.silu_and_mul(torch.randn(2, 5))
    with pytest.raises(ValueError):
        _C.cpu.linear_rows(torch.randn(2, 8), torch.randn(3, 9))
    with pytest.raises(ValueError):
        _C.cpu.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5)


def test_paged_attention_shares_one_scratch_between_calls():
    """A key-segment scratch from paged_attention_scratch, passed to several direct calls in a row
    (the Python loop's layers), gives the op's results (which allocate their own) every time, on
    sequences longer than one 512-key segment; a scratch of the wrong kind is refused."""
    g = torch.Generator().manual_seed(3)
    H, Hkv, D, ps = 4, 2, 16, 16
    lens_l = [700, 1030, 5]
    qrows = [3, 1, 2]
    pages_per = [(n + ps - 1) // ps for n in lens_l]
    pages = sum(pages_per) + 1
    bt = torch.zeros(len(lens_l), max(pages_per), dtype=torch.int32)
    nxt = 1
    for b, n in enumerate(pages_per):
        bt[b, :n] = torch.arange(nxt, nxt + n, dtype=torch.int32)
        nxt += n
    lens = torch.tensor(lens_l, dtype=torch.int32)
    qsl = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    T = sum(qrows)
    scratch = _C.cpu.paged_attention_scratch(T, len(lens_l), H, D, max(lens_l))
    assert scratch is not None and scratch.dtype == torch.float32
    assert _C.cpu.paged_attention_scratch(T, len(lens_l), H, D, 512) is None
    for dtype in (torch.float32, torch.bfloat16):
        for _ in range(3):   # as three layers of one forward
            kc = torch.randn(pages, ps, Hkv, D, generator=g).to(dtype)
            vc = torch.randn(pages, ps, Hkv, D, generator=g).to(dtype)
            q = torch.randn(T, H, D, generator=g).to(dtype)
            o1, o2 = torch.empty(T, H, D, dtype=dtype), torch.empty(T, H, D, dtype=dtype)
            _C.cpu.paged_attention(o1, q, kc, vc, bt, lens, qsl, 0.25, 3, max(lens_l), True, scratch)
            OPS.paged_attention(o2, q, kc, vc, bt, lens, qsl, 0.25, 3, max(lens_l), True)
            assert torch.equal(o1, o2)
    o = torch.empty(T, H, D)
    q, kc, vc = torch.randn(T, H, D), torch.randn(pages, ps, Hkv, D), torch.randn(pages, ps, Hkv, D)
    for bad, match in [(scratch.double(), "scratch"), (scratch.view(1, -1), "scratch"), (scratch[:100], "scratch")]:
        with pytest.raises(ValueError, match=match):
            _C.cpu.paged_attention(o, q, kc, vc, bt, lens, qsl, 0.25, 3, max(lens_l), True, bad)
