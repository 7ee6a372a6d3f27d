"""One paged forward per Llama model, used by every generation mode.

Embeddings -> per layer: RMSNorm -> fused QKV matmul -> ``rope_cache_write`` (rotates Q/K in
place, writes K/V into the pool) -> ``paged_attention`` -> o_proj + residual (one addmm) -> RMSNorm
-> fused gate/up matmul -> SiLU * up -> down + residual (one addmm).
Weights are the reference :class:`~tandem_rt.models.llama.LlamaForCausalLM` modules' own tensors,
held as ``[in, out]`` matrices (stored that way on the CPU, see ``input_major``); the fused QKV
(and bias) and gate/up matrices are concatenated once at construction and the modules' parameters
become views of them, so no weight is stored twice.

A forward processes a *ragged batch of query rows*: sequence ``b`` contributes the rows
``query_start_loc[b] : query_start_loc[b+1]`` at absolute positions ``seq_lens[b] - q_len_b + t``
(the last ``q_len_b`` positions of its ``seq_lens[b]``), causal inside the rows, attending to the
pool entries of all earlier positions. ``slot_mapping[r] = -1`` runs a row as a query only, without
writing its K/V (used when the pool already holds a primary-derived entry for that position).

Prompt prefill from position 0 (``meta.dense``) still writes every row's K/V into the pool but
computes attention densely: each sequence's rows attend causally to themselves only
(``dense_causal_attention``, torch SDPA), so a whole prompt of any length is one forward instead
of chunks of at most 32 rows (``paged_attention``'s query limit).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from tandem_rt._ext import _C
from tandem_rt.config import FEATURE_AT
from tandem_rt.models.llama import LlamaForCausalLM, scatter_vocab
from tandem_rt.ops.attention import attention_kernel_code, check_waves
from tandem_rt.quantized import (QuantMatrix, cat_rows, embedding_rows, packs16, quant_mm,
                                 with_packed)

# the CPU step ops without the torch dispatcher (csrc/ops/direct.h): same checks, no dispatcher host work
_cpu = _C.cpu


@dataclass
class ForwardMeta:
    """Indices of one paged forward (all on the model's device).

    Attributes:
        positions: int64 ``[T]`` absolute position of each query row.
        slot_mapping: int64 ``[T]`` pool slot (``page * page_size + offset``) each row writes, -1 = none.
        block_tables: int32 ``[B, max_pages]`` page table rows (shared by every pool).
        seq_lens: int32 ``[B]`` positions each sequence attends over (its last row's position + 1).
        query_start_loc: int32 ``[B + 1]`` row offsets of the sequences.
        max_q_len: rows of the longest sequence (host int).
        max_seq_len: ``max(seq_lens)`` (host int).
        last_rows: int64 ``[B]`` index of each sequence's last row (for next-token logits).
        uniform_q_len: rows per sequence when every sequence has the same number, else 0
            (uniform layouts can replay a captured CUDA graph).
        row_splits: host list of the ``B + 1`` row offsets (``query_start_loc`` on the host).
        dense: every sequence's rows are its positions ``0 .. q_len - 1`` (a prompt with no cached
            prefix): attention runs densely over the rows (see ``dense_causal_attention``).
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_q_len: int
    max_seq_len: int
    last_rows: torch.Tensor
    uniform_q_len: int = 0
    row_splits: tuple = ()
    dense: bool = False

    @property
    def num_rows(self) -> int:
        return self.positions.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


def h2d(values, dtype: torch.dtype, device) -> torch.Tensor:
    """Host list / CPU tensor -> tensor on ``device``; on CUDA through pinned memory with a
    non-blocking copy, so the host never waits for queued device work."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def build_meta(page_manager, seq_ids: Sequence, starts: Sequence[int], ends: Sequence[int],
               write_from: Sequence[int], device, block_tables: Optional[torch.Tensor] = None,
               dense: bool = False) -> ForwardMeta:
    """Host-side construction of :class:`ForwardMeta` (one host->device copy per tensor).

    Sequence ``seq_ids[b]`` queries positions ``[starts[b], ends[b])`` and writes K/V only for
    positions ``>= write_from[b]`` (the others must already be in the pool). Every written slot
    must have been made writable with ``page_manager.prepare_write`` first. ``dense=True`` (prompt
    prefill) needs ``starts`` and ``write_from`` all 0 and lifts the 32-row limit per sequence.
    """
    if dense and (any(s != 0 for s in starts) or any(w != 0 for w in write_from)):
        raise ValueError("dense prefill needs every sequence to start (and write) at position 0")
    positions: list[int] = []
    slots: list[int] = []
    qsl = [0]
    for sid, s, e, w in zip(seq_ids, starts, ends, write_from):
        if e <= s:
            raise ValueError(f"sequence {sid!r}: empty query range [{s}, {e})")
        positions.extend(range(s, e))
        if w >= e:
            slots.extend([-1] * (e - s))
        else:
            w = max(w, s)
            slots.extend([-1] * (w - s))
            slots.extend(page_manager.slot_mapping(sid, w, e))
        qsl.append(qsl[-1] + e - s)
    ends_l = list(ends)
    if block_tables is None:
        block_tables = h2d(page_manager.block_table(list(seq_ids)), torch.int32, device)
    qlens = [e - s for s, e in zip(starts, ends)]
    max_q = max(qlens)
    uniform = max_q if min(qlens) == max_q else 0
    # one host->device copy per dtype: pack the int64 and the int32 indices together
    packed = h2d(positions + slots + [q - 1 for q in qsl[1:]], torch.int64, device)
    T = len(positions)
    small = h2d(ends_l + qsl, torch.int32, device)
    B = len(ends_l)
    return ForwardMeta(positions=packed[:T], slot_mapping=packed[T:2 * T], block_tables=block_tables,
                       seq_lens=small[:B], query_start_loc=small[B:], max_q_len=max_q,
                       max_seq_len=max(ends_l), last_rows=packed[2 * T:], uniform_q_len=uniform,
                       row_splits=tuple(qsl), dense=dense)


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_splits: Sequence[int],
                           scale: float) -> torch.Tensor:
    """Causal self-attention of each sequence's rows over its own rows (prefill from position 0).

    Args:
        q: ``[T, Hq, D]`` rotated queries (may be a row-strided view), float32/bf16/fp16.
        k, v: ``[T, Hkv, D]`` rotated keys and values of the same rows (``Hq % Hkv == 0``).
        row_splits: host ints, the ``B + 1`` row offsets of the sequences.
        scale: softmax scale.
    Returns:
        ``[T, Hq, D]`` contiguous, dtype of ``q``.
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    gqa = q.shape[1] != k.shape[1]
    for s, e in zip(row_splits[:-1], row_splits[1:]):
        if e > s:
            o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                               v[s:e].transpose(0, 1), is_causal=True, scale=scale,
                                               enable_gqa=gqa)
            out[s:e] = o.transpose(0, 1)
    return out


