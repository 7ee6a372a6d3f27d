"""Random weights for tests and benchmarks (no training): plain random models and models whose
small LMs *agree* with the primary often enough for speculative blocks to accept some drafts."""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn as nn

Std = Union[float, Callable[[torch.Tensor], float]]


@torch.no_grad()
def randomize_(module: nn.Module, matrix_std: Std, norm_range=(1.0, 1.0), vector_std: float = 0.0) -> nn.Module:
    """In place: every matrix ~ N(0, matrix_std) (a float, or a function of the parameter), every
    ``*norm*`` vector ~ U(norm_range), every other vector (biases) ~ N(0, vector_std)."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, matrix_std(p) if callable(matrix_std) else matrix_std)
        elif "norm" in name:
            p.uniform_(*norm_range)
        else:
            p.normal_(0.0, vector_std) if vector_std > 0 else p.zero_()
    return module


@torch.no_grad()
def make_agreeing_(model, layer_scale: float, share_norm: bool = False, proj_noise: float = 0.0) -> None:
    """Make a randomised :class:`~tandem_rt.models.TandemModel`'s small models predict like its
    primary part of the time: a unit-variance embedding shared by every LM (tied heads), the
    residual writes of every layer (``o_proj``, ``down_proj``) scaled by ``layer_scale`` so the
    stream stays close to the embedding, and Tandem projections at the identity (times
    ``proj_noise``-scaled random matrices added on top; biases zeroed)."""
    small = [model.secondary] + ([model.drafter] if model.drafter is not None else [])
    emb = model.primary.model.embed_tokens.weight
    emb.normal_(0.0, 1.0)
    for m in small:
        m.model.embed_tokens.weight.copy_(emb)
        if share_norm:
            m.model.norm.weight.copy_(model.primary.model.norm.weight)
    for m in [model.primary] + small:
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.mul_(layer_scale)
            layer.mlp.down_proj.weight.mul_(layer_scale)
    for proj in model.tandem.proj:
        proj.weight.mul_(proj_noise).add_(torch.eye(proj.weight.shape[0], proj.weight.shape[1]))
        if proj.bias is not None:
            proj.bias.zero_()
