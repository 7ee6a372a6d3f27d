"""The float dtypes tandem_rt stores and computes in, and helpers to name and apply them."""
from __future__ import annotations

import contextlib
from typing import Union

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """``"bfloat16"`` or ``torch.bfloat16`` (also float32/float16) -> torch dtype (ValueError otherwise)."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> its name in ``tandem_config.json`` (``"bfloat16"``)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Temporarily make ``dtype`` torch's default (modules are then created in it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
