"""Copy-on-write page copies (``torch.ops.tandem_rt.copy_pages``)."""
from __future__ import annotations

from typing import Sequence

import torch

from tandem_rt._ext import _C  # noqa: F401  (registers torch.ops.tandem_rt.*)


def copy_pages(caches: Sequence[torch.Tensor], src_pages: torch.Tensor, dst_pages: torch.Tensor) -> None:
    """Copy page ``src_pages[i]`` to page ``dst_pages[i]`` in every cache, all caches in one launch.

    Args:
        caches: non-empty sequence of contiguous tensors ``[num_pages, ...]`` (any dtype, e.g. the
            K and V pools ``[num_pages, page_size, num_kv_heads, head_dim]`` of every layer of both
            models), all on one device; modified in place.
        src_pages: int64 ``[n]`` source page indices, each in ``[0, num_pages)`` of every cache.
        dst_pages: int64 ``[n]`` destination page indices, same range. Destinations should be
            distinct and not also sources (the copies run in parallel on CUDA).

    Index ranges are checked on CPU only (on CUDA that would synchronise with the host; the
    kernel skips out-of-range pairs).
    """
    if isinstance(caches, torch.Tensor) or not isinstance(caches, (list, tuple)):
        raise ValueError(f"caches must be a list or tuple of tensors, got {type(caches).__name__}")
    if len(caches) == 0:
        raise ValueError("caches must hold at least one cache tensor")
    for i, c in enumerate(caches):
        if not isinstance(c, torch.Tensor):
            raise ValueError(f"caches[{i}] must be a torch.Tensor, got {type(c).__name__}")
    device = caches[0].device
    for i, c in enumerate(caches):
        if c.device != device:
            raise ValueError(f"caches[{i}] must be on {device}, got {c.device}")
        if c.dim() < 1 or c.shape[0] == 0:
            raise ValueError(f"caches[{i}] must have a non-empty page dimension, got shape {tuple(c.shape)}")
        if not c.is_contiguous():
            raise ValueError(f"caches[{i}] must be contiguous")
    for name, t in (("src_pages", src_pages), ("dst_pages", dst_pages)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(f"{name} must be on {device}, got {t.device}")
        if t.dtype != torch.int64:
            raise ValueError(f"{name} must have dtype int64, got {str(t.dtype).replace('torch.', '')}")
        if t.dim() != 1:
            raise ValueError(f"{name} must have 1 dimension, got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if src_pages.shape[0] != dst_pages.shape[0]:
        raise ValueError(f"src_pages and dst_pages must have the same length, got {src_pages.shape[0]} "
                         f"and {dst_pages.shape[0]}")
    if device.type == "cpu" and src_pages.numel() > 0:
        pages = min(c.shape[0] for c in caches)
        for name, t in (("src_pages", src_pages), ("dst_pages", dst_pages)):
            bad = (t < 0) | (t >= pages)
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise ValueError(f"{name}[{i}] = {int(t[i])} is outside [0, {pages})")
    torch.ops.tandem_rt.copy_pages(list(caches), src_pages, dst_pages)


__all__ = ["copy_pages"]
