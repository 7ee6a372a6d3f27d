"""Paged K/V pools of one model and the page budget for a memory size.

Layout (every op of ``tandem_rt.ops`` uses it): per layer ``l``, ``k[l]`` and ``v[l]`` are
``[num_pages, page_size, num_kv_heads, head_dim]`` (NHD) tensors. All ``2 * num_layers`` tensors
are contiguous views into one allocation, so they can be handed to ``copy_pages`` as a list.
"""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["KVCache", "pages_for_memory"]

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)} or a torch.dtype, got {dtype!r}")
        return _DTYPE_NAMES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class KVCache:
    """K and V pools of one model.

    Args:
        num_layers, num_pages, page_size, num_kv_heads, head_dim: pool geometry (positive ints).
        dtype: floating ``torch.dtype`` (or ``"float32"``/``"float16"``/``"bfloat16"``).
        device: device of the pools.

    Attributes:
        k, v: lists of ``num_layers`` tensors ``[num_pages, page_size, num_kv_heads, head_dim]``
            of ``dtype`` on ``device``, zero-initialised, each contiguous.
    """

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype=torch.bfloat16, device="cpu") -> None:
        self.num_layers = _positive(num_layers, "num_layers")
        self.num_pages = _positive(num_pages, "num_pages")
        self.page_size = _positive(page_size, "page_size")
        self.num_kv_heads = _positive(num_kv_heads, "num_kv_heads")
        self.head_dim = _positive(head_dim, "head_dim")
        self.dtype = _dtype(dtype)
        # One allocation [2, num_layers, num_pages, page_size, num_kv_heads, head_dim].
        self._storage = torch.zeros(2, num_layers, num_pages, page_size, num_kv_heads, head_dim,
                                    dtype=self.dtype, device=device)
        self.device = self._storage.device
        self.k: list[torch.Tensor] = [self._storage[0, l] for l in range(num_layers)]
        self.v: list[torch.Tensor] = [self._storage[1, l] for l in range(num_layers)]

    @classmethod
    def for_model(cls, cfg, num_pages: int, page_size: int, dtype=torch.bfloat16, device="cpu") -> "KVCache":
        """Pools for a :class:`tandem_rt.config.ModelConfig` (layers, KV heads, head_dim taken from it)."""
        return cls(cfg.num_hidden_layers, num_pages, page_size, cfg.num_key_value_heads, cfg.head_dim,
                   dtype, device)

    def tensors(self) -> list[torch.Tensor]:
        """Every K and V tensor (``k[0..L-1]`` then ``v[0..L-1]``), e.g. for ``copy_pages``."""
        return self.k + self.v

    @property
    def nbytes(self) -> int:
        """Bytes held by all pools of this cache."""
        return self._storage.numel() * self._storage.element_size()

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype) -> int:
        """Bytes one page takes over all layers, K and V: ``2 * L * P * H_kv * D * itemsize``."""
        itemsize = torch.empty((), dtype=_dtype(dtype)).element_size()
        return (2 * _positive(num_layers, "num_layers") * _positive(page_size, "page_size")
                * _positive(num_kv_heads, "num_kv_heads") * _positive(head_dim, "head_dim") * itemsize)


def pages_for_memory(memory_bytes: int, page_size: int, model_cfgs: Iterable, dtype, extra_per_page: int = 0) -> int:
    """Pages that fit in ``memory_bytes`` when every model in ``model_cfgs`` keeps a pool.

    A page id is shared by all models (one page table per sequence), so one page costs the sum
    of :meth:`KVCache.bytes_per_page` over the models. ``model_cfgs`` holds objects with
    ``num_hidden_layers``, ``num_key_value_heads`` and ``head_dim`` (e.g. ``ModelConfig``);
    ``extra_per_page``: bytes per page of other per-position pools (the Tandem feature pool).

    Returns:
        ``memory_bytes // sum(bytes_per_page)`` (may be 0).
    """
    if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes < 0:
        raise ValueError(f"memory_bytes must be a non-negative integer, got {memory_bytes!r}")
    cfgs = list(model_cfgs)
    if not cfgs:
        raise ValueError("model_cfgs must hold at least one model config")
    if isinstance(extra_per_page, bool) or not isinstance(extra_per_page, int) or extra_per_page < 0:
        raise ValueError(f"extra_per_page must be a non-negative integer, got {extra_per_page!r}")
    per_page = extra_per_page
    for i, cfg in enumerate(cfgs):
        try:
            per_page += KVCache.bytes_per_page(cfg.num_hidden_layers, page_size, cfg.num_key_value_heads,
                                               cfg.head_dim, dtype)
        except AttributeError as exc:
            raise ValueError(f"model_cfgs[{i}] lacks a field: {exc}") from None
    return memory_bytes // per_page
