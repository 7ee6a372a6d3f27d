#!/usr/bin/env python
"""Profile one decode step (``primary``) and one Tandem + SPEED iteration (draft γ + verify +
refresh) with torch.profiler: prints a table of time per op for each, writes Chrome traces, and
measures the host-side overhead per step (page manager, index building, bookkeeping: everything
that is not a torch op) by timing those functions.

    python tools/profile_step.py --model DIR [--device cpu] [--batch 4] [--context 256] [--gamma 4]
    python tools/profile_step.py --random-checkpoint /tmp/rand_ckpt ...
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import add_model_args, engine_from_args  # noqa: E402


class HostTimer:
    """Wraps host-side functions and accumulates their wall time."""

    def __init__(self):
        self.total = defaultdict(float)
        self.restore = []

    def wrap(self, owner, name, label):
        fn = getattr(owner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total[label] += time.perf_counter() - t
        setattr(owner, name, timed)
        self.restore.append((owner, name, fn))

    def undo(self):
        for owner, name, fn in reversed(self.restore):
            setattr(owner, name, fn)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="steps timed for the host-overhead figure")
    ap.add_argument("--out", default="profile_step")
    args = ap.parse_args(argv)
    from tandem_rt.engine import SamplingParams, generation

    _, engine = engine_from_args(args, max_batch_size=args.batch)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, engine.vocab_size, (args.context,), generator=g).tolist() for _ in range(args.batch)]
    params = SamplingParams(max_new_tokens=(args.steps + 4) * (args.gamma + 1) + 4, ignore_eos=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for mode, label in (("primary", "decode step (primary)"), ("tandem-speed", f"tandem+speed iteration (γ={args.gamma})")):
        gen = generation.Generation(engine, prompts, params, mode, args.gamma, True)
        events = gen.events()
        next(events)                       # admission: prefill and the first token
        for _ in range(2):                 # warm-up steps
            list(gen._step())
            list(gen._retire())
        sync = (lambda: torch.cuda.synchronize()) if engine.device.type == "cuda" else (lambda: None)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
        with profile(activities=acts, record_shapes=False) as prof:
            with record_function(label):
                list(gen._step())
            sync()
        prof.export_chrome_trace(str(out_dir / f"{mode}.trace.json"))
        sort = "self_cuda_time_total" if engine.device.type == "cuda" else "self_cpu_time_total"
        print(f"\n== {label}: batch {args.batch}, context {args.context}, {engine.device}")
        print(prof.key_averages().table(sort_by=sort, row_limit=20))
        # host overhead: functions that only do host work
        timer = HostTimer()
        timer.wrap(generation, "build_meta", "build_meta")
        for name in ("_prepare", "_set_lens", "_commit", "_event"):
            timer.wrap(gen, name, name)
        timer.wrap(engine.page_manager, "block_table", "block_table")
        sync()
        t = time.perf_counter()
        steps = 0
        for _ in range(args.steps):
            if not gen.active:
                break
            list(gen._step())
            list(gen._retire())
            steps += 1
        sync()
        wall = (time.perf_counter() - t) / max(steps, 1)
        timer.undo()
        host = {k: 1000 * v / max(steps, 1) for k, v in timer.total.items()}
        host_ms = sum(v for k, v in host.items() if k != "block_table") + host.get("block_table", 0)
        print(f"per step: wall {1000 * wall:.3f} ms, host bookkeeping {host_ms:.3f} ms "
              f"({100 * host_ms / (1000 * wall):.1f}%): " + ", ".join(f"{k} {v:.3f} ms" for k, v in host.items()))
        summary[mode] = {"wall_ms": 1000 * wall, "host_ms": host_ms, "host_parts_ms": host, "steps": steps}
        events.close()
    (out_dir / "summary.json").write_text(json.dumps({"batch": args.batch, "context": args.context,
                                                      "gamma": args.gamma, "device": str(engine.device),
                                                      "steps": summary}, indent=2))
    print(f"\nwrote {out_dir}/primary.trace.json, tandem-speed.trace.json, summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