class _LayerWeights(NamedTuple):
    """One decoder layer's tensors as the paged forward uses them. Matrices are ``[in, out]``
    (``x @ w``, :func:`input_major`), or with ``PagedLlama.rows_layout`` (bf16 / fp32 on the CPU) the
    modules' own ``[out, in]`` layout for :func:`mm_rows`; shapes below are for ``[in, out]``."""
    ln1: torch.Tensor            # [d] input RMSNorm weight
    w_qkv: torch.Tensor          # [d, q_size + 2 kv_size]: q, k, v columns
    b_qkv: Optional[torch.Tensor]  # [q_size + 2 kv_size] or None
    w_o: torch.Tensor            # [q_size, d]
    ln2: torch.Tensor            # [d] post-attention RMSNorm weight
    w_gate_up: torch.Tensor      # [d, 2 I]: gate columns, then up columns
    w_down: torch.Tensor         # [I, d]


def input_major(params: Sequence[torch.Tensor], contiguous: bool) -> torch.Tensor:
    """The ``[in, out]`` matrix of one or more ``[out_i, in]`` weights stacked along ``out``.

    With ``contiguous`` (the CPU) the matrix is stored ``[in, out]`` and every parameter becomes a
    (transposed) view of it, so it remains the only copy: torch's CPU GEMM keeps the cost of a
    ``[M, in] @ [in, out]`` product nearly flat for M = 1..8 on this layout, while ``F.linear`` on
    ``[out, in]`` weights jumps from M = 4 (measured: verify blocks of 4+ rows cost 1.5x a decode).
    Otherwise (CUDA, where cuBLAS takes either layout) it is a transposed view; several parameters
    are concatenated once and become views of the result. Parameters must be ``nn.Parameter`` or
    plain tensors of the same dtype and device.
    """
    if len(params) == 1 and not contiguous:
        return params[0].detach().t()
    fused = torch.cat([p.detach() for p in params], 0)      # [sum out_i, in]
    mat = fused.t().contiguous() if contiguous else fused.t()
    _rebind_rows(params, mat.t())                            # [sum out_i, in] view of mat
    return mat


