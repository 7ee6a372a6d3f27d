"""Paged attention for decode and verify blocks (``torch.ops.tandem_rt.paged_attention``)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from tandem_rt import _ext  # noqa: F401  (loads tandem_rt._C, which registers the ops)
from tandem_rt.ops._checks import check_tensors

# the CUDA attention kernels (the op's ``kernel`` argument): CUDA cores, every dtype; tensor cores
# (mma.sync + cp.async, fp16 / bf16, sm_80+; fp32 keeps the SIMT kernel)
ATTENTION_KERNELS = {"simt": 0, "mma": 1}


def attention_kernel_code(kernel: str) -> int:
    """The op's ``kernel`` integer for a name of :data:`ATTENTION_KERNELS` (ValueError otherwise)."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"kernel must be one of {sorted(ATTENTION_KERNELS)}, got {kernel!r}")
    return ATTENTION_KERNELS[kernel]


def check_waves(waves: int) -> int:
    """``waves`` (CTA waves the CUDA KV split aims for; 0 = the default, 8) checked: an int in 0..1024."""
    if isinstance(waves, bool) or not isinstance(waves, int) or not 0 <= waves <= 1024:
        raise ValueError(f"waves must be an int in 0..1024 (0: the default), got {waves!r}")
    return waves


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float, max_q_len: int,
                    max_seq_len: int, out: Optional[torch.Tensor] = None, row_invariant: bool = False,
                    kernel: str = "simt", waves: int = 0) -> torch.Tensor:
    """Causal attention of ragged query blocks over the paged KV cache (decode is ``q_len == 1``).

    Sequence ``b`` owns query rows ``query_start_loc[b] .. query_start_loc[b+1]-1`` (``q_len_b``,
    possibly 0). Its cache holds ``seq_lens[b]`` tokens, including the K/V of these queries
    (written before the call); query ``t`` sits at absolute position ``seq_lens[b] - q_len_b + t``
    and attends keys ``0 ..`` that position. Query head ``h`` reads KV head ``h // (Hq // Hkv)``
    (GQA). Softmax and accumulation in float32.

    Args:
        q: ``[Ntok, Hq, D]`` float32/float16/bfloat16 queries (heads packed; rows may be strided).
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]`` contiguous (NHD), dtype of ``q``;
            ``Hq % Hkv == 0``. On CUDA ``D`` must be one of 32, 64, 128.
        block_tables: int32 ``[B, max_pages_per_seq]``; row ``b`` lists sequence ``b``'s pages.
        seq_lens: int32 ``[B]`` tokens in the cache per sequence (>= its ``q_len``).
        query_start_loc: int32 ``[B + 1]``, ``0 = query_start_loc[0] <= ... <= query_start_loc[B] = Ntok``.
        scale: softmax scale (usually ``D ** -0.5``).
        max_q_len: host-side upper bound of ``q_len_b`` (grid sizing; no host sync).
        max_seq_len: host-side upper bound of ``seq_lens`` (chooses the KV split on CUDA).
        out: optional ``[Ntok, Hq, D]`` contiguous output, dtype of ``q``.
        row_invariant: CPU: every query row computed by the per-row kernels, so its result depends
            only on its own position and cache, not on the other rows of its block (a verify row
            equals its decode); off, blocks of many rows use faster kernels (rows in vector lanes,
            GEMM over long contexts) whose rounding differs. Ignored on CUDA.
        kernel: CUDA: ``"simt"`` (CUDA cores, default) or ``"mma"`` (tensor cores for fp16 / bf16 on
            sm_80+; fp32 keeps SIMT); :data:`ATTENTION_KERNELS`. Checked, not used, on the CPU.
        waves: CUDA: CTA waves per SM the KV split aims for (0: the default, 8); a tuning option.
    Returns:
        ``out`` ``[Ntok, Hq, D]``.

    Raises ``ValueError`` naming the bad argument. Index values (pages, lengths, offsets) are
    checked by the CPU op (ValueError naming the tensor); on CUDA out-of-range pages are skipped, not read.
    """
    dev = check_tensors(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens,
                        query_start_loc=query_start_loc, out=out)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    for val, name in ((max_q_len, "max_q_len"), (max_seq_len, "max_seq_len")):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    if not isinstance(row_invariant, bool):
        raise ValueError(f"row_invariant must be True or False, got {row_invariant!r}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=dev)
    torch.ops.tandem_rt.paged_attention(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                        float(scale), int(max_q_len), int(max_seq_len), row_invariant,
                                        attention_kernel_code(kernel), check_waves(waves))
    return out

