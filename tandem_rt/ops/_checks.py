"""Argument checks shared by the op wrappers; each raises ``ValueError`` naming the argument."""
from __future__ import annotations

import torch


def check_tensor(t, name: str, *, rank: int | None = None, device=None) -> None:
    """ValueError naming ``name`` unless ``t`` is a tensor (of ``rank`` dimensions, on ``device``,
    where given): what a wrapper needs before it reads ``t``'s shape or device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def check_tensors_on(device: torch.device, **named) -> None:
    """ValueError naming the first argument that is not a tensor on ``device`` (None allowed where the
    op takes it). The ops check dtype, rank, shape and contiguity themselves, naming the argument;
    the device is checked here because the dispatcher picks an op's kernel from all of its tensors:
    one on another device (e.g. ``meta``) would reach no kernel, or the wrong one."""
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(f"{name} must be on {device}, got {t.device}")
