"""The CUDA few-row quantized product (csrc/kernels/linear_rows_q.cuh), run on the CPU.

csrc/emulation/linear_rows_q_emulator.cpp compiles the real kernel source as a host program (one
std::thread per CUDA thread, shared memory and y poisoned with NaN, guards around y) and compares
it with a float64 reference on the same GGUF blocks: every block format, fp32 and bf16, row counts
around the kernel's 8-row passes (1..32, the decode and verify rows), K across its 512-column
staging chunks, N not a multiple of the 4 columns of a CTA, strided x rows, a bias or a residual.
It does not check timing or the GPU memory model; the GPU runs do (tools/device_check.sh).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from emulation_build import build_emulator, run_emulator


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    return build_emulator("linear_rows_q_emulator.cpp", tmp_path_factory.mktemp("lrq_emulation") / "lrq_emulator")


def _cases():
    cases = []
    shapes = [(1, 5, 32), (3, 37, 544), (8, 4, 1024), (9, 6, 64), (17, 3, 1088), (32, 7, 576)]
    for i, (m, n, k) in enumerate(shapes):
        for qtype in (0, 1, 2):
            dtype = ("fp32", "bf16")[(i + qtype) % 2]
            add = ("none", "bias", "rows")[(i + qtype) % 3]
            cases.append((f"{dtype}-q{qtype}-m{m}-n{n}-k{k}-{add}",
                          dict(dtype=dtype, qtype=qtype, m=m, n=n, k=k, add=add, x_extra=(0, 3, 16)[i % 3],
                               seed=100 + 3 * i + qtype)))
    return cases


CASES = _cases()


@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[i for i, _ in CASES])
def test_emulated_kernel_matches_reference(emulator, case):
    res = run_emulator(emulator, **case)
    assert res.returncode == 0, f"rc={res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    assert res.stdout.startswith("OK")


def test_emulator_reports_a_planted_fault(emulator):
    """The checker can fail: a weight byte changed after the kernel ran must show as a mismatch."""
    res = run_emulator(emulator, qtype=2, m=2, n=4, k=128, fault="flip_weight")
    assert res.returncode == 1 and "mismatch" in res.stdout, res.stdout


def test_emulator_rejects_bad_case(emulator):
    res = run_emulator(emulator, k=48)   # not a multiple of 32
    assert res.returncode == 2 and "bad case" in res.stderr
