"""Adaptive block length router (docs/DESIGN.md §2.4 "Router (adaptive γ)")."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem_rt.config import RouterConfig


def router_features(logits: torch.Tensor, embed_weight: torch.Tensor, top_k: int) -> torch.Tensor:
    """Features of the secondary's next-token distribution.

    Args:
        logits: ``[..., V]`` secondary logits (any float dtype).
        embed_weight: ``[V, d_S]`` secondary input embedding matrix.
        top_k: number of top tokens.
    Returns:
        float32 ``[..., 1 + top_k + top_k * d_S]``: entropy, top-k probabilities, and the
        embeddings of the top-k tokens (concatenated, most probable first).
    """
    probs = F.softmax(logits.float(), dim=-1)
    entropy = torch.special.entr(probs).sum(-1, keepdim=True)  # 0·log 0 = 0 (-inf logits of a reduced vocabulary)
    top_p, top_i = probs.topk(top_k, dim=-1)
    emb = embed_weight[top_i].float().flatten(-2)
    return torch.cat([entropy, top_p, emb], dim=-1)


class Router(nn.Module):
    """2-layer MLP: features ``[..., F]`` -> predicted TV distance in (0, 1), ``[...]``."""

    def __init__(self, cfg: RouterConfig):
        super().__init__()
        self.config = cfg
        self.fc1 = nn.Linear(cfg.num_features, cfg.hidden_size)
        self.fc2 = nn.Linear(cfg.hidden_size, 1)

    def logit(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid output ``[...]`` (what a BCE-with-logits loss trains)."""
        w = self.fc1.weight
        return self.fc2(F.gelu(self.fc1(features.to(w.dtype)))).squeeze(-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(features))
