#!/usr/bin/env python
"""Draft-step cost of candidate secondary / drafter architectures relative to a primary decode step:
each candidate (depth x draft vocabulary, initialised from the primary as `tandem-rt train` does)
runs one paged decode row through the engine's forward, next to the primary's decode row.

    python tools/bench_draft_cost.py [--model DIR] [--dtype bfloat16] [--threads 1] \\
        [--layers 1,2,4] [--vocab 4096,8192,16384,0] [--json out.json]

``--vocab 0`` is the full vocabulary. Median of ``--calls`` calls after warm-up; prints a table of
ms per step and the ratio to the primary's step, and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import add_model_args, cpu_model, engine_from_args  # noqa: E402
from bench_forward import time_forward  # noqa: E402


def main(argv=None) -> int:
    from tandem_rt.engine.paged_model import PagedLlama
    from tandem_rt.paged import KVCache
    from tandem_rt.train.draft_training import init_small_model, small_model_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--layers", default="1,2,4")
    ap.add_argument("--vocab", default="4096,8192,16384,0")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args(argv)
    path, engine = engine_from_args(args, max_batch_size=1)
    prim = engine.model.primary
    base = time_forward(engine, engine.primary, engine.primary_cache, args.context, 1, args.calls)
    rows = []
    for L in (int(x) for x in args.layers.split(",")):
        for N in (int(x) for x in args.vocab.split(",")):
            N = None if N in (0, prim.config.vocab_size) else N
            cfg = small_model_config(prim.config, L, "primary", draft_vocab=N)
            subset = torch.arange(N, dtype=torch.int64) if N else None
            small = init_small_model(prim, cfg, "primary", vocab_subset=subset).to(engine.dtype).eval()
            paged = PagedLlama(small)
            cache = KVCache(L, engine.page_manager.num_pages, engine.page_manager.page_size,
                            cfg.num_key_value_heads, cfg.head_dim, engine.dtype, engine.device)
            t = time_forward(engine, paged, cache, args.context, 1, args.calls)
            rows.append({"layers": L, "draft_vocab": N or prim.config.vocab_size, "ms": 1e3 * t, "ratio": t / base})
    print(f"{path}: {args.device} ({cpu_model() if args.device == 'cpu' else args.device}), {args.dtype}, "
          f"{torch.get_num_threads()} thread(s), context {args.context}; primary decode step {1e3 * base:.3f} ms")
    print(f"{'layers':>6s} {'draft vocab':>11s} {'ms/step':>8s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['layers']:6d} {r['draft_vocab']:11d} {r['ms']:8.3f} {r['ratio']:6.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=str(path), device=args.device, cpu=cpu_model(),
                                                   dtype=args.dtype, threads=torch.get_num_threads(),
                                                   context=args.context, primary_ms=1e3 * base, rows=rows), indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
