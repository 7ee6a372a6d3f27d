"""RoPE + paged KV cache write (``torch.ops.tandem_rt.rope_cache_write``)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from tandem_rt import _ext  # noqa: F401  (loads tandem_rt._C, which registers the ops)
from tandem_rt.ops._checks import check_tensors


def rope_cache_write(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, rope_theta: float,
                     q: Optional[torch.Tensor] = None) -> None:
    """Rotate K (and Q) in place at absolute positions and write K/V rows into their cache slots.

    RoPE follows the Hugging Face Llama rotate-half convention: ``inv_freq[i] = 1 / theta^(2i/D)``
    and ``angle = position * inv_freq`` in float32, the rotation computed in float32 and stored
    in the tensors' dtype (matches ``tandem_rt.models.llama.rope_cos_sin``/``apply_rope``).

    Args:
        k: ``[N, Hkv, D]`` float32/float16/bfloat16 keys, rotated in place. Heads must be packed
            (``stride[-1] == 1``, ``stride[-2] == D``); rows may be strided (views of a QKV output).
        v: ``[N, Hkv, D]`` values, same dtype and layout rules as ``k``.
        positions: int64 ``[N]`` absolute positions (>= 0).
        slot_mapping: int64 ``[N]`` cache slot per row, ``page * page_size + offset``; ``-1`` skips
            the row's cache write (the row is still rotated).
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]`` contiguous caches (NHD), same dtype;
            written in place.
        rope_theta: RoPE base (> 0).
        q: optional ``[N, Hq, D]`` queries, rotated in place.

    Raises ``ValueError`` naming the bad argument. Slot values and positions are range-checked
    by the CPU op; on CUDA (no host sync) an out-of-range slot is skipped.
    """
    check_tensors(k=k, v=v, positions=positions, slot_mapping=slot_mapping, k_cache=k_cache, v_cache=v_cache, q=q)
    if isinstance(rope_theta, bool) or not (isinstance(rope_theta, (int, float)) and math.isfinite(rope_theta)
                                            and rope_theta > 0):
        raise ValueError(f"rope_theta must be a positive number, got {rope_theta!r}")
    torch.ops.tandem_rt.rope_cache_write(k, v, positions, slot_mapping, k_cache, v_cache, float(rope_theta), q)
