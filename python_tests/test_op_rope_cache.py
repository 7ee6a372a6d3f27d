"""rope_cache_write against a plain-PyTorch reference (tandem_rt.models.llama.rope_cos_sin/apply_rope)."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICES
from tandem_rt.models.llama import rope_cos_sin, rotate_half
from tandem_rt.ops import rope_cache_write

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def reference_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x ``[N, H, D]`` -> rotated in float32 (Hugging Face rotate-half), cast back to x.dtype."""
    cos, sin = rope_cos_sin(positions.cpu(), x.shape[-1], theta)  # fp32 [N, D]
    xf = x.cpu().float()
    return (xf * cos[:, None] + rotate_half(xf) * sin[:, None]).to(x.dtype)


def assert_close(actual, expected, dtype):
    tol = TOL[dtype]
    scale = expected.float().abs().max().item() + 1e-6
    torch.testing.assert_close(actual.cpu().float(), expected.cpu().float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [8, 16, 64, 128])
@pytest.mark.parametrize("page_size", [8, 16, 32])
def test_rope_cache_write_matches_reference(device, dtype, head_dim, page_size):
    n, hq, hkv, num_pages, theta = 11, 4, 2, 5, 10000.0
    k = torch.randn(n, hkv, head_dim, dtype=dtype, device=device)
    v = torch.randn(n, hkv, head_dim, dtype=dtype, device=device)
    q = torch.randn(n, hq, head_dim, dtype=dtype, device=device)
    positions = torch.randint(0, 5000, (n,), device=device)
    slots = torch.randperm(num_pages * page_size, device=device)[:n]
    slots[[2, 7]] = -1
    k_cache = torch.full((num_pages, page_size, hkv, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    k0, v0, q0 = k.clone(), v.clone(), q.clone()

    rope_cache_write(k, v, positions, slots, k_cache, v_cache, theta, q=q)

    k_ref, q_ref = reference_rope(k0, positions, theta), reference_rope(q0, positions, theta)
    assert_close(k, k_ref, dtype)
    assert_close(q, q_ref, dtype)
    assert torch.equal(v, v0), "v must not be modified"
    flat_k = k_cache.reshape(-1, hkv, head_dim).cpu()
    flat_v = v_cache.reshape(-1, hkv, head_dim).cpu()
    written = torch.zeros(num_pages * page_size, dtype=torch.bool)
    for i, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        written[s] = True
        assert torch.equal(flat_k[s], k[i].cpu()), "cache holds the rotated key"
        assert torch.equal(flat_v[s], v0[i].cpu())
    assert flat_k[~written].isnan().all() and flat_v[~written].isnan().all(), "slot -1 rows or other slots written"


@pytest.mark.parametrize("device", DEVICES)
def test_rope_without_q_and_strided_views(device):
    """k/v/q as column slices of one fused QKV output (strided rows); q omitted in a second call."""
    n, hq, hkv, d, page_size, theta = 9, 8, 2, 32, 16, 500000.0
    qkv = torch.randn(n, (hq + 2 * hkv) * d, device=device)
    q = qkv[:, : hq * d].view(n, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(n, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(n, hkv, d)
    assert not k.is_contiguous()
    positions = torch.arange(100, 100 + n, device=device)
    slots = torch.arange(n, device=device) + 3
    k_cache = torch.zeros(2, page_size, hkv, d, device=device)
    v_cache = torch.zeros_like(k_cache)
    k0, q0, v0 = k.clone(), q.clone(), v.clone()
    rope_cache_write(k, v, positions, slots, k_cache, v_cache, theta, q=q)
    assert_close(k, reference_rope(k0, positions, theta), torch.float32)
    assert_close(q, reference_rope(q0, positions, theta), torch.float32)
    assert torch.equal(v, v0)
    assert torch.equal(k_cache.reshape(-1, hkv, d)[3:3 + n], k)
    assert torch.equal(v_cache.reshape(-1, hkv, d)[3:3 + n], v0)

    k2 = torch.randn(n, hkv, d, device=device)
    k2_0 = k2.clone()
    rope_cache_write(k2, v0.contiguous(), positions, slots, k_cache, v_cache, theta)
    assert_close(k2, reference_rope(k2_0, positions, theta), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_empty_batch(device):
    k = torch.empty(0, 2, 16, device=device)
    k_cache = torch.full((1, 8, 2, 16), 7.0, device=device)
    v_cache = k_cache.clone()
    empty = torch.empty(0, dtype=torch.int64, device=device)
    rope_cache_write(k, k.clone(), empty, empty, k_cache, v_cache, 10000.0)
    assert (k_cache == 7).all()


def _args(device="cpu", dtype=torch.float32, n=4, hkv=2, d=16, pages=3, page_size=8):
    return dict(k=torch.randn(n, hkv, d, dtype=dtype, device=device), v=torch.randn(n, hkv, d, dtype=dtype, device=device),
                positions=torch.arange(n, device=device), slot_mapping=torch.arange(n, device=device),
                k_cache=torch.zeros(pages, page_size, hkv, d, dtype=dtype, device=device),
                v_cache=torch.zeros(pages, page_size, hkv, d, dtype=dtype, device=device), rope_theta=10000.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.update(k=a["k"].double()), "k must be float32, float16 or bfloat16, got Double"),
    (lambda a: a.update(k=a["k"][..., :15]), "head_dim"),
    (lambda a: a.update(v=a["v"].half()), "v must have dtype"),
    (lambda a: a.update(v=a["v"][:3]), r"v must have the shape of k \[4, 2, 16\], got \[3, 2, 16\]"),
    (lambda a: a.update(k=a["k"].transpose(1, 2).contiguous().transpose(1, 2)), "k must have packed heads"),
    (lambda a: a.update(positions=a["positions"].int()), "positions"),
    (lambda a: a.update(slot_mapping=a["slot_mapping"][:2]), "slot_mapping"),
    (lambda a: a.update(k_cache=a["k_cache"][:, :, :1]), "k_cache"),
    (lambda a: a.update(v_cache=a["v_cache"][:2]), "v_cache"),
    (lambda a: a.update(k_cache=a["k_cache"].transpose(0, 1)), "k_cache"),
    (lambda a: a.update(rope_theta=-1.0), "rope_theta"),
    (lambda a: a.update(q=torch.randn(4, 3, 8)), "q"),
])
def test_rope_validation(device, mutate, match):
    args = _args(device)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        rope_cache_write(**args)


def test_rope_index_validation_on_cpu():
    args = _args()
    args["slot_mapping"] = torch.tensor([0, 1, 24, -1])  # 3 pages x 8 slots -> 24 is out of range
    with pytest.raises(ValueError, match="slot_mapping"):
        rope_cache_write(**args)
    args = _args()
    args["slot_mapping"] = torch.tensor([0, -2, 1, 2])
    with pytest.raises(ValueError, match="slot_mapping"):
        rope_cache_write(**args)
    args = _args()
    args["positions"] = torch.tensor([0, 1, -5, 2])
    with pytest.raises(ValueError, match="positions"):
        rope_cache_write(**args)
    # the raw op validates too (no Python wrapper in between)
    args = _args()
    args["slot_mapping"] = torch.tensor([0, 1, 99, 2])
    with pytest.raises(ValueError, match="slot_mapping"):
        torch.ops.tandem_rt.rope_cache_write(*args.values(), None)
