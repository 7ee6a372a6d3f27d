#!/usr/bin/env python
"""Time one paged forward of each model of a checkpoint for a decode row and verify blocks of
several rows (one sequence at a given context): what a draft step and a verify step cost.

    python tools/bench_forward.py [--model DIR] [--dtype bfloat16] [--threads 1] [--context 64] \\
        [--rows 1,2,4,6,8] [--json out.json]

Median over ``--calls`` calls after warm-up, per model and row count; prints a table and writes JSON.
Each time is also given as the weight bytes the forward reads per second, and as a fraction of the
streaming read bandwidth measured in the same run (``bench_kernels.measure_read_bandwidth``): a
decode step streams every weight once, so that fraction is how close it is to the memory bound.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import add_model_args, cpu_model, engine_from_args  # noqa: E402
from bench_kernels import measure_read_bandwidth  # noqa: E402


def weight_bytes(model) -> int:
    """Bytes of the matrices and norms one forward of a :class:`PagedLlama` reads (every layer's
    weights, the final norm and the LM head; the embedding rows it gathers are not counted)."""
    from tandem_rt.quantized import QuantMatrix

    total = model.lm_head.nbytes + model.final_norm.nbytes
    for lw in model.layers:
        total += sum(t.nbytes for t in lw if isinstance(t, (torch.Tensor, QuantMatrix)))
    return total


def time_forward(engine, model, cache, context: int, rows: int, calls: int) -> float:
    """Median seconds of ``model.forward`` over ``rows`` rows ending at position ``context + rows``."""
    from tandem_rt.engine.paged_model import build_meta

    pm = engine.page_manager
    sid = ("bench_forward", id(model), rows)
    pm.add_sequence(sid)
    try:
        pm.prepare_write(sid, 0, context + rows)
        meta = build_meta(pm, [sid], [context], [context + rows], [context], engine.device)
        ids = torch.full((rows,), 5, dtype=torch.int64, device=engine.device)
        last = meta.last_rows if rows == 1 else None
        sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
        for _ in range(10):
            model.forward(ids, meta, cache.k, cache.v, logits_rows=last)
        times = []
        for _ in range(calls):
            sync()
            t = time.perf_counter()
            model.forward(ids, meta, cache.k, cache.v, logits_rows=last)
            sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    finally:
        pm.free(sid)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--context", type=int, default=64, help="cached positions before the rows")
    ap.add_argument("--rows", default="1,2,4,6,8", help="rows per forward (1 = decode)")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args(argv)
    path, engine = engine_from_args(args)
    rows = [int(r) for r in args.rows.split(",")]
    models = [("primary", engine.primary, engine.primary_cache), ("secondary", engine.secondary, engine.secondary_cache)]
    if engine.drafter is not None:
        models.append(("drafter", engine.drafter, engine.drafter_cache))
    table = {name: {r: time_forward(engine, m, c, args.context, r, args.calls) for r in rows} for name, m, c in models}
    sizes = {name: weight_bytes(m) for name, m, _ in models}
    read_gbps = measure_read_bandwidth(engine.device)
    print(f"{path}: {args.device} ({cpu_model() if args.device == 'cpu' else args.device}), {args.dtype}, "
          f"{torch.get_num_threads()} thread(s), context {args.context}; ms per forward (median of {args.calls}); "
          f"streaming read bandwidth {read_gbps:.1f} GB/s")
    print(f"{'model':10s} {'weights MB':>10s} " + " ".join(f"{f'{r} rows':>9s}" for r in rows)
          + "   (1-row GB/s, % of read bandwidth)")
    for name, times in table.items():
        gbps = sizes[name] / times[rows[0]] / 1e9
        print(f"{name:10s} {sizes[name] / 1e6:10.1f} " + " ".join(f"{1e3 * times[r]:9.3f}" for r in rows)
              + f"   {gbps:.1f} GB/s, {100 * gbps / read_gbps:.0f}% (at {rows[0]} rows)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            model=str(path), device=args.device, device_name=cpu_model() if args.device == "cpu" else args.device,
            dtype=args.dtype, threads=torch.get_num_threads(), context=args.context, read_gbps=read_gbps,
            weight_bytes=sizes, ms={n: {str(r): 1e3 * t for r, t in v.items()} for n, v in table.items()},
            pct_read_bandwidth={n: {str(r): 100 * sizes[n] / t / 1e9 / read_gbps for r, t in v.items()}
                                for n, v in table.items()}), indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
