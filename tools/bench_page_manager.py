"""Host overhead of the page manager per speculative engine step.

Each step, for a batch of B live sequences of length n (after a prompt of ``--context`` tokens):

1. ``prepare_write(seq, n, n + gamma + 1)`` for every sequence (draft + verify positions),
2. ``block_table(ids, max_pages=...)`` to an int32 tensor (fixed width, as a CUDA graph needs),
3. slot mappings: ``gamma`` draft steps of one position per sequence and one verify block of
   ``gamma + 1`` positions per sequence (``batch_slot_mapping`` to int64 tensors),
4. rollback: ``truncate`` to the accepted length (random 0..gamma+1 accepted tokens) and
   ``set_primary_len``/``set_secondary_len``.

Prints a table of microseconds per step (total and per phase) and writes JSON.

    python tools/bench_page_manager.py [--batch 1 8 32 64] [--gamma 4] [--context 512] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

from tandem_rt.paged import PageManager

PHASES = ("prepare_write", "block_table", "slot_mapping", "rollback")


def bench(batch: int, gamma: int, context: int, page_size: int, steps: int, warmup: int, seed: int = 0) -> dict:
    """Mean microseconds per step and phase over ``steps`` timed steps after ``warmup`` steps."""
    rng = random.Random(seed)
    max_len = context + (steps + warmup) * (gamma + 1) + page_size
    max_pages = -(-max_len // page_size)
    pm = PageManager(batch * max_pages + 8, page_size)
    ids = list(range(batch))
    for sid in ids:
        pm.add_sequence(sid)
        pm.prepare_write(sid, 0, context)
        pm.set_primary_len(sid, context)
        pm.set_secondary_len(sid, context)
    totals = dict.fromkeys(PHASES, 0)
    clock = time.perf_counter_ns
    for step in range(warmup + steps):
        t0 = clock()
        lens = [pm.num_tokens(sid) for sid in ids]
        for sid, n in zip(ids, lens):
            pm.prepare_write(sid, n, n + gamma + 1)
        t1 = clock()
        block_table = pm.block_table(ids, max_pages=max_pages)
        t2 = clock()
        for j in range(gamma):
            draft_slots = pm.batch_slot_mapping(ids, [n + j for n in lens], [n + j + 1 for n in lens])
        verify_slots = pm.batch_slot_mapping(ids, lens, [n + gamma + 1 for n in lens])
        t3 = clock()
        for sid, n in zip(ids, lens):
            accepted = rng.randint(0, gamma + 1)
            pm.truncate(sid, n + accepted)
            pm.set_primary_len(sid, n + accepted)
            pm.set_secondary_len(sid, n + accepted)
        t4 = clock()
        if step >= warmup:
            for name, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                totals[name] += dt
    assert block_table.shape == (batch, max_pages) and verify_slots.numel() == batch * (gamma + 1)
    assert draft_slots.numel() == batch
    pm.check_invariants()
    per_step = {name: totals[name] / steps / 1e3 for name in PHASES}
    per_step["total"] = sum(per_step.values())
    return {"batch": batch, "gamma": gamma, "context": context, "page_size": page_size, "steps": steps,
            "us_per_step": per_step}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="runs/bench_page_manager.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for b in args.batch:
        # Best of --repeats runs (mean over the steps of each run): robust on a shared machine.
        runs = [bench(b, args.gamma, args.context, args.page_size, args.steps, args.warmup, seed=r)
                for r in range(args.repeats)]
        best = min(runs, key=lambda r: r["us_per_step"]["total"])
        best["all_totals_us"] = [r["us_per_step"]["total"] for r in runs]
        rows.append(best)
    print(f"page manager host overhead per step (us), gamma={args.gamma}, context={args.context}, "
          f"page_size={args.page_size}, best of {args.repeats} x {args.steps} steps, CPU: {cpu_model()}")
    header = f"{'batch':>5} " + " ".join(f"{p:>14}" for p in PHASES) + f" {'total':>10} {'per seq':>9}"
    print(header)
    for r in rows:
        us = r["us_per_step"]
        print(f"{r['batch']:>5} " + " ".join(f"{us[p]:>14.1f}" for p in PHASES)
              + f" {us['total']:>10.1f} {us['total'] / r['batch']:>9.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_model(), "python": platform.python_version(),
                               "torch": torch.__version__, "args": vars(args), "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
