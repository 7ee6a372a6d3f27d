"""Tandem training with the primary frozen (paper §3–4) and the distillation baseline.

* :class:`TandemObjective`: the reference ``TandemModel.forward(input_ids, block_length=γ)``
  (Eq. (2) masking: the secondary reads primary-derived K/V for positions before its block
  start ``b(i) = floor((i+1)/γ)·γ`` and its own K/V inside the block). Loss
  ``(1-w)·CE(ground truth) + w·CE(primary soft labels)``: ``w = 0`` is Tandem-CE (and stage 1
  of Tandem-Distil), ``w = 0.5`` is stage 2 of Tandem-Distil. The primary's soft labels come
  from the same forward, detached.
* :class:`DistilObjective`: a standalone student (the secondary) trained with the same loss
  against a frozen teacher (the primary) — the "secondary-Distil" drafter.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem_rt.config import ModelConfig, RouterConfig, TandemConfig
from tandem_rt.models.llama import LlamaForCausalLM
from tandem_rt.models.tandem import TandemModel


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter of ``module`` and put it in eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def soft_label_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``-sum_v softmax(teacher)_v · log_softmax(student)_v``.

    Both ``[..., V]``; the teacher is detached; computed in float32.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    target = F.softmax(teacher_logits.detach().float(), dim=-1)
    return -(target * F.log_softmax(student_logits.float(), dim=-1)).sum(-1).mean()


def distil_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor,
                distil_weight: float):
    """``(1-w)·CE(student, next token) + w·CE(student, softmax(teacher))`` over positions 0..T-2.

    Args: logits ``[B, T, V]``, ``input_ids`` int64 ``[B, T]``, ``distil_weight`` w in [0, 1].
    Returns: ``(loss, {"ce": float, "kd": float})`` (``kd`` is 0 when w = 0 and not computed).
    """
    if not 0.0 <= distil_weight <= 1.0:
        raise ValueError(f"distil_weight must be in [0, 1], got {distil_weight!r}")
    s = student_logits[:, :-1]
    ce = F.cross_entropy(s.flatten(0, 1).float(), input_ids[:, 1:].flatten())
    if distil_weight == 0.0:
        return ce, {"ce": float(ce.detach())}
    kd = soft_label_ce(s, teacher_logits[:, :-1])
    loss = (1.0 - distil_weight) * ce + distil_weight * kd
    return loss, {"ce": float(ce.detach()), "kd": float(kd.detach())}


class TandemObjective(nn.Module):
    """``forward(input_ids [B, T]) -> (loss, metrics)`` for a TandemModel whose primary is frozen."""

    def __init__(self, tandem: TandemModel, distil_weight: float = 0.0, block_length: int = 2):
        super().__init__()
        if any(p.requires_grad for p in tandem.primary.parameters()):
            raise ValueError("tandem: the primary must be frozen (see freeze())")
        if not isinstance(block_length, int) or block_length < 1:
            raise ValueError(f"block_length must be a positive integer, got {block_length!r}")
        self.tandem = tandem
        self.distil_weight = float(distil_weight)
        self.block_length = block_length

    def train(self, mode: bool = True):
        super().train(mode)
        self.tandem.primary.eval()
        return self

    def logits(self, input_ids: torch.Tensor):
        """``(secondary_logits, primary_logits)``, each ``[B, T, V]``, from the γ-block forward."""
        out = self.tandem(input_ids, block_length=self.block_length)
        return out.secondary_logits, out.primary_logits

    def forward(self, input_ids: torch.Tensor):
        secondary_logits, primary_logits = self.logits(input_ids)
        return distil_loss(secondary_logits, primary_logits, input_ids, self.distil_weight)


class DistilObjective(nn.Module):
    """``forward(input_ids) -> (loss, metrics)``: student vs ground truth and a frozen teacher."""

    def __init__(self, student: LlamaForCausalLM, teacher: LlamaForCausalLM, distil_weight: float = 0.5):
        super().__init__()
        if any(p.requires_grad for p in teacher.parameters()):
            raise ValueError("teacher must be frozen (see freeze())")
        self.student = student
        self.teacher = teacher
        self.distil_weight = float(distil_weight)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, input_ids: torch.Tensor):
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids)
        return distil_loss(self.student(input_ids), teacher_logits, input_ids, self.distil_weight)


def tandem_config(primary: ModelConfig, secondary: ModelConfig, drafter: bool = True, router_top_k: int = 4,
                  router_hidden: int = 128, block_length: int = 2, dtype: str = "bfloat16") -> TandemConfig:
    """The TandemConfig used by this pipeline (default layer map, projection bias, drafter with
    the secondary's architecture, router on the secondary's embeddings)."""
    return TandemConfig(primary=primary, secondary=secondary, train_block_length=block_length,
                        projection_bias=True, drafter=secondary if drafter else None,
                        router=RouterConfig(embed_dim=secondary.hidden_size, top_k=router_top_k,
                                            hidden_size=router_hidden),
                        torch_dtype=dtype)


def build_tandem(primary: LlamaForCausalLM, secondary: LlamaForCausalLM, seed: int = 0,
                 block_length: int = 2) -> TandemModel:
    """A TandemModel (no drafter, no router) holding copies of ``primary`` (frozen) and
    ``secondary``; projections randomly initialised (nn.Linear default, seeded)."""
    cfg = TandemConfig(primary=primary.config, secondary=secondary.config, train_block_length=block_length,
                       projection_bias=True, torch_dtype="float32")
    torch.manual_seed(seed)
    model = TandemModel(cfg)
    model.primary.load_state_dict(primary.state_dict())
    model.secondary.load_state_dict(secondary.state_dict())
    freeze(model.primary)
    return model


def load_tandem_run(run_dir) -> TandemModel:
    """The TandemModel of a ``tools/train_tandem.py --mode tandem`` run (float32, eval, primary frozen)."""
    from tandem_rt.train.loop import load_run_state

    state = load_run_state(run_dir)
    extra = state["extra"]
    cfg = TandemConfig(primary=ModelConfig.from_dict(extra["primary_config"]),
                       secondary=ModelConfig.from_dict(extra["secondary_config"]),
                       train_block_length=extra["block_length"], projection_bias=True, torch_dtype="float32")
    model = TandemModel(cfg)
    model.load_state_dict({k[len("tandem."):]: v for k, v in state["model"].items() if k.startswith("tandem.")})
    freeze(model.primary)
    return model.eval()
