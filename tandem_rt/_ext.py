"""Load the native extension ``tandem_rt._C`` and refuse a mismatched build clearly.

An extension compiled against one torch cannot be loaded into another (the C++ ABI
differs), and the raw failure is an ``undefined symbol`` traceback. This module checks
the sidecar ``_C_build.json`` written at build time first and explains how to rebuild.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

_PKG_DIR = Path(__file__).resolve().parent
_REBUILD = ("rebuild it against the installed torch with "
            "`pip install --no-build-isolation -e .` in the tandem_rt source tree")


def _check_sidecar() -> None:
    sidecar = _PKG_DIR / "_C_build.json"
    if not sidecar.exists():
        return  # an older build without a sidecar: the import below still gets a clear message
    built = json.loads(sidecar.read_text())
    if built.get("torch_version") != torch.__version__:
        raise ImportError(
            f"tandem_rt's extension was built against torch {built.get('torch_version')}, "
            f"but torch {torch.__version__} is installed; {_REBUILD}")


def load_extension():
    """Import and return ``tandem_rt._C`` (raises ImportError with rebuild instructions)."""
    _check_sidecar()
    try:
        from tandem_rt import _C  # noqa: F401  (registers torch.ops.tandem_rt.*)
    except ImportError as exc:
        msg = str(exc)
        if "undefined symbol" in msg or "version" in msg.lower():
            raise ImportError(
                f"tandem_rt's extension does not match the installed torch {torch.__version__} "
                f"({msg.splitlines()[0]}); {_REBUILD}") from exc
        raise ImportError(f"tandem_rt's extension tandem_rt._C is not built ({msg}); {_REBUILD}") from exc
    return _C


_C = load_extension()
