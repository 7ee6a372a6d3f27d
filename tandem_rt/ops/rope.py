"""RoPE + paged KV cache write (``torch.ops.tandem_rt.rope_cache_write``)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from tandem_rt import _ext  # noqa: F401  (loads tandem_rt._C, which registers the ops)
from tandem_rt.ops._checks import FLOAT_DTYPES, check_heads_packed, check_shape, check_tensor


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
    check_tensor(k, "k", rank=3, dtype=FLOAT_DTYPES)
    dev, dt = k.device, k.dtype
    n, hkv, d = k.shape
    if d == 0 or d % 2:
        raise ValueError(f"k head_dim must be even and positive, got {d}")
    check_heads_packed(k, "k")
    check_tensor(v, "v", rank=3, dtype=dt, device=dev)
    check_shape(v, "v", k.shape)
    check_heads_packed(v, "v")
    for t, name in ((positions, "positions"), (slot_mapping, "slot_mapping")):
        check_tensor(t, name, rank=1, dtype=torch.int64, device=dev, contiguous=True)
        check_shape(t, name, (n,))
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        check_tensor(t, name, rank=4, dtype=dt, device=dev, contiguous=True)
        if t.shape[0] == 0 or t.shape[1] == 0 or tuple(t.shape[2:]) != (hkv, d):
            raise ValueError(f"{name} must have shape [num_pages > 0, page_size > 0, {hkv}, {d}], "
                             f"got {tuple(t.shape)}")
    check_shape(v_cache, "v_cache", k_cache.shape)
    if not (isinstance(rope_theta, (int, float)) and math.isfinite(rope_theta) and rope_theta > 0):
        raise ValueError(f"rope_theta must be a positive number, got {rope_theta!r}")
    if q is not None:
        check_tensor(q, "q", rank=3, dtype=dt, device=dev)
        if q.shape[0] != n or q.shape[2] != d or q.shape[1] == 0:
            raise ValueError(f"q must have shape [{n}, Hq > 0, {d}], got {tuple(q.shape)}")
        check_heads_packed(q, "q")
    torch.ops.tandem_rt.rope_cache_write(k, v, positions, slot_mapping, k_cache, v_cache, float(rope_theta), q)
