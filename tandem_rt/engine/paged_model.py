"""One paged forward per Llama model, used by every generation mode.

Embeddings -> per layer: RMSNorm -> fused QKV matmul -> ``rope_cache_write`` (rotates Q/K in
place, writes K/V into the pool) -> ``paged_attention`` -> o_proj + residual (one addmm) -> RMSNorm
-> fused gate/up matmul -> SiLU * up -> down + residual (one addmm).
Weights are the reference :class:`~tandem_rt.models.llama.LlamaForCausalLM` modules' own tensors;
the fused QKV weight (and bias) and gate/up weight are concatenated once at construction and the
modules' q/k/v and gate/up parameters become views of them, so no weight is stored twice.

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

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from tandem_rt.models.llama import LlamaForCausalLM


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
    """One decoder layer's tensors as the paged forward uses them (the module's own parameters;
    ``w_qkv`` / ``b_qkv`` and ``w_gate_up`` are fused once, the modules' q/k/v and gate/up
    parameters becoming views of them: no second copy)."""
    ln1: torch.Tensor            # [d] input RMSNorm weight
    w_qkv: torch.Tensor          # [q_size + 2 kv_size, d]
    b_qkv: Optional[torch.Tensor]
    w_o_t: torch.Tensor          # [q_size, d] (transposed view of o_proj.weight, for addmm; no bias)
    ln2: torch.Tensor            # [d] post-attention RMSNorm weight
    w_gate_up: torch.Tensor      # [2 I, d]: gate rows then up rows
    w_down_t: torch.Tensor       # [I, d] (transposed view of down_proj.weight)


def fuse_rows(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """Concatenate ``params`` along dim 0 into one tensor and make each parameter a view of its
    rows, so the fused weight is the only copy (the modules keep working on the views).
    Returns the fused ``[sum of rows, ...]`` tensor."""
    fused = torch.cat([p.detach() for p in params], 0)
    row = 0
    for p in params:
        n = p.shape[0]
        p.data = fused[row:row + n]
        row += n
    return fused


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim (torch's fused op; statistics in fp32).
    x: ``[..., d]``, weight ``[d]``, same dtype."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class PagedLlama:
    """Paged forward of one :class:`LlamaForCausalLM` over its K/V pool.

    The forward calls functional ops on the module's tensors (no ``nn.Module`` calls: their
    dispatch cost is a visible share of a small model's decode step on the CPU) and the
    ``torch.ops.tandem_rt`` ops directly: the engine builds their arguments itself and the C++ ops
    validate every argument again (ValueError naming it), so the Python wrappers' checks are skipped.

    Args:
        model: the reference model; its tensors are used as they are (same device and dtype).
    """

    def __init__(self, model: LlamaForCausalLM):
        self.model = model
        self.config = cfg = model.config
        self.scale = cfg.head_dim ** -0.5
        self.eps = cfg.rms_norm_eps
        self.intermediate = cfg.intermediate_size
        self.layers: list[_LayerWeights] = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            w = fuse_rows([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            b = None
            if attn.q_proj.bias is not None:
                b = fuse_rows([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            gate_up = fuse_rows([mlp.gate_proj.weight, mlp.up_proj.weight])
            self.layers.append(_LayerWeights(
                layer.input_layernorm.weight.detach(), w, b, attn.o_proj.weight.detach().t(),
                layer.post_attention_layernorm.weight.detach(), gate_up, mlp.down_proj.weight.detach().t()))
        self.embed = model.model.embed_tokens.weight.detach()
        self.final_norm = model.model.norm.weight.detach()
        self.lm_head = model.output_weight.detach()

    def kv_weights(self, j: int):
        """Layer ``j``'s K/V rows of the fused QKV weight: (``[2*kv_size, d]``, bias ``[2*kv_size]`` or None)
        as views (no copy)."""
        lw = self.layers[j]
        q = self.config.q_size
        return lw.w_qkv[q:], (lw.b_qkv[q:] if lw.b_qkv is not None else None)

    def input_norm(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``j``'s pre-attention RMSNorm of ``x`` ``[T, d]``."""
        return rms_norm(x, self.layers[j].ln1, self.eps)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, meta: ForwardMeta, k_cache: list, v_cache: list,
                logits_rows: Optional[torch.Tensor] = None, hidden_layers: Sequence[int] = ()):
        """Run the rows of ``meta``.

        Args:
            input_ids: int64 ``[T]`` token of each row.
            meta: row indices (see :class:`ForwardMeta`).
            k_cache, v_cache: per layer ``[num_pages, page_size, n_kv_heads, head_dim]`` pools.
            logits_rows: int64 ``[R]`` rows whose logits are returned (default all rows).
            hidden_layers: residual streams to return (``0`` = embeddings, ``L`` = last layer output
                before the final norm).
        Returns:
            logits ``[R, V]`` (model dtype) and the list of ``[T, d]`` residual streams.
        """
        cfg = self.config
        Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qs, kvs, eps, inter = cfg.q_size, cfg.kv_size, self.eps, self.intermediate
        theta = float(cfg.rope_theta)
        x = F.embedding(input_ids, self.embed)
        T = x.shape[0]
        wanted = set(hidden_layers)
        saved = {0: x} if 0 in wanted else {}
        attn = None if meta.dense else torch.empty((T, Hq, D), dtype=x.dtype, device=x.device)
        for i, lw in enumerate(self.layers):
            qkv = F.linear(rms_norm(x, lw.ln1, eps), lw.w_qkv, lw.b_qkv)
            q = qkv[:, :qs].view(T, Hq, D)
            k = qkv[:, qs:qs + kvs].view(T, Hkv, D)
            v = qkv[:, qs + kvs:].view(T, Hkv, D)
            torch.ops.tandem_rt.rope_cache_write(k, v, meta.positions, meta.slot_mapping, k_cache[i], v_cache[i],
                                                 theta, q)
            if meta.dense:
                attn = dense_causal_attention(q, k, v, meta.row_splits, self.scale)
            else:  # one output buffer for every layer (each layer's result is consumed at once)
                torch.ops.tandem_rt.paged_attention(attn, q, k_cache[i], v_cache[i], meta.block_tables,
                                                    meta.seq_lens, meta.query_start_loc, self.scale,
                                                    meta.max_q_len, meta.max_seq_len)
            x = torch.addmm(x, attn.view(T, qs), lw.w_o_t)   # x + attn @ W_o^T
            gu = F.linear(rms_norm(x, lw.ln2, eps), lw.w_gate_up)
            x = torch.addmm(x, F.silu(gu[:, :inter]) * gu[:, inter:], lw.w_down_t)
            if i + 1 in wanted:
                saved[i + 1] = x
        if logits_rows is not None:
            x = x.index_select(0, logits_rows)
        logits = F.linear(rms_norm(x, self.final_norm, eps), self.lm_head)
        return logits, [saved[l] for l in hidden_layers]