def fuse_rows(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Parameters (weights ``[out_i, in]`` or biases ``[out_i]``) concatenated along dim 0; each
    becomes a view of the result (no second copy). One parameter is returned as it is."""
    if len(params) == 1:
        return params[0].detach()
    fused = torch.cat([p.detach() for p in params], 0)
    _rebind_rows(params, fused)
    return fused



def _rebind_rows(params: Sequence[torch.Tensor], stacked: torch.Tensor) -> None:
    """Make ``params[i]`` the view of its rows of ``stacked`` (the parameters stacked along dim 0)."""
    row = 0
    for p in params:
        p.data = stacked[row:row + p.shape[0]]
        row += p.shape[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, cpu_ops: bool) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim, statistics in fp32.
    x: ``[T, d]``, weight ``[d]``, same dtype and device. ``cpu_ops``: our one-loop CPU op
    (``csrc/ops/rms_norm.cpp``), else torch's ``rms_norm`` (one fused kernel on CUDA)."""
    if cpu_ops:
        return _cpu.rms_norm(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def silu_and_mul(gate_up: torch.Tensor, cpu_ops: bool) -> torch.Tensor:
    """``silu(gate) * up`` of a fused ``[T, 2 I]`` gate/up output -> ``[T, I]`` (``cpu_ops``: one
    op, ``csrc/ops/silu_and_mul.cpp``)."""
    if cpu_ops:
        return _cpu.silu_and_mul(gate_up)
    inter = gate_up.shape[-1] // 2
    return F.silu(gate_up[:, :inter]) * gate_up[:, inter:]


# prompt products of at most this many rows use tandem_rt::linear_rows, per dtype (where it is
# faster than torch's GEMM: tools/bench_kernels.py --only layer_math, docs/KERNELS.md); decode /
# draft / verify steps use it for any row count (PagedLlama.step_mm)
LINEAR_ROWS_MAX = {torch.bfloat16: 32, torch.float32: 8}
ROWS_LAYOUT_DTYPES = tuple(LINEAR_ROWS_MAX)  # dtypes linear_rows takes


def mm(x: torch.Tensor, w: torch.Tensor, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``add + x @ w`` (one GEMM): x ``[M, in]``, w ``[in, out]``, add ``[M, out]`` or ``[out]``."""
    return torch.mm(x, w) if add is None else torch.addmm(add, x, w)


def mm_rows(x: torch.Tensor, w: torch.Tensor, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``add + x @ w^T`` for a contiguous ``[out, in]`` bf16 / fp32 CPU weight ``w``: our
    ``linear_rows`` op (``csrc/ops/linear_rows.cpp``) for at most ``LINEAR_ROWS_MAX[dtype]`` rows (it
    streams the weight near the memory bound and each row's result is independent of the other
    rows), torch's GEMM for more (prompts)."""
    if x.shape[0] <= LINEAR_ROWS_MAX[x.dtype]:
        return _cpu.linear_rows(x, w, add)
    return torch.mm(x, w.t()) if add is None else torch.addmm(add, x, w.t())


def linear_rows_any(x: torch.Tensor, w: torch.Tensor, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``add + x @ w^T`` by ``linear_rows`` for any row count (``[out, in]`` bf16 / fp32 CPU weight)."""
    return _cpu.linear_rows(x, w, add)


def with_quantized(base, any_rows: bool = False):
    """``base(x, w, add)`` for dense weights, :func:`tandem_rt.quantized.quant_mm` for a QuantMatrix
    (``any_rows``: its few-row kernel for any row count, as a step's products need)."""
    def mm_any(x, w, add=None):
        return quant_mm(x, w, add, any_rows) if isinstance(w, QuantMatrix) else base(x, w, add)
    return mm_any


class PagedLlama:
    """Paged forward of one :class:`LlamaForCausalLM` over its K/V pool.

    The forward calls functional ops on the model's tensors (no ``nn.Module`` calls: their
    dispatch cost is a visible share of a small model's decode step on the CPU) and the
    ``torch.ops.tandem_rt`` ops directly: the engine builds their arguments itself and the C++ ops
    validate every argument again (ValueError naming it), so the Python wrappers' checks are skipped.
    Weight matrices are held ``[in, out]`` (:func:`input_major`); the modules' parameters become
    views of them, so the reference model keeps working and no weight is stored twice.

    Args:
        model: the reference model; its tensors are used as they are (same device and dtype).
        cpu_layout: our fused CPU ops for RMSNorm and SiLU * up, and the weights ``[out, in]`` for
            ``linear_rows`` (bf16 / fp32; fp16: contiguous ``[in, out]`` for torch's GEMM), default:
            when the model is on the CPU. ``False`` is the CUDA code path (transposed views, torch's ops);
            tests run it on the CPU too.
        quantized: optional ``{parameter name: QuantMatrix}`` (``tandem_rt.quantized.read_gguf_matrices``;
            CPU, bf16 / fp32 compute): these weights are used as their GGUF blocks
            (``linear_rows_q``) instead of the module's dense parameters. A fused group (Q/K/V,
            gate/up) is quantized only when all its members are, in one qtype; a quantized token
            embedding serves the lookups and, when tied, the LM head. On a CPU with VNNI the Q8_0 /
            Q4_1 matrices are repacked 16 outputs at a time (``linear_rows_q16``) and their block
            rows dropped (a quantized embedding keeps its own for the lookups; products of more
            than 64 rows unpack them per call).
        quantized_head: optional QuantMatrix of the LM head's rows (``[N, d]``: the ``vocab_subset``
            rows for a reduced vocabulary, else ``[V, d]``; ``quantized.quantize_drafting_model``),
            used instead of the dense head while the token embeddings stay dense.
        decoder_plan: run the decoder layers of a step (``forward(step=True)``, any row count, paged
            attention) in one C++ call (``_C.cpu.DecoderPlan``, the same ops in the same order:
            bit-identical) instead of ~8 op calls per layer from Python; with several torch threads
            the call runs the step's layers as one team of threads (``csrc/ops/team.h``); default:
            with the CPU layout of ``linear_rows`` (bf16 / fp32 on the CPU).
        feature_at: where ``forward`` adds a ``feature_offset``: ``"input"`` (the token embeddings) or
            ``"output"`` (the last layer's output, before the final norm); ``TandemConfig.feature_at``.
        attention_kernel: the CUDA paged-attention kernel, ``"simt"`` or ``"mma"``
            (``ops.ATTENTION_KERNELS``; not used on the CPU).
        attention_waves: CTA waves per SM the CUDA KV split aims for (0: the default).
    """

    def __init__(self, model: LlamaForCausalLM, cpu_layout: Optional[bool] = None,
                 quantized: Optional[dict] = None, decoder_plan: Optional[bool] = None, feature_at: str = "input",
                 quantized_head: Optional[QuantMatrix] = None,
                 attention_kernel: str = "simt", attention_waves: int = 0):
        self.model = model
        self.config = cfg = model.config
        self.scale = cfg.head_dim ** -0.5
        self.eps = cfg.rms_norm_eps
        if cpu_layout is None:
            cpu_layout = model.output_weight.device.type == "cpu"
        self.cpu_ops = cpu_layout
        # bf16 / fp32 on the CPU: [out, in] weights for linear_rows (decode / verify rows);
        # otherwise [in, out], stored contiguous on the CPU for torch's GEMM
        self.rows_layout = cpu_layout and model.output_weight.dtype in ROWS_LAYOUT_DTYPES
        self.mm = mm_rows if self.rows_layout else mm    # (x, w, add) -> add + x @ w in this layout
        # decode / draft / verify steps: linear_rows whatever the row count (each row's result is
        # then independent of the batch it shares: seeded requests reproduce across batches)
        self.step_mm = linear_rows_any if self.rows_layout else mm
        cpu = cpu_layout and not self.rows_layout
        dense = (lambda params: fuse_rows(params)) if self.rows_layout else (lambda params: input_major(params, cpu))
        quantized = dict(quantized or {})
        device = model.output_weight.device
        any_quantized = bool(quantized) or quantized_head is not None
        if any_quantized:
            if not (self.rows_layout or (device.type == "cuda" and model.output_weight.dtype in ROWS_LAYOUT_DTYPES)):
                raise ValueError("quantized weights need bfloat16 or float32 on the CPU engine (cpu_layout) or on CUDA, "
                                 f"got {device} {model.output_weight.dtype}")
            self.mm, self.step_mm = with_quantized(self.mm), with_quantized(self.step_mm, any_rows=True)
            quantized = {name: qm.to(device) for name, qm in quantized.items()}
        names = {id(p): n for n, p in model.named_parameters()}

        pack = any_quantized and self.rows_layout and packs16()

        def mat(params):   # a fused group: quantized when every member is (one qtype), else dense
            qs = [quantized.get(names.get(id(p))) for p in params]
            if all(q is not None for q in qs) and len({q.qtype for q in qs}) == 1:
                q = qs[0] if len(qs) == 1 else cat_rows(qs)
                return with_packed(q, keep_blocks=False) if pack else q
            return dense(params)

        self.layers: list[_LayerWeights] = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            b = None
            if attn.q_proj.bias is not None:
                b = fuse_rows([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            self.layers.append(_LayerWeights(
                layer.input_layernorm.weight.detach(), mat([attn.q_proj.weight, attn.k_proj.weight,
                                                            attn.v_proj.weight]),
                b, mat([attn.o_proj.weight]), layer.post_attention_layernorm.weight.detach(),
                mat([mlp.gate_proj.weight, mlp.up_proj.weight]), mat([mlp.down_proj.weight])))
        self.final_norm = model.model.norm.weight.detach()
        self.quant_embedding = quantized.get("model.embed_tokens.weight")
        # [d, V] (rows layout: [V, d]); when tied, the embedding becomes a view of it. A reduced
        # output vocabulary keeps only its rows ([d, N] / [N, d], a copy) and scatters the logits.
        self.vocab_subset = getattr(model, "vocab_subset", None)
        if quantized_head is not None:
            rows = model.config.vocab_size if self.vocab_subset is None else self.vocab_subset.numel()
            if not isinstance(quantized_head, QuantMatrix) or (quantized_head.out_features, quantized_head.in_features) \
                    != (rows, cfg.hidden_size):
                got = (f"a QuantMatrix [{quantized_head.out_features}, {quantized_head.in_features}]"
                       if isinstance(quantized_head, QuantMatrix) else type(quantized_head).__name__)
                raise ValueError(f"quantized_head must be a QuantMatrix [{rows}, {cfg.hidden_size}] (the LM head's "
                                 f"rows), got {got}")
            head = quantized_head.to(device)
            self.lm_head = with_packed(head, keep_blocks=False) if pack else head
        elif self.vocab_subset is None:
            self.lm_head = mat([model.output_weight])
        else:
            self.lm_head = dense([model.output_weight.detach().index_select(0, self.vocab_subset)])
        if feature_at not in FEATURE_AT:
            raise ValueError(f"feature_at must be one of {list(FEATURE_AT)}, got {feature_at!r}")
        self.feature_at = feature_at
        # the dispatcher op's CUDA launch options, checked once here (the CPU path calls the direct op)
        self.attention_options = {"kernel": attention_kernel_code(attention_kernel),
                                  "waves": check_waves(attention_waves)}
        self._attend = _cpu.paged_attention if self.cpu_ops else functools.partial(
            torch.ops.tandem_rt.paged_attention, **self.attention_options)   # built once, called per layer
        if decoder_plan and not self.rows_layout:
            raise ValueError("decoder_plan needs the CPU engine in bfloat16 or float32 (cpu_layout)")
        self.decoder_plan = self._build_decoder_plan() if (self.rows_layout if decoder_plan is None
                                                           else decoder_plan) else None
        self.quantized_bytes = sum(w.nbytes for lw in self.layers for w in lw if isinstance(w, QuantMatrix)) + (
            self.lm_head.nbytes if isinstance(self.lm_head, QuantMatrix) else 0)

    def _build_decoder_plan(self, team: bool = True):
        """``_C.cpu.DecoderPlan`` over this model's layers: each product as (weight, kernel, qtype),
        kernel 0 = ``linear_rows`` on the dense ``[out, in]`` matrix, 1 = ``linear_rows_q16`` on the
        packed blocks, 2 = ``linear_rows_q`` on the block rows (``quantized.rows_kernel``: what
        ``quant_mm`` runs for a step). ``team``: with several torch threads, run a step's layers in
        one parallel region (barriers between the ops) instead of forking the threads per op;
        the results are the same either way."""
        from tandem_rt.ops.layer_math import QUANT_TYPES
        from tandem_rt.quantized import rows_kernel

        def product(w):
            if not isinstance(w, QuantMatrix):
                return (w, 0, 0)
            kernel, operand = rows_kernel(w)
            return (operand, kernel, QUANT_TYPES[w.qtype][0])

        cfg = self.config
        layers = [(lw.ln1, product(lw.w_qkv), lw.b_qkv, product(lw.w_o), lw.ln2, product(lw.w_gate_up),
                   product(lw.w_down)) for lw in self.layers]
        return _cpu.DecoderPlan(layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                self.eps, float(cfg.rope_theta), self.scale, team)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of ``input_ids`` (int64 ``[T]``) -> ``[T, d]``."""
        if self.quant_embedding is not None:
            return embedding_rows(self.quant_embedding, input_ids, self.final_norm.dtype)
        return F.embedding(input_ids, self.model.model.embed_tokens.weight.detach())

    def kv_weights(self, j: int):
        """Layer ``j``'s K/V part of the fused QKV projection for ``self.mm``: (``[d, 2*kv_size]``,
        rows layout ``[2*kv_size, d]``; bias ``[2*kv_size]`` or None) as views (no copy)."""
        lw = self.layers[j]
        q = self.config.q_size
        if isinstance(lw.w_qkv, QuantMatrix):
            w = lw.w_qkv.rows(q)
        else:
            w = lw.w_qkv[q:] if self.rows_layout else lw.w_qkv[:, q:]
        return w, (lw.b_qkv[q:] if lw.b_qkv is not None else None)

    def input_norm(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``j``'s pre-attention RMSNorm of ``x`` ``[T, d]``."""
        return rms_norm(x, self.layers[j].ln1, self.eps, self.cpu_ops)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, meta: ForwardMeta, k_cache: list, v_cache: list,
                logits_rows: Optional[torch.Tensor] = None, hidden_layers: Sequence[int] = (),
                step: bool = False, feature_offset: Optional[torch.Tensor] = None, reduced: bool = False):
        """Run the rows of ``meta``.

        Args:
            input_ids: int64 ``[T]`` token of each row.
            meta: row indices (see :class:`ForwardMeta`).
            k_cache, v_cache: per layer ``[num_pages, page_size, n_kv_heads, head_dim]`` pools.
            logits_rows: int64 ``[R]`` rows whose logits are returned (default all rows).
            hidden_layers: residual streams to return (``0`` = embeddings, ``L`` = last layer output
                before the final norm).
            step: a decode / draft / verify step (``Engine.run``): the products use ``step_mm``
                (on the CPU, ``linear_rows`` for any row count), so with the CPU's row-invariant
                paged attention (every CPU call) a row's logits do not depend on the other rows of
                the step (a verify row equals its decode); prompts (``False``) use ``mm`` (torch's
                GEMM beyond a few rows).
            feature_offset: ``[T, d]`` (model dtype), the Tandem secondary's feature input: added to
                the token embeddings, or to the last layer's output before the final norm when
                ``self.feature_at == "output"``; or None.
            reduced: with a reduced output vocabulary, return its logits ``[R, N]`` (column ``j`` =
                token ``vocab_subset[j]``) instead of scattering them over the full vocabulary.
        Returns:
            logits ``[R, V]`` (``[R, N]`` when ``reduced``; model dtype) and the list of ``[T, d]``
            residual streams.
        """
        cfg = self.config
        Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qs, eps, heads, cpu_ops = cfg.q_size, self.eps, (Hq, Hkv, Hkv), self.cpu_ops
        theta = float(cfg.rope_theta)
        mm = self.step_mm if step else self.mm
        ops = _cpu if cpu_ops else torch.ops.tandem_rt   # CPU: the direct entry points (no dispatcher)
        rope_write = ops.rope_cache_write
        x = self.embed(input_ids)
        out_offset = feature_offset if self.feature_at == "output" else None
        if feature_offset is not None and out_offset is None:
            x = x + feature_offset
        T = x.shape[0]
        if step and self.decoder_plan is not None and not meta.dense:
            x, *streams = self.decoder_plan.run(x, meta.positions, meta.slot_mapping, meta.block_tables,
                                                meta.seq_lens, meta.query_start_loc, meta.max_q_len,
                                                meta.max_seq_len, k_cache, v_cache, list(hidden_layers))
            return self._logits(x, out_offset, logits_rows, mm, reduced), streams
        wanted = set(hidden_layers)
        saved = {0: x} if 0 in wanted else {}
        attn = None if meta.dense else torch.empty((T, Hq, D), dtype=x.dtype, device=x.device)
        attend = self._attend
        if cpu_ops and not meta.dense:   # one key-segment scratch (sequences over 512 keys) for every layer
            attend = functools.partial(attend, scratch=_cpu.paged_attention_scratch(T, meta.num_seqs, Hq, D,
                                                                                    meta.max_seq_len))
        for i, lw in enumerate(self.layers):
            qkv = mm(rms_norm(x, lw.ln1, eps, cpu_ops), lw.w_qkv, lw.b_qkv)
            q, k, v = qkv.view(T, Hq + 2 * Hkv, D).split(heads, 1)   # [T, H, D] views, heads packed
            rope_write(k, v, meta.positions, meta.slot_mapping, k_cache[i], v_cache[i],
                                                 theta, q)
            if meta.dense:
                attn = dense_causal_attention(q, k, v, meta.row_splits, self.scale)
            else:  # one output buffer for every layer (each layer's result is consumed at once)
                attend(attn, q, k_cache[i], v_cache[i], meta.block_tables, meta.seq_lens, meta.query_start_loc,
                       self.scale, meta.max_q_len, meta.max_seq_len, cpu_ops)
            x = mm(attn.view(T, qs), lw.w_o, x)   # residual + o_proj in one GEMM
            gu = mm(rms_norm(x, lw.ln2, eps, cpu_ops), lw.w_gate_up)
            x = mm(silu_and_mul(gu, cpu_ops), lw.w_down, x)
            if i + 1 in wanted:
                saved[i + 1] = x
        return self._logits(x, out_offset, logits_rows, mm, reduced), [saved[l] for l in hidden_layers]

    def _logits(self, x: torch.Tensor, offset: Optional[torch.Tensor], logits_rows: Optional[torch.Tensor],
                mm, reduced: bool = False) -> torch.Tensor:
        """Final norm and LM head (product ``mm``) of ``x + offset`` (``[T, d]``, offset None = 0) at the
        rows ``logits_rows`` (all rows when None) -> ``[R, V]``."""
        if offset is not None:
            x = x + offset
        if logits_rows is not None:
            x = x.index_select(0, logits_rows)
        logits = mm(rms_norm(x, self.final_norm, self.eps, self.cpu_ops), self.lm_head)
        if self.vocab_subset is not None and not reduced:
            logits = scatter_vocab(logits, self.vocab_subset, self.config.vocab_size)
        return logits
