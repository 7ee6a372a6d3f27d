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

from tandem_rt._ext import _C
from tandem_rt.config import ModelConfig
from tandem_rt.ops.layer_math import QUANT_TYPES

PathLike = Union[str, Path]

# products of more rows than this dequantise the matrix and use torch's GEMM (prompts)
QUANT_ROWS_MAX = 64


class QuantMatrix(NamedTuple):
    """One ``[N, K]`` weight in GGUF blocks: ``blocks`` uint8 ``[N, K / 32 * block_bytes]``
    (contiguous), ``qtype`` a key of ``QUANT_TYPES``, ``in_features`` = K; ``packed``: the same
    blocks repacked 16 outputs at a time (:func:`pack_rows16`, :func:`with_packed`) for
    ``linear_rows_q16``, or None. A packed matrix may drop its ``blocks`` (None): they are then
    recovered from ``packed`` when needed (:meth:`block_rows`)."""
    blocks: Optional[torch.Tensor]
    qtype: str
    in_features: int
    packed: Optional[torch.Tensor] = None

    @property
    def out_features(self) -> int:
        return self.blocks.shape[0] if self.blocks is not None else self.packed.shape[0] * 16

    @property
    def nbytes(self) -> int:
        """Bytes a product reads (the blocks, or the packed layout: the same count)."""
        return self.blocks.nbytes if self.blocks is not None else self.packed.nbytes

    def block_rows(self) -> torch.Tensor:
        """The GGUF block rows ``[N, K / 32 * block_bytes]`` (unpacked from ``packed`` if dropped)."""
        if self.blocks is not None:
            return self.blocks
        return unpack_rows16(self.packed, self.qtype)

    def to(self, device) -> "QuantMatrix":
        """The block rows on ``device`` (not packed: the packed layout is for the CPU kernels)."""
        rows = self.block_rows()
        if rows.device == torch.device(device) and self.packed is None:
            return self
        return QuantMatrix(rows.to(device), self.qtype, self.in_features)

    def rows(self, start: int, end: Optional[int] = None) -> "QuantMatrix":
        """Outputs ``start:end``: a slice of the packed layout when it has dropped its block rows and
        both ends fall on groups of 16 outputs (no copy), else the block rows (not packed)."""
        stop = self.out_features if end is None else end
        if self.blocks is None and start % 16 == 0 and stop % 16 == 0:
            return QuantMatrix(None, self.qtype, self.in_features, self.packed[start // 16:stop // 16])
        return QuantMatrix(self.block_rows()[start:end], self.qtype, self.in_features)


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


PACK16_TYPES = ("Q8_0", "Q4_1")     # qtypes linear_rows_q16 reads repacked 16 outputs at a time


def pack_rows16(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """GGUF blocks ``[N, K/32 * bytes]`` (Q8_0 / Q4_1, ``N % 16 == 0``) -> the layout of
    ``linear_rows_q16``: uint8 ``[N/16, K/32 * group_bytes]``; per group of 16 outputs and block:
    the 16 fp16 scales ``d`` (Q4_1: then the 16 mins ``m``), then the weight bytes in 64-byte
    registers whose int32 lane ``o`` holds output ``o``'s bytes ``4t .. 4t+3`` (Q4_1: the 16
    nibble bytes, 4 registers; Q8_0: the 32 values + 128, 8 registers). See
    ``csrc/ops/linear_rows_q16.cpp``."""
    if qtype not in PACK16_TYPES:
        raise ValueError(f"pack_rows16 packs {', '.join(PACK16_TYPES)}, got {qtype!r}")
    size = QUANT_TYPES[qtype][1]
    N = blocks.shape[0]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or N % 16 or blocks.shape[1] % size:
        raise ValueError(f"blocks must be uint8 [N, K/32 * {size}] with N a multiple of 16, got "
                         f"{blocks.dtype} {tuple(blocks.shape)}")
    nb = blocks.shape[1] // size
    b = blocks.reshape(N // 16, 16, nb, size).transpose(1, 2)               # [G, nb, 16, size]
    d = b[..., 0:2].reshape(N // 16, nb, 32)
    if qtype == "Q4_1":
        m = b[..., 2:4].reshape(N // 16, nb, 32)
        q = b[..., 4:].reshape(N // 16, nb, 16, 4, 4).transpose(2, 3)        # [G, nb, t, o, 4]
        parts = [d, m, q.reshape(N // 16, nb, 256)]
    else:
        q = (b[..., 2:] ^ 0x80).reshape(N // 16, nb, 16, 8, 4).transpose(2, 3)  # q + 128 as uint8
        parts = [d, q.reshape(N // 16, nb, 512)]
    return torch.cat(parts, -1).reshape(N // 16, -1).contiguous()


def unpack_rows16(packed: torch.Tensor, qtype: str) -> torch.Tensor:
    """The inverse of :func:`pack_rows16`: ``[N/16, K/32 * group_bytes]`` -> GGUF blocks
    ``[N, K/32 * block_bytes]``."""
    G = packed.shape[0]
    if qtype == "Q4_1":
        p = packed.reshape(G, -1, 320)
        nb = p.shape[1]
        d = p[..., 0:32].reshape(G, nb, 16, 2)
        m = p[..., 32:64].reshape(G, nb, 16, 2)
        q = p[..., 64:].reshape(G, nb, 4, 16, 4).transpose(2, 3).reshape(G, nb, 16, 16)
        b = torch.cat([d, m, q], -1)                                         # [G, nb, 16, 20]
    elif qtype == "Q8_0":
        p = packed.reshape(G, -1, 544)
        nb = p.shape[1]
        d = p[..., 0:32].reshape(G, nb, 16, 2)
        q = (p[..., 32:].reshape(G, nb, 8, 16, 4).transpose(2, 3).reshape(G, nb, 16, 32)) ^ 0x80
        b = torch.cat([d, q], -1)                                            # [G, nb, 16, 34]
    else:
        raise ValueError(f"unpack_rows16 unpacks {', '.join(PACK16_TYPES)}, got {qtype!r}")
    return b.transpose(1, 2).reshape(G * 16, -1).contiguous()


def packs16() -> bool:
    """Whether this CPU runs one of ``linear_rows_q16``'s int8 kernels (AVX-512 VNNI or AVX2; the
    packed layout does not pay for the portable loops)."""
    return bool(_C.cpu_kernels()["int8_packed_rows"])


def with_packed(qm: QuantMatrix, keep_blocks: bool = True) -> QuantMatrix:
    """``qm`` with its :func:`pack_rows16` layout when the qtype and ``N % 16 == 0`` allow it (else
    ``qm`` unchanged); ``keep_blocks=False`` drops the block rows (half the memory; products of
    more than ``QUANT_ROWS_MAX`` rows then unpack them per call)."""
    if qm.qtype not in PACK16_TYPES or qm.out_features % 16 or qm.packed is not None:
        return qm
    return qm._replace(packed=pack_rows16(qm.blocks, qm.qtype), blocks=qm.blocks if keep_blocks else None)


def cat_rows(mats) -> QuantMatrix:
    """Matrices of one qtype and width stacked along the outputs (a fused QKV or gate/up)."""
    first = mats[0]
    if any(m.qtype != first.qtype or m.in_features != first.in_features for m in mats):
        raise ValueError("cat_rows needs matrices of one qtype and in_features, got "
                         f"{[(m.qtype, m.in_features) for m in mats]}")
    return QuantMatrix(torch.cat([m.block_rows() for m in mats], 0), first.qtype, first.in_features)


def dequantize(qm: QuantMatrix, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight the blocks stand for, ``[N, K]`` in ``dtype`` (fp32 arithmetic as ggml's)."""
    N, K = qm.out_features, qm.in_features
    b = qm.block_rows().view(N, K // 32, QUANT_TYPES[qm.qtype][1])
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


# few-row kernels of a quantized product (``rows_kernel``; the codes of ``_C.cpu.DecoderPlan``)
ROWS_Q16, ROWS_Q = 1, 2


def rows_kernel(w: QuantMatrix) -> tuple:
    """The few-row kernel of ``w`` and its operand: ``(ROWS_Q16, w.packed)`` (``linear_rows_q16``)
    when packed, else ``(ROWS_Q, w.block_rows())`` (``linear_rows_q``). The one place that chooses,
    for :func:`quant_mm` and the decoder plan alike."""
    return (ROWS_Q16, w.packed) if w.packed is not None else (ROWS_Q, w.block_rows())


def quant_mm(x: torch.Tensor, w: QuantMatrix, add: Optional[torch.Tensor] = None,
             any_rows: bool = False) -> torch.Tensor:
    """``add + x @ dequant(w)^T``: x ``[M, K]`` bf16 / fp32 on the CPU or a CUDA device (``w`` on
    the same) -> ``[M, N]``. Up to ``QUANT_ROWS_MAX`` rows, or any number with ``any_rows``, by the
    kernel of :func:`rows_kernel` on the CPU (each row's result independent of the others: the
    int8-activation scheme) or the ``linear_rows_q`` op's CUDA kernel; more rows otherwise (prompts)
    by torch's GEMM on a dequantised temporary, whose results differ from the kernel's. Decode,
    draft and verify steps pass ``any_rows`` (``PagedLlama.step_mm``), so that a verify row equals
    its decode row whatever else rides in the step."""
    if any_rows or x.shape[0] <= QUANT_ROWS_MAX:
        if x.device.type == "cuda":
            return torch.ops.tandem_rt.linear_rows_q(x, w.block_rows(), QUANT_TYPES[w.qtype][0], add)
        kernel, operand = rows_kernel(w)
        op = _C.cpu.linear_rows_q16 if kernel == ROWS_Q16 else _C.cpu.linear_rows_q
        return op(x, operand, QUANT_TYPES[w.qtype][0], add)
    dense = dequantize(w, x.dtype)
    return torch.mm(x, dense.t()) if add is None else torch.addmm(add, x, dense.t())


DRAFT_QUANT_TYPES = ("Q8_0", "Q4_1")   # what a drafting model's matrices may be quantized to at load


def quantize_drafting_model(model, qtype: str) -> tuple:
    """Weight-only block quantization of a drafting model (the Tandem secondary or the standalone
    drafter, a ``LlamaForCausalLM``) for :class:`PagedLlama`'s ``quantized`` / ``quantized_head``.

    Args:
        model: the drafting model (its weights bf16 / fp32, any device).
        qtype: ``"Q8_0"`` or ``"Q4_1"`` (``DRAFT_QUANT_TYPES``).
    Returns:
        ``(layers, head)``: ``{parameter name: QuantMatrix}`` of every decoder-layer matrix with a
        multiple of 32 inputs (attention and MLP projections, ``[out, in]``), and the LM head's rows
        as a QuantMatrix (``[N, d]``: the rows of ``vocab_subset`` for a reduced vocabulary, else
        ``[V, d]``; None when ``d`` is not a multiple of 32). Token embeddings stay dense (their
        lookups read one row). Blocks by the ``gguf`` package's reference quantizer
        (``checkpoint.quantize_blocks``, bit-exact with ggml's); on the CPU.
    """
    from tandem_rt.checkpoint import quantize_blocks

    if qtype not in DRAFT_QUANT_TYPES:
        raise ValueError(f"qtype must be one of {list(DRAFT_QUANT_TYPES)}, got {qtype!r}")
    layers = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and name.startswith("model.layers.") and p.shape[1] % 32 == 0:
                layers[name] = make_quant_matrix(quantize_blocks(p.float().cpu(), qtype), qtype, p.shape[1])
        w = model.output_weight.detach()
        subset = getattr(model, "vocab_subset", None)
        if subset is not None:
            w = w.index_select(0, subset.to(w.device))
        head = None if w.shape[1] % 32 else make_quant_matrix(quantize_blocks(w.float().cpu(), qtype), qtype,
                                                              w.shape[1])
    return layers, head


def embedding_rows(w: QuantMatrix, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` (int64 ``[T]``, each in ``[0, N)``) of a quantized embedding table ``w``
    (``[N, K]``) -> ``[T, K]`` in ``dtype`` (fp32 / bf16 / fp16): :func:`dequantize`'s values. On
    the CPU the ``embedding_rows_q`` op (one loop; the dequantisation's ~10 tensor ops cost ~0.3 ms
    per decode step), elsewhere :func:`dequantize` of the selected rows."""
    if ids.device.type == "cpu" and w.blocks is not None:
        return _C.cpu.embedding_rows_q(w.blocks, ids, QUANT_TYPES[w.qtype][0], dtype)
    return dequantize(QuantMatrix(w.block_rows().index_select(0, ids), w.qtype, w.in_features), dtype)


def read_gguf_matrices(path: PathLike, cfg: Optional[ModelConfig] = None) -> dict:
    """The 2-D Q8_0 / Q4_0 / Q4_1 weights of a llama GGUF file as :class:`QuantMatrix`, keyed by
    our (Hugging Face) parameter names, Q/K rows in the Hugging Face order (llama.cpp's converter
    permutes them; the permutation moves whole rows, so it is undone on the block rows). Other
    tensors (norms, F32 / F16 matrices) are not returned: the model holds them dense.

    Args:
        path: the GGUF file.
        cfg: its model config (default: read from the file's metadata).
    """
    from tandem_rt.gguf import _config_from_reader, _reader, gguf_to_hf_name, unpermute_qk

    reader = _reader(path)   # the index: no tokenizer strings decoded; a truncated tensor is refused
    cfg = cfg or _config_from_reader(reader)
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


__all__ = ["QuantMatrix", "make_quant_matrix", "pack_rows16", "unpack_rows16", "PACK16_TYPES", "packs16", "with_packed", "cat_rows", "dequantize", "quant_mm", "embedding_rows",
           "read_gguf_matrices", "QUANT_ROWS_MAX"]
