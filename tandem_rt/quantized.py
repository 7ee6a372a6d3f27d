"""Weights kept in their GGUF block quantization (Q8_0, Q4_0, Q4_1) for the CPU engine.

A decode step streams every weight of the primary once, so reading the GGUF blocks (4.5-8.5 bits
per weight) instead of a dequantised bf16 copy cuts the bytes of a step 2-3.5x. A
:class:`QuantMatrix` holds one ``[N, K]`` weight as GGUF stores it: ``blocks`` uint8
``[N, K / 32 * block_bytes]``, row ``n`` = the blocks of output ``n``; the products run in
``torch.ops.tandem_rt.linear_rows_q`` (``csrc/ops/linear_rows_q.cpp``, docs/KERNELS.md).

Block formats (ggml): Q8_0 34 bytes (fp16 d, int8 q[32]; w = d q), Q4_0 18 (d, 16 bytes of
nibbles; w = d (q - 8)), Q4_1 20 (d, m, nibbles; w = d q + m); nibble k < 16 is the low half of
byte k, nibble k >= 16 the high half of byte k - 16.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch

from tandem_rt.config import ModelConfig
from tandem_rt.ops.layer_math import QUANT_TYPES

PathLike = Union[str, Path]

# products of more rows than this dequantise the matrix and use torch's GEMM (prompts)
QUANT_ROWS_MAX = 64


class QuantMatrix(NamedTuple):
    """One ``[N, K]`` weight in GGUF blocks: ``blocks`` uint8 ``[N, K / 32 * block_bytes]``
    (contiguous), ``qtype`` a key of ``QUANT_TYPES``, ``in_features`` = K."""
    blocks: torch.Tensor
    qtype: str
    in_features: int

    @property
    def out_features(self) -> int:
        return self.blocks.shape[0]

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    def rows(self, start: int, end: Optional[int] = None) -> "QuantMatrix":
        """Outputs ``start:end`` (a view of the blocks)."""
        return QuantMatrix(self.blocks[start:end], self.qtype, self.in_features)


def make_quant_matrix(blocks: torch.Tensor, qtype: str, in_features: int) -> QuantMatrix:
    """Validate and wrap GGUF blocks (ValueError naming the problem)."""
    if qtype not in QUANT_TYPES:
        raise ValueError(f"qtype must be one of {sorted(QUANT_TYPES)}, got {qtype!r}")
    if in_features <= 0 or in_features % 32:
        raise ValueError(f"in_features must be a positive multiple of 32, got {in_features}")
    per_row = in_features // 32 * QUANT_TYPES[qtype][1]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != per_row:
        raise ValueError(f"blocks must be uint8 [N, {per_row}] for {qtype} with {in_features} inputs, "
                         f"got {blocks.dtype} {tuple(blocks.shape)}")
    return QuantMatrix(blocks.contiguous(), qtype, in_features)


def cat_rows(mats) -> QuantMatrix:
    """Matrices of one qtype and width stacked along the outputs (a fused QKV or gate/up)."""
    first = mats[0]
    if any(m.qtype != first.qtype or m.in_features != first.in_features for m in mats):
        raise ValueError("cat_rows needs matrices of one qtype and in_features, got "
                         f"{[(m.qtype, m.in_features) for m in mats]}")
    return QuantMatrix(torch.cat([m.blocks for m in mats], 0), first.qtype, first.in_features)


def dequantize(qm: QuantMatrix, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight the blocks stand for, ``[N, K]`` in ``dtype`` (fp32 arithmetic as ggml's)."""
    N, K = qm.out_features, qm.in_features
    b = qm.blocks.view(N, K // 32, QUANT_TYPES[qm.qtype][1])
    d = b[..., 0:2].contiguous().view(torch.float16).float()              # [N, nb, 1]
    if qm.qtype == "Q8_0":
        w = d * b[..., 2:34].contiguous().view(torch.int8).float()
    else:
        qs = b[..., 4:] if qm.qtype == "Q4_1" else b[..., 2:]
        q = torch.cat([qs & 15, qs >> 4], -1).float()                      # [N, nb, 32]
        if qm.qtype == "Q4_1":
            w = d * q + b[..., 2:4].contiguous().view(torch.float16).float()
        else:
            w = d * (q - 8)
    return w.reshape(N, K).to(dtype)


def quant_mm(x: torch.Tensor, w: QuantMatrix, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``add + x @ dequant(w)^T``: x ``[M, K]`` bf16 / fp32 CPU -> ``[M, N]``. Up to
    ``QUANT_ROWS_MAX`` rows by ``linear_rows_q`` (each row's result independent of the others),
    more (prompts) by torch's GEMM on a dequantised temporary."""
    if x.shape[0] <= QUANT_ROWS_MAX:
        return torch.ops.tandem_rt.linear_rows_q(x, w.blocks, QUANT_TYPES[w.qtype][0], add)
    dense = dequantize(w, x.dtype)
    return torch.mm(x, dense.t()) if add is None else torch.addmm(add, x, dense.t())


def embedding_rows(w: QuantMatrix, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` (int64 ``[T]``) of a quantized embedding table -> ``[T, K]`` in ``dtype``."""
    return dequantize(QuantMatrix(w.blocks.index_select(0, ids), w.qtype, w.in_features), dtype)


def read_gguf_matrices(path: PathLike, cfg: Optional[ModelConfig] = None) -> dict:
    """The 2-D Q8_0 / Q4_0 / Q4_1 weights of a llama GGUF file as :class:`QuantMatrix`, keyed by
    our (Hugging Face) parameter names, Q/K rows in the Hugging Face order (llama.cpp's converter
    permutes them; the permutation moves whole rows, so it is undone on the block rows). Other
    tensors (norms, F32 / F16 matrices) are not returned: the model holds them dense.

    Args:
        path: the GGUF file.
        cfg: its model config (default: read from the file's metadata).
    """
    from tandem_rt.gguf import _reader, gguf_model_config, gguf_to_hf_name, unpermute_qk

    cfg = cfg or gguf_model_config(path)
    reader = _reader(path)
    out = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        name = gguf_to_hf_name(t.name)
        if name is None or qtype not in QUANT_TYPES or len(t.shape) != 2:
            continue
        K, N = (int(v) for v in t.shape.tolist())            # ggml lists the inner dimension first
        blocks = torch.from_numpy(t.data.copy()).view(torch.uint8).reshape(N, -1)
        if ".self_attn.q_proj." in name:
            blocks = unpermute_qk(blocks, cfg.num_attention_heads).contiguous()
        elif ".self_attn.k_proj." in name:
            blocks = unpermute_qk(blocks, cfg.num_key_value_heads).contiguous()
        out[name] = make_quant_matrix(blocks, qtype, K)
    return out


__all__ = ["QuantMatrix", "make_quant_matrix", "cat_rows", "dequantize", "quant_mm", "embedding_rows",
           "read_gguf_matrices", "QUANT_ROWS_MAX"]
