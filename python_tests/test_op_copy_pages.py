"""tandem_rt.ops.copy_pages against a plain-PyTorch clone + index copy."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICES
from tandem_rt import ops


def _random_cache(shape, dtype, gen, device):
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=gen).to(dtype)
    else:
        t = torch.randint(-100, 100, shape, generator=gen).to(dtype)
    return t.to(device)


def _src_dst(num_pages, n, gen):
    """n source pages and n distinct destinations that are not sources (copy-on-write pattern)."""
    perm = torch.randperm(num_pages, generator=gen)
    dst = perm[:n]
    src = perm[n:][torch.randint(0, num_pages - n, (n,), generator=gen)]  # sources may repeat
    return src.contiguous(), dst.contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [0, 1, 5])
def test_copy_pages_matches_reference(device, n):
    gen = torch.Generator().manual_seed(n)
    num_pages = 12
    shapes_dtypes = [((num_pages, 16, 2, 64), torch.float32), ((num_pages, 16, 2, 64), torch.bfloat16),
                     ((num_pages, 8, 1, 128), torch.float16), ((num_pages, 32, 4, 8), torch.float32),
                     ((num_pages, 3, 5), torch.int8), ((num_pages, 7), torch.int64), ((num_pages,), torch.float32)]
    caches = [_random_cache(s, d, gen, device) for s, d in shapes_dtypes]
    src, dst = _src_dst(num_pages, n, gen)
    want = [c.clone().cpu() for c in caches]
    for w in want:
        w[dst] = w[src].clone()
    ops.copy_pages(caches, src.to(device), dst.to(device))
    for c, w in zip(caches, want):
        assert torch.equal(c.cpu(), w)


@pytest.mark.parametrize("device", DEVICES)
def test_copy_pages_identity_and_caches_of_different_sizes(device):
    gen = torch.Generator().manual_seed(3)
    caches = [_random_cache((10, 4, 2, 8), torch.float32, gen, device),
              _random_cache((20, 8, 1, 16), torch.float16, gen, device)]
    src, dst = torch.tensor([2, 4, 6]), torch.tensor([2, 9, 0])  # src == dst is a no-op
    want = [c.clone().cpu() for c in caches]
    for w in want:
        w[dst] = w[src].clone()
    ops.copy_pages(tuple(caches), src.to(device), dst.to(device))
    for c, w in zip(caches, want):
        assert torch.equal(c.cpu(), w)


def test_copy_pages_validation_errors():
    caches = [torch.zeros(4, 2, 3), torch.zeros(4, 5)]
    src, dst = torch.tensor([0, 1]), torch.tensor([2, 3])
    with pytest.raises(ValueError, match="caches"):
        ops.copy_pages([], src, dst)
    with pytest.raises(ValueError, match="caches"):
        ops.copy_pages(caches[0], src, dst)
    with pytest.raises(ValueError, match=r"caches\[1\]"):
        ops.copy_pages([caches[0], caches[1].t()], src, dst)
    with pytest.raises(ValueError, match=r"caches\[1\]"):
        ops.copy_pages([caches[0], torch.zeros(4, 2, device="meta")], src, dst)
    with pytest.raises(ValueError, match=r"caches\[0\]"):
        ops.copy_pages([torch.zeros(0, 3)], src, dst)
    with pytest.raises(ValueError, match="src_pages"):
        ops.copy_pages(caches, src.int(), dst)
    with pytest.raises(ValueError, match="dst_pages"):
        ops.copy_pages(caches, src, dst[None])
    with pytest.raises(ValueError, match="src_pages"):
        ops.copy_pages(caches, src.to("meta"), dst)
    with pytest.raises(ValueError, match="same length"):
        ops.copy_pages(caches, src, dst[:1])
    with pytest.raises(ValueError, match="src_pages"):
        ops.copy_pages(caches, torch.tensor([0, 4]), dst)
    with pytest.raises(ValueError, match="dst_pages"):
        ops.copy_pages(caches, src, torch.tensor([-1, 3]))
    # the op itself validates too (direct torch.ops calls)
    with pytest.raises(ValueError, match="dst_pages"):
        torch.ops.tandem_rt.copy_pages(caches, src, torch.tensor([2, 4]))
    with pytest.raises(ValueError, match="src_pages"):
        torch.ops.tandem_rt.copy_pages(caches, src.int(), dst)
    assert all(bool((c == 0).all()) for c in caches)  # failed calls change nothing


def test_copy_pages_validates_every_cache_before_writing():
    """caches of 8 and 4 pages, destination page 6: refused before caches[0] is touched."""
    import tandem_rt  # noqa: F401  (registers the ops)

    big, small = torch.randn(8, 3), torch.randn(4, 3)
    before = big.clone(), small.clone()
    with pytest.raises(ValueError, match=r"dst_pages\[0\] = 6 is outside \[0, 4\) of caches\[1\]"):
        torch.ops.tandem_rt.copy_pages([big, small], torch.tensor([1]), torch.tensor([6]))
    assert torch.equal(big, before[0]) and torch.equal(small, before[1])
