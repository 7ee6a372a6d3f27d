"""Copy-on-write page copies (``torch.ops.tandem_rt.copy_pages``)."""
from __future__ import annotations

from typing import Sequence

import torch

from tandem_rt._ext import _C  # noqa: F401  (registers torch.ops.tandem_rt.*)
from tandem_rt.ops._checks import check_tensors


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
    check_tensors(**{f"caches[{i}]": c for i, c in enumerate(caches)}, src_pages=src_pages, dst_pages=dst_pages)
    torch.ops.tandem_rt.copy_pages(list(caches), src_pages, dst_pages)


__all__ = ["copy_pages"]
