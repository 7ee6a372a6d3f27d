"""Router training: features of the Tandem secondary's next-token distribution, labelled with the
total-variation distance to the primary's distribution; BCE toward that soft label.

Positions come from the block forward ``TandemModel.forward(input_ids, block_length=γ)``, i.e.
the secondary distributions the runtime sees while drafting inside a block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tandem_rt.models.router import Router, router_features
from tandem_rt.models.tandem import TandemModel


def tv_distance(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """``0.5 · sum_v |softmax(a)_v - softmax(b)_v|`` over the last dim: ``[..., V]`` x2 -> float32 ``[...]``."""
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logits_a {tuple(logits_a.shape)} and logits_b {tuple(logits_b.shape)} differ in shape")
    return 0.5 * (F.softmax(logits_a.float(), -1) - F.softmax(logits_b.float(), -1)).abs().sum(-1)


@torch.no_grad()
def router_batch(tandem: TandemModel, input_ids: torch.Tensor, top_k: int, block_length: int):
    """Features and labels for every position of ``input_ids [B, T]``.

    Returns:
        features float32 ``[B*T, 1 + top_k + top_k*d_S]`` (``router_features`` of the secondary's
        logits with the secondary's embedding matrix), labels float32 ``[B*T]`` (TV distance
        between the secondary's and the primary's next-token distributions), and the
        greedy agreement bool ``[B*T]`` (secondary argmax == primary argmax).
    """
    out = tandem(input_ids, block_length=block_length)
    feats = router_features(out.secondary_logits, tandem.secondary.model.embed_tokens.weight, top_k)
    tv = tv_distance(out.secondary_logits, out.primary_logits)
    agree = out.secondary_logits.argmax(-1) == out.primary_logits.argmax(-1)
    return feats.flatten(0, -2), tv.flatten(), agree.flatten()


def router_loss(router: Router, features: torch.Tensor, tv: torch.Tensor) -> torch.Tensor:
    """BCE between ``sigmoid(router.logit(features))`` and the soft label ``tv`` in [0, 1]."""
    return F.binary_cross_entropy_with_logits(router.logit(features), tv.to(torch.float32))


def train_router(router: Router, features: torch.Tensor, tv: torch.Tensor, steps: int = 2000,
                 batch_size: int = 1024, lr: float = 1e-3, seed: int = 0) -> list:
    """Adam on minibatches of (``features [N, F]``, ``tv [N]``); returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=0.0)
    router.requires_grad_(True)
    losses = []
    router.train()
    for step in range(steps):
        idx = torch.randint(0, len(tv), (batch_size,), generator=gen)
        loss = router_loss(router, features[idx], tv[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * (step + 1) / steps)).item())
        losses.append(loss.item())
    return losses


@dataclass
class ThresholdResult:
    threshold: float
    tokens_per_block: float     # accepted drafts + 1 (bonus) per block
    drafts_per_block: float
    tokens_per_cost: float      # tokens_per_block / (drafts_per_block * cost_ratio + 1)


def simulate_threshold(pred_accept: torch.Tensor, agree: torch.Tensor, threshold: float, cost_ratio: float,
                       gamma_max: int) -> ThresholdResult:
    """Teacher-forced proxy of adaptive drafting.

    ``pred_accept`` float ``[N, G]`` (router's ``1 - tv`` for draft k of block n) and ``agree``
    bool ``[N, G]`` (draft k's argmax equals the primary's), ``G >= gamma_max``. Draft k is made;
    drafting continues to k+1 while ``pred_accept[:, k] >= threshold`` and ``k+1 < gamma_max``.
    Accepted = leading agreeing drafts among those made; one bonus token from the primary.
    Cost of a block: ``drafts * cost_ratio + 1`` primary passes.
    """
    N, G = agree.shape
    if pred_accept.shape != agree.shape or G < gamma_max:
        raise ValueError(f"pred_accept {tuple(pred_accept.shape)} and agree {tuple(agree.shape)} must match "
                         f"with at least gamma_max={gamma_max} columns")
    go_on = (pred_accept[:, :gamma_max - 1] >= threshold).long()
    drafts = 1 + go_on.cumprod(-1).sum(-1)                                  # [N]
    leading = agree[:, :gamma_max].long().cumprod(-1)                       # [N, gamma_max]
    k = torch.arange(gamma_max).unsqueeze(0)
    accepted = (leading * (k < drafts.unsqueeze(1))).sum(-1)
    tokens = accepted.float().mean().item() + 1.0
    d = drafts.float().mean().item()
    return ThresholdResult(float(threshold), tokens, d, tokens / (d * cost_ratio + 1.0))
