"""The tensor-core paged-attention kernel (csrc/kernels/paged_attention_mma.cuh), run on the CPU.

csrc/emulation/ compiles the real kernel source as a host program (g++, CUDA headers only, no GPU):
one std::thread per CUDA thread, the inline PTX (cp.async, ldmatrix, mma.sync) replaced by emulations
written from the PTX ISA, NaN-poisoned memory and bounds / alignment traps, and a float64 reference
(see csrc/emulation/mma_emulator.cpp). This checks the kernel's indexing, fragment layouts, swizzle,
masking, online softmax, pipeline synchronisation (copies landing at the wait or at issue) and split
partials; it does not check hardware timing, the GPU memory model or compiler reordering, which only
the GPU tests (test_op_paged_attention.py, the mma cases) can.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from emulation_build import build_emulator, run_emulator


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    """Builds csrc/emulation/mma_emulator.cpp once per session; skips only without toolkit or compiler."""
    return build_emulator("mma_emulator.cpp", tmp_path_factory.mktemp("mma_emulation") / "mma_emulator")


_run = run_emulator


def _cases():
    """The battery: (id, case). Every (dtype, head_dim) gets a decode-like, a GQA-8 strided-q, a
    prefill-like group-1 and a split case; page sizes and the cp.async mode rotate among them."""
    cases = []
    combos = [(dt, d) for dt in ("bf16", "fp16") for d in (32, 64, 128)]
    for i, (dt, d) in enumerate(combos):
        page = (8, 16, 32)[i % 3]
        land = ("wait", "issue")[i % 2]
        base = dict(dtype=dt, d=d, seed=10 + i)
        cases += [
            # decode-ish, ragged with an empty sequence; group 4, 12 rows -> MT = 1
            (f"{dt}-d{d}-decode-g4-p{page}", dict(base, page=page, hq=8, hkv=2, qlens=[1, 3, 0, 2],
                                                  seqs=[37, 70, 5, 130], cp_async="wait")),
            # group 8, 72 rows -> MT = 2 over 3 row tiles; strided q (padding is NaN)
            (f"{dt}-d{d}-g8-strided-q", dict(base, page=8, hq=8, hkv=1, qlens=[5, 9, 1], seqs=[100, 9, 200],
                                            q_extra=8, cp_async=land)),
            # group 1, prefill-like (first sequence has no cached prefix), 17 rows -> MT = 2
            (f"{dt}-d{d}-prefill-g1-p32", dict(base, page=32, hq=4, hkv=4, qlens=[17, 1], seqs=[17, 300],
                                               cp_async=("issue", "wait")[i % 2])),
            # group 3, 33 rows -> 2 row tiles; KV splits of 128 (empty splits for the short sequence)
            (f"{dt}-d{d}-split128-g3-p{page}", dict(base, page=page, hq=6, hkv=2, qlens=[11, 2, 0],
                                                   seqs=[330, 140, 3], split=128, q_extra=16, cp_async=land)),
        ]
    # page boundaries: lengths 1, P - 1, P, P + 1, 2P + 3 with ragged queries, group 2
    for page, dt in ((8, "fp16"), (16, "bf16"), (32, "fp16")):
        seqs = [1, page - 1, page, page + 1, 2 * page + 3]
        cases.append((f"{dt}-d64-page-boundaries-p{page}",
                      dict(dtype=dt, d=64, page=page, hq=4, hkv=2, qlens=[1, min(page - 1, 5), 0, 8, 7], seqs=seqs,
                           seed=30 + page)))
    cases += [
        # many row tiles (group 8, 20 tokens = 160 rows) with split 64
        ("bf16-d128-g8-rowtiles-split64", dict(dtype="bf16", d=128, page=16, hq=16, hkv=2, qlens=[20, 1],
                                               seqs=[200, 20], split=64, seed=41)),
        # MT forced to 2 with a single row; MT forced to 1 with 48 rows (3 row tiles of 16)
        ("fp16-d64-mt2-forced", dict(dtype="fp16", d=64, page=32, hq=2, hkv=2, qlens=[1, 1], seqs=[64, 65],
                                     mt=2, seed=42)),
        ("bf16-d32-mt1-forced-g4", dict(dtype="bf16", d=32, page=8, hq=4, hkv=1, qlens=[12, 4], seqs=[12, 90],
                                        mt=1, cp_async="issue", seed=43)),
        # every sequence is decode-only with exactly one key (first token)
        ("fp16-d128-single-key", dict(dtype="fp16", d=128, page=16, hq=8, hkv=8, qlens=[1, 1], seqs=[1, 1],
                                      seed=44)),
    ]
    return cases


CASES = _cases()


@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[i for i, _ in CASES])
def test_emulated_kernel_matches_reference(emulator, case):
    res = _run(emulator, **case)
    assert res.returncode == 0, f"rc={res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    assert "bad=0" in res.stdout


def test_emulator_reports_a_planted_fault(emulator):
    """The checker can fail: with every thread's first cp.async wait dropped, tile 0 is computed from
    NaN shared memory and the run must end in a mismatch (exit 1), not pass and not crash."""
    res = _run(emulator, dtype="bf16", d=64, page=16, hq=8, hkv=2, qlens=[3, 1], seqs=[40, 100],
               fault="skip_first_wait")
    assert res.returncode == 1, f"rc={res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    assert "mismatch" in res.stdout


def test_emulator_rejects_bad_case(emulator):
    res = _run(emulator, qlens=[3], seqs=[2])  # q_len > seq_len
    assert res.returncode == 2 and "q_len" in res.stderr
