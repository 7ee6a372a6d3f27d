"""Fused layer math for the CPU engine (``torch.ops.tandem_rt.rms_norm`` / ``silu_and_mul`` /
``linear_rows``).

On the CPU each ATen op of a small model's decode step pays the cache misses left by the
surrounding matmuls' weight streams; torch's ``rms_norm`` is a composite of ~6 of them and
``silu(gate) * up`` of 4, so one loop each makes a primary decode step of the bundled model ~20%
cheaper (docs/ENGINE.md). CPU only: on CUDA the engine uses torch's kernels (``linear_rows_q`` has
a CUDA kernel too). The ops check dtype, rank, shape and contiguity themselves, raising ValueError
naming the argument; the wrappers check only that the arguments are tensors on one device.
"""
from __future__ import annotations

import math

import torch

from tandem_rt import _ext  # noqa: F401  (loads tandem_rt._C, which registers the ops)
from tandem_rt.ops._checks import check_tensors


_CPU = torch.device("cpu")   # rms_norm, silu_and_mul and linear_rows have no CUDA kernel


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` per row, as ``tandem_rt.models.llama.RMSNorm``.

    Args:
        x: CPU ``[T, d]`` float32/float16/bfloat16 (rows may be strided).
        weight: ``[d]`` contiguous, dtype of ``x``.
        eps: finite, >= 0.
    Returns:
        new ``[T, d]`` tensor, dtype of ``x``: statistics and ``x / rms`` in fp32, rounded to the
        dtype, then multiplied by ``weight`` in the dtype.
    """
    check_tensors(_CPU, x=x, weight=weight)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return torch.ops.tandem_rt.rms_norm(x, weight, float(eps))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for a fused ``[T, 2 I]`` gate/up projection output (gate columns first).

    Args:
        gate_up: CPU ``[T, 2 I]`` float32/float16/bfloat16 (rows may be strided).
    Returns:
        new ``[T, I]`` tensor, dtype of ``gate_up``: SiLU in fp32 rounded to the dtype, then the
        product in fp32 rounded to the dtype (as ``F.silu(gate) * up``).
    """
    check_tensors(_CPU, gate_up=gate_up)
    return torch.ops.tandem_rt.silu_and_mul(gate_up)


def linear_rows(x: torch.Tensor, w: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """``add + x @ w.T`` for a few rows (decode / verify steps; any M works, up to ~32 is the
    intended use), fp32 accumulation, rounded once to the dtype. Each row's result is independent
    of the other rows (the same arithmetic whatever M is).

    Args:
        x: CPU bf16 or fp32 ``[M, K]`` (rows may be strided).
        w: ``[N, K]`` of x's dtype, contiguous (nn.Linear's layout).
        add: optional ``[N]`` (bias) or ``[M, N]`` (e.g. the residual) of x's dtype, contiguous columns.
    Returns:
        new ``[M, N]`` of x's dtype.
    """
    check_tensors(_CPU, x=x, w=w, add=add)
    return torch.ops.tandem_rt.linear_rows(x, w, add)


# GGUF block quantizations linear_rows_q reads: name -> (qtype code of the op, bytes per block of 32)
QUANT_TYPES = {"Q8_0": (0, 34), "Q4_0": (1, 18), "Q4_1": (2, 20)}


def linear_rows_q(x: torch.Tensor, w: torch.Tensor, qtype: str, add: torch.Tensor | None = None) -> torch.Tensor:
    """``add + x @ dequant(w).T`` for a few rows with a weight kept in its GGUF block quantization
    (dequantized in registers, fp32 accumulation, rounded once to x's dtype; each row's result is
    independent of the other rows).

    Args:
        x: bf16 or fp32 ``[M, K]``, ``K % 32 == 0`` (rows may be strided), on the CPU or a CUDA
            device (kernels/linear_rows_q.cuh: SIMT, dequantized in registers, 8 rows a pass).
        w: uint8 ``[N, K / 32 * block_bytes]`` contiguous: row n holds the blocks of output n, as
            GGUF stores an ``[N, K]`` tensor (``gguf.GGUFReader`` tensor ``.data``).
        qtype: ``"Q8_0"``, ``"Q4_0"`` or ``"Q4_1"`` (:data:`QUANT_TYPES`).
        add: optional ``[N]`` or ``[M, N]`` of x's dtype, contiguous columns.
    Returns:
        new ``[M, N]`` of x's dtype.
    """
    if qtype not in QUANT_TYPES:
        raise ValueError(f"qtype must be one of {sorted(QUANT_TYPES)}, got {qtype!r}")
    check_tensors(x=x, w=w, add=add)
    return torch.ops.tandem_rt.linear_rows_q(x, w, QUANT_TYPES[qtype][0], add)


def embedding_rows_q(table: torch.Tensor, ids: torch.Tensor, qtype: str, dtype: torch.dtype) -> torch.Tensor:
    """Rows of an embedding table kept in its GGUF block quantization, dequantized (CPU):
    ``quantized.dequantize``'s values (Q8_0 ``d * q``, Q4_0 ``d * (nib - 8)``, Q4_1 ``d * nib`` then
    ``+ m``, fp32), rounded once to ``dtype``.

    Args:
        table: uint8 ``[N, K / 32 * block_bytes]`` contiguous CPU tensor, GGUF block rows.
        ids: int64 ``[T]`` contiguous, each in ``[0, N)``.
        qtype: ``"Q8_0"``, ``"Q4_0"`` or ``"Q4_1"`` (:data:`QUANT_TYPES`).
        dtype: torch.float32, torch.bfloat16 or torch.float16.
    Returns:
        new ``[T, K]`` of ``dtype``.
    """
    if qtype not in QUANT_TYPES:
        raise ValueError(f"qtype must be one of {sorted(QUANT_TYPES)}, got {qtype!r}")
    return torch.ops.tandem_rt.embedding_rows_q(table, ids, QUANT_TYPES[qtype][0], dtype)


__all__ = ["rms_norm", "silu_and_mul", "linear_rows", "linear_rows_q", "embedding_rows_q", "QUANT_TYPES"]
