"""Argument checks shared by the op wrappers; each raises ``ValueError`` naming the argument."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(t, name: str, *, rank: int | None = None, dtype=None, device=None, contiguous: bool = False):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in allowed:
            raise ValueError(f"{name} must have dtype {' or '.join(map(str, allowed))}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_heads_packed(t: torch.Tensor, name: str):
    """``[N, H, D]`` with packed heads: rows may be strided views (e.g. slices of a QKV output)."""
    _, h, d = t.shape
    if (d > 1 and t.stride(2) != 1) or (h > 1 and t.stride(1) != d):
        raise ValueError(f"{name} must have packed heads (stride[-1] == 1, stride[-2] == head_dim), "
                         f"got strides {t.stride()}")


def check_shape(t: torch.Tensor, name: str, shape: tuple):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


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
