"""Building and running the host emulators of the CUDA kernels (csrc/emulation/): the real kernel
source compiled by the host C++ compiler against the CUDA toolkit's headers, no GPU."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EMULATION_DIR = REPO_ROOT / "csrc" / "emulation"
RUN_TIMEOUT_S = 150  # the emulators give up after 120 s (deadlock guard)


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory (cuda_fp16.h / cuda_bf16.h / cuda_runtime.h), or None."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parents[1]))
    for root in filter(None, roots):
        inc = Path(root) / "include"
        if all((inc / h).is_file() for h in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h")):
            return inc
    return None


def build_emulator(source: str, exe: Path) -> Path:
    """Compile ``csrc/emulation/<source>`` into ``exe``; skips only without toolkit headers or a
    host compiler, fails on a compile error."""
    include = cuda_include_dir()
    if include is None:
        pytest.skip("no CUDA toolkit headers (set CUDA_HOME); the emulator needs cuda_fp16.h / cuda_bf16.h")
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx:
        pytest.skip("no host C++ compiler (g++ or $CXX) to build the emulator")
    cmd = [cxx, "-std=c++20", "-O2", "-fno-strict-aliasing", "-pthread", f"-I{include}", f"-I{REPO_ROOT / 'csrc'}",
           str(EMULATION_DIR / source), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"emulator build failed: {' '.join(cmd)}\n{res.stderr[-6000:]}"
    return exe


def run_emulator(exe: Path, **case) -> subprocess.CompletedProcess:
    """``exe key=value ...`` (lists as comma-separated values)."""
    args = [f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in case.items()]
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
