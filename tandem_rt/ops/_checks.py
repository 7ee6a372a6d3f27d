"""Argument checks shared by the op wrappers; each raises ``ValueError`` naming the argument."""
from __future__ import annotations

from typing import Optional

import torch


def check_tensors(device: Optional[torch.device] = None, /, **named) -> torch.device:
    """ValueError naming the first argument that is not a tensor on ``device`` (default: the first
    argument's device; None values allowed after the first, for the ops' optional tensors); returns
    the device. The ops check dtype, rank, shape and contiguity themselves, naming the argument; the
    device is checked here because the dispatcher picks an op's kernel from all of its tensors: one
    on another device (e.g. ``meta``) would reach no kernel, or the wrong one."""
    for i, (name, t) in enumerate(named.items()):
        if t is None and i > 0:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{name} must be on {device}, got {t.device}")
    return device
