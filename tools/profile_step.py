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
    """Wraps functions and accumulates their wall time (``total``, seconds) and call count
    (``calls``) per label; :meth:`undo` restores them. ``label``: a string, or a function of the
    call's arguments that returns one."""

    def __init__(self):
        self.total = defaultdict(float)
        self.calls = defaultdict(int)
        self.restore = []

    def wrap(self, owner, name, label):
        fn = getattr(owner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                key = label(*a, **k) if callable(label) else label
                self.total[key] += time.perf_counter() - t
                self.calls[key] += 1
        setattr(owner, name, timed)
        self.restore.append((owner, name, fn))

    def undo(self):
        for owner, name, fn in reversed(self.restore):
            setattr(owner, name, fn)
        self.restore.clear()


class StepProbe:
    """Wraps one step function of ``tandem_rt.engine.steps`` (it runs on the engine's loop thread):
    calls ``warmup`` .. profile the next one with torch.profiler, then time ``steps`` more with
    the host timer's functions wrapped."""

    def __init__(self, name: str, label: str, warmup: int, steps: int, device, timer: "HostTimer", wrap_host):
        from tandem_rt.engine import steps as step_module

        self.module, self.name, self.label = step_module, name, label
        self.fn = getattr(step_module, name)
        self.warmup, self.steps, self.device = warmup, steps, device
        self.timer, self.wrap_host = timer, wrap_host
        self.calls, self.prof, self.wall, self.timed = 0, None, 0.0, 0
        setattr(step_module, name, self)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __call__(self, *a, **k):
        i = self.calls
        self.calls += 1
        if i < self.warmup or i > self.warmup + self.steps:
            return self.fn(*a, **k)
        if i == self.warmup:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            with profile(activities=acts, record_shapes=False) as prof:
                with record_function(self.label):
                    out = self.fn(*a, **k)
                self.sync()
            self.prof = prof
            self.wrap_host(self.timer)
            return out
        self.sync()
        t = time.perf_counter()
        out = self.fn(*a, **k)
        self.sync()
        self.wall += time.perf_counter() - t
        self.timed += 1
        return out

    def undo(self):
        setattr(self.module, self.name, self.fn)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="steps timed for the host-overhead figure")
    ap.add_argument("--out", default="profile_step")
    args = ap.parse_args(argv)
    from tandem_rt.engine import SamplingParams, steps

    _, engine = engine_from_args(args, max_batch_size=args.batch)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, engine.vocab_size, (args.context,), generator=g).tolist() for _ in range(args.batch)]
    params = SamplingParams(max_new_tokens=(args.steps + 4) * (args.gamma + 1) + 4, ignore_eos=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {}

    def wrap_host(timer):
        timer.wrap(steps, "build_meta", "build_meta")
        timer.wrap(engine.runner, "prepare_writes", "prepare_writes")
        timer.wrap(engine.scheduler, "commit", "commit")
        timer.wrap(engine.page_manager, "block_table", "block_table")
    for mode, label in (("primary", "decode step (primary)"), ("tandem-speed", f"tandem+speed iteration (γ={args.gamma})")):
        timer = HostTimer()
        probe = StepProbe("speculative_step", label, 2, args.steps, engine.device, timer, wrap_host)
        try:
            engine.generate(prompts, params, mode=mode, gamma=args.gamma)
        finally:
            probe.undo()
            timer.undo()
        prof = probe.prof
        prof.export_chrome_trace(str(out_dir / f"{mode}.trace.json"))
        sort = "self_cuda_time_total" if engine.device.type == "cuda" else "self_cpu_time_total"
        print(f"\n== {label}: batch {args.batch}, context {args.context}, {engine.device}")
        print(prof.key_averages().table(sort_by=sort, row_limit=20))
        n = max(probe.timed, 1)
        wall = probe.wall / n
        host = {k: 1000 * v / n for k, v in timer.total.items()}
        host_ms = sum(host.values())
        print(f"per step: wall {1000 * wall:.3f} ms, host bookkeeping {host_ms:.3f} ms "
              f"({100 * host_ms / max(1000 * wall, 1e-9):.1f}%): " + ", ".join(f"{k} {v:.3f} ms" for k, v in host.items()))
        summary[mode] = {"wall_ms": 1000 * wall, "host_ms": host_ms, "host_parts_ms": host, "steps": probe.timed}
    (out_dir / "summary.json").write_text(json.dumps({"batch": args.batch, "context": args.context,
                                                      "gamma": args.gamma, "device": str(engine.device),
                                                      "steps": summary}, indent=2))
    print(f"\nwrote {out_dir}/primary.trace.json, tandem-speed.trace.json, summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
