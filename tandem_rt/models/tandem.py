"""The Tandem model: primary, secondary and per-layer projections (docs/DESIGN.md §2.2 "Eq. (2) and the layer map").

Index convention (0-based positions). In a training forward with block length ``γ`` the
secondary's query at position ``i`` attends to primary-derived keys/values for positions
``p < b(i)`` and to its own for ``b(i) <= p <= i``, with ``b(i) = floor((i+1)/γ)·γ``.
Primary-derived K/V of secondary layer ``j`` come from ``proj_j(x^(layer_map[j]))`` passed
through that layer's pre-attention RMSNorm, its W_K/W_V (and bias) and RoPE at ``p``.

Feature input (optional, ``TandemConfig.feature_layer``; beyond Eq. (2), as EAGLE feeds its
drafter): the secondary's input at position ``i`` is ``embed(x_i) + W_f·RMSNorm(x^(l_f)_{b(i)-1})``,
the primary's representation at the last position it has processed before the block (nothing
where ``b(i) = 0``). Every query of a block adds the same vector. With ``feature_at="output"`` the
same vector is added to the secondary's last residual instead, before its final norm and LM head.

Token-anchored projections (optional, ``TandemConfig.projection_embed``; beyond Eq. (2)): the
primary-derived residual of layer ``j`` at ``p`` is ``proj_j(x^(l(j))_p) + embed(x_p)``, the token's
own embedding plus what the projection adds. The secondary's own residual at layer 0 *is*
``embed(x_p)``, so with ``proj_0 = 0`` its primary-derived K/V equal its own, and the keys of earlier
tokens keep their identity (what copying an earlier phrase needs) whatever the projection learns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem_rt.config import TandemConfig
from tandem_rt.models.llama import LlamaForCausalLM, RMSNorm
from tandem_rt.models.router import Router


def training_boundary(T: int, block_length: int, device=None) -> torch.Tensor:
    """``b(i) = floor((i+1)/γ)·γ`` for ``i = 0..T-1`` -> int64 ``[T]``."""
    i = torch.arange(T, device=device)
    return torch.div(i + 1, block_length, rounding_mode="floor") * block_length


def tandem_mask(boundary: torch.Tensor, T: int, own_context: bool = False) -> torch.Tensor:
    """bool ``[..., T, 2T]``: keys ``[primary-derived 0..T-1, own 0..T-1]``.

    ``boundary`` int64 ``[T]`` or ``[B, T]``: query i reads primary K/V for p < boundary[i]
    and its own for boundary[i] <= p <= i (``own_context``: its own for every p <= i as well).
    """
    p = torch.arange(T, device=boundary.device)
    b = boundary.unsqueeze(-1)
    i = torch.arange(T, device=boundary.device).unsqueeze(-1)
    from_primary = p < b
    own = (p <= i).expand_as(from_primary) if own_context else (p >= b) & (p <= i)
    mask = torch.cat([from_primary, own], dim=-1)
    return mask.unsqueeze(-3) if mask.dim() == 3 else mask  # [B, 1, T, 2T] broadcasts over heads


class FeatureInput(nn.Module):
    """``W_f·RMSNorm(x)``: a primary representation ``[..., d_L]`` -> an offset ``[..., d_S]`` for the
    secondary. With ``hidden`` (``TandemConfig.feature_hidden``) a two-layer MLP,
    ``W_f·GELU(W_u·RMSNorm(x))`` (``W_u`` ``[hidden, d_L]``, normal(0, 1/sqrt(d_L))). ``W_f`` starts at
    zero (the secondary starts as it was), the norm at ones."""

    def __init__(self, d_primary: int, d_secondary: int, eps: float, hidden: Optional[int] = None):
        super().__init__()
        self.norm = RMSNorm(d_primary, eps)
        self.up = None
        if hidden is not None:
            self.up = nn.Linear(d_primary, hidden, bias=False)
            nn.init.normal_(self.up.weight, std=d_primary ** -0.5)
        self.proj = nn.Linear(hidden or d_primary, d_secondary, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.up is not None:
            h = F.gelu(self.up(h))
        return self.proj(h)


def latest_feature(hidden: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
    """Per query, the primary's representation at ``b(i) - 1``.

    Args: ``hidden`` ``[B, T, d]``; ``boundary`` int64 ``[T]`` or ``[B, T]``.
    Returns: ``[B, T, d]``, row ``i`` = ``hidden[:, b(i) - 1]``, zero where ``b(i) = 0``.
    """
    B, T, d = hidden.shape
    b = boundary.to(hidden.device).expand(B, T)
    rows = hidden.gather(1, (b - 1).clamp_min(0).unsqueeze(-1).expand(B, T, d))
    return rows * (b > 0).unsqueeze(-1).to(rows.dtype)


def tandem_secondary_forward(secondary: LlamaForCausalLM, projections, input_ids: torch.Tensor,
                             primary_hidden: list, boundary: torch.Tensor,
                             positions: Optional[torch.Tensor] = None, reduced: bool = False,
                             feature: Optional[FeatureInput] = None, feature_index: Optional[int] = None,
                             feature_at: str = "input", projection_embed: bool = False,
                             own_context: bool = False) -> torch.Tensor:
    """Eq. (2) for a secondary and its projections (``projections[j]``: d_L -> d_S) without a primary
    module: the primary's residual streams come from the caller (a forward or the primary cache).
    Arguments and result as :meth:`TandemModel.secondary_forward`; ``reduced``: logits over the
    secondary's ``vocab_subset`` only (``[B, T, N]``); ``feature``: the feature input, reading
    ``primary_hidden[feature_index]``, added to the input embeddings (``feature_at="input"``) or to the
    last layer's output before the final norm (``"output"``); ``projection_embed``: the primary-derived
    residuals add the token embeddings (token-anchored projections); ``own_context``: every query
    also reads the secondary's own K/V of all earlier positions beside the primary-derived ones (a
    measured variant for the training tools only: the engine and the checkpoint format do not
    serve it; tools/pilot_own_context.py). The own K/V at ``p`` are those computed with ``p``'s own
    boundary, as when ``p`` was drafted."""
    sec = secondary
    B, T = input_ids.shape
    if positions is None:
        positions = torch.arange(T, device=input_ids.device)
    y = sec.model.embed_tokens(input_ids)
    anchor = y if projection_embed else None   # [B, T, d_S]
    offset = None
    if feature is not None:
        offset = feature(latest_feature(primary_hidden[feature_index], boundary).to(y.dtype)).to(y.dtype)
        if feature_at == "input":
            y, offset = y + offset, None
    cos, sin = sec.rope(positions.view(1, T), y.dtype)
    mask = tandem_mask(boundary.to(input_ids.device), T, own_context)
    for j, layer in enumerate(sec.model.layers):
        y_hat = projections[j](primary_hidden[j].to(y.dtype))
        if anchor is not None:
            y_hat = y_hat + anchor
        attn = layer.self_attn
        h = layer.input_layernorm(y)
        q = attn.query(h, cos, sin)
        k_own, v_own = attn.key_value(h, cos, sin)
        k_pri, v_pri = attn.key_value(layer.input_layernorm(y_hat), cos, sin)
        k = torch.cat([k_pri, k_own], dim=2)
        v = torch.cat([v_pri, v_own], dim=2)
        y = y + attn.attend(q, k, v, mask)
        y = y + layer.mlp(layer.post_attention_layernorm(y))
    if offset is not None:
        y = y + offset
    return sec.subset_logits(y) if reduced else sec.logits(y)


@dataclass
class TandemOutput:
    primary_logits: torch.Tensor    # [B, T, V]
    secondary_logits: torch.Tensor  # [B, T, V]
    primary_hidden: list            # x^(layer_map[j]) for each secondary layer j, each [B, T, d_L]


class TandemModel(nn.Module):
    """``.primary``, ``.secondary``, ``.tandem.proj[j]`` (d_L -> d_S), optional ``.drafter``
    (standalone small model for the ``speed`` baseline) and ``.router``."""

    def __init__(self, cfg: TandemConfig):
        super().__init__()
        self.config = cfg
        self.primary = LlamaForCausalLM(cfg.primary)
        self.secondary = LlamaForCausalLM(cfg.secondary)
        self.tandem = nn.Module()
        self.tandem.proj = nn.ModuleList(
            nn.Linear(cfg.primary.hidden_size, cfg.secondary.hidden_size, bias=cfg.projection_bias)
            for _ in range(cfg.secondary.num_hidden_layers))
        if cfg.feature_layer is not None:
            self.tandem.feature = FeatureInput(cfg.primary.hidden_size, cfg.secondary.hidden_size,
                                               cfg.primary.rms_norm_eps, hidden=cfg.feature_hidden)
        self.drafter = LlamaForCausalLM(cfg.drafter) if cfg.drafter is not None else None
        self.router = Router(cfg.router) if cfg.router is not None else None

    @property
    def layer_map(self) -> list:
        return self.config.layer_map

    @property
    def feature(self) -> Optional[FeatureInput]:
        """The feature input (None without ``feature_layer``)."""
        return getattr(self.tandem, "feature", None)

    @property
    def feature_index(self) -> Optional[int]:
        """Index into the layer-map residual streams of the feature input's layer (None without one)."""
        f = self.config.feature_layer
        return None if f is None else self.config.layer_map.index(f)

    def _primary_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.primary.parameters())

    def primary_forward(self, input_ids: torch.Tensor):
        """Primary over ``input_ids [B, T]`` -> (logits ``[B, T, V]``, hidden list per layer map)."""
        grad = torch.is_grad_enabled() and not self._primary_frozen()
        with torch.set_grad_enabled(grad):
            return self.primary(input_ids, hidden_layers=self.layer_map)

    def secondary_forward(self, input_ids: torch.Tensor, primary_hidden: list,
                          boundary: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Secondary forward with primary-derived K/V (Eq. (2)).

        Args:
            input_ids: int64 ``[B, T]``.
            primary_hidden: per secondary layer j, ``x^(layer_map[j])`` as ``[B, T, d_L]``
                (only rows ``p < max(boundary)`` are read).
            boundary: int64 ``[T]`` or ``[B, T]``, ``boundary[i] <= i + 1``: query i reads
                primary-derived K/V for ``p < boundary[i]``, its own for the rest.
            positions: int64 ``[T]`` absolute positions (default ``0..T-1``).
        Returns:
            secondary logits ``[B, T, V]``.
        """
        return tandem_secondary_forward(self.secondary, self.tandem.proj, input_ids, primary_hidden,
                                        boundary, positions, feature=self.feature, feature_index=self.feature_index,
                                        feature_at=self.config.feature_at,
                                        projection_embed=self.config.projection_embed)

    def forward(self, input_ids: torch.Tensor, block_length: Optional[int] = None) -> TandemOutput:
        """Training-style forward: ``input_ids [B, T]`` -> logits of both models ``[B, T, V]``.

        ``block_length`` (γ) defaults to the config's ``train_block_length``.
        """
        gamma = block_length or self.config.train_block_length
        if not isinstance(gamma, int) or gamma < 1:
            raise ValueError(f"block_length must be a positive integer, got {block_length!r}")
        primary_logits, hidden = self.primary_forward(input_ids)
        boundary = training_boundary(input_ids.shape[1], gamma, input_ids.device)
        secondary_logits = self.secondary_forward(input_ids, hidden, boundary)
        return TandemOutput(primary_logits, secondary_logits, hidden)
