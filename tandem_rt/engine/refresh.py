"""Tandem refresh: overwrite secondary K/V with primary-derived entries (docs/DESIGN.md §2.2 "Eq. (2) and the layer map").

For positions the primary has processed, secondary layer ``j``'s K/V entry is computed from the
primary's residual stream ``x^(layer_map[j])``: ``proj_j`` (d_L -> d_S) -> layer ``j``'s
pre-attention RMSNorm -> its W_K / W_V (+ bias) -> RoPE at the position -> written into the
secondary pool with ``rope_cache_write``, replacing whatever the secondary wrote there. With
token-anchored projections (``TandemConfig.projection_embed``) the projected row adds the token's
embedding in the secondary's table before the norm.

With the feature input (``TandemConfig.feature_layer``) the refresh also writes, per row, the
secondary's input offset ``W_f·RMSNorm(x^(feature_layer))`` into the feature pool (``[num_pages + 1,
page_size, d_S]``, laid out as the K/V pools; the extra page takes the rows with slot -1); a
draft reads the entry of the last position the primary processed (``feature_offsets``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from tandem_rt._ext import _C
from tandem_rt.engine.paged_model import PagedLlama, h2d, input_major, rms_norm
from tandem_rt.models.tandem import TandemModel


class TandemRefresh:
    """Writes primary-derived entries into the secondary pool.

    Args:
        model: the Tandem model (``model.tandem.proj[j]``'s weights become views of the
            ``[d_L, d_S]`` matrices held here, as in :class:`PagedLlama`).
        secondary: the secondary's :class:`PagedLlama` (its fused QKV weight supplies W_K/W_V).
    """

    def __init__(self, model: TandemModel, secondary: PagedLlama):
        # proj_j in the secondary's layout for its mm ([d_L, d_S], or [d_S, d_L] for rows) + biases
        layout = (lambda w: w.detach()) if secondary.rows_layout else (
            lambda w: input_major([w], secondary.cpu_ops))
        self.proj = [(layout(p.weight), None if p.bias is None else p.bias.detach()) for p in model.tandem.proj]
        self.secondary = secondary
        # layer j's K/V part of the secondary's QKV product (views, taken once: slicing a quantized
        # matrix builds a new QuantMatrix)
        self.kv = [secondary.kv_weights(j) for j in range(len(self.proj))]
        self.layer_map = list(model.layer_map)
        self.projection_embed = bool(model.config.projection_embed)
        self.rope_write = _C.cpu.rope_cache_write if secondary.cpu_ops else torch.ops.tandem_rt.rope_cache_write
        f = model.feature
        # the feature input: (index into the layer-map streams, norm weight [d_L], W_f in the mm layout, eps,
        # the MLP's W_u in the mm layout or None)
        self.feature = None if f is None else (model.feature_index, f.norm.weight.detach(), layout(f.proj.weight),
                                                f.norm.eps, None if f.up is None else layout(f.up.weight))

    def feature_offsets(self, hidden: torch.Tensor, step: bool) -> torch.Tensor:
        """``W_f·RMSNorm(hidden)`` (with the feature MLP ``W_f·GELU(W_u·RMSNorm(hidden))``):
        ``[T, d_L]`` -> ``[T, d_S]`` (needs the feature input)."""
        _, norm_w, w_f, eps, w_u = self.feature
        mm = self.secondary.step_mm if step else self.secondary.mm
        h = rms_norm(hidden.to(norm_w.dtype), norm_w, eps, self.secondary.cpu_ops)
        if w_u is not None:
            h = F.gelu(mm(h.to(w_u.dtype), w_u))
        return mm(h.to(w_f.dtype), w_f)

    @torch.no_grad()
    def __call__(self, primary_hidden: Sequence[torch.Tensor], positions: torch.Tensor,
                 slot_mapping: torch.Tensor, k_cache: list, v_cache: list, step: bool = False,
                 features: Optional[torch.Tensor] = None, input_ids: Optional[torch.Tensor] = None) -> None:
        """Refresh the rows of ``primary_hidden``.

        Args:
            primary_hidden: per secondary layer ``j``, ``x^(layer_map[j])`` of the rows, ``[T, d_L]``.
            positions: int64 ``[T]`` absolute positions of the rows.
            slot_mapping: int64 ``[T]`` secondary-pool slots to write (-1 = skip the row).
            k_cache, v_cache: the secondary's per-layer pools ``[num_pages, page_size, n_kv, head_dim]``.
            step: rows of a decode / verify step (products by the secondary's ``step_mm``, row-
                invariant on the CPU, as ``PagedLlama.forward(step=True)``), else a prompt's.
            features: the feature pool ``[num_pages + 1, page_size, d_S]`` (with the feature
                input), written at ``slot_mapping`` (slot -1 rows: into the last page).
            input_ids: int64 ``[T]``, the rows' tokens; needed with token-anchored projections.
        """
        cfg = self.secondary.config
        T = positions.shape[0]
        anchor = None   # [T, d_S]: the rows' token embeddings (token-anchored projections)
        if self.projection_embed:
            if input_ids is None or input_ids.shape != positions.shape:
                raise ValueError("token-anchored projections need input_ids [T] with the rows' tokens")
            anchor = self.secondary.embed(input_ids)
        Hkv, D = cfg.num_key_value_heads, cfg.head_dim
        theta = float(cfg.rope_theta)
        mm = self.secondary.step_mm if step else self.secondary.mm
        for j, (w_proj, b_proj) in enumerate(self.proj):
            y_hat = mm(primary_hidden[j].to(w_proj.dtype), w_proj, b_proj)
            if anchor is not None:
                y_hat = y_hat + anchor.to(y_hat.dtype)
            h = self.secondary.input_norm(j, y_hat)
            w_kv, b_kv = self.kv[j]
            kv = mm(h, w_kv, b_kv).view(T, 2 * Hkv, D)
            k, v = kv[:, :Hkv], kv[:, Hkv:]
            # the raw op: the engine built the indices, and the C++ op validates every argument
            self.rope_write(k, v, positions, slot_mapping, k_cache[j], v_cache[j], theta, None)
        if self.feature is not None and features is not None:
            flat = features.view(-1, features.shape[-1])
            trash = flat.shape[0] - 1
            rows = torch.where(slot_mapping >= 0, slot_mapping, torch.full_like(slot_mapping, trash))
            flat.index_copy_(0, rows, self.feature_offsets(primary_hidden[self.feature[0]], step).to(flat.dtype))


def feature_rows(features: torch.Tensor, page_manager, seqs, device) -> torch.Tensor:
    """The feature-pool entry of each sequence's last primary-processed position ``plen - 1``:
    ``features`` ``[num_pages + 1, page_size, d_S]``, ``seqs`` with ``.sid`` / ``.plen`` (>= 1)
    -> ``[B, d_S]``."""
    slots = [page_manager.slot_mapping(s.sid, s.plen - 1, s.plen)[0] for s in seqs]
    return features.view(-1, features.shape[-1]).index_select(0, h2d(slots, torch.int64, device))
