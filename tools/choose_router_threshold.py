#!/usr/bin/env python
"""Choose the router threshold τ of a checkpoint by measured engine speed on the val split.

Greedy `tandem-speed` with gamma="auto" is timed for every τ of a grid, next to `primary` and
fixed γ, on prompts from `val` (never `test`), in one process; the τ with the lowest median
wall time per generated token wins. With `--write` it is stored in the checkpoint's
`tandem_config.json` (`router.threshold`); nothing else changes.

    python tools/choose_router_threshold.py --model runs/toy/ckpt \
        --threads 1 --json docs/benchmarks/<date>-cpu-toy-router-threshold.json --write
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import tandem_rt  # noqa: E402
from accepted_per_block import split_prompts  # noqa: E402
from tandem_rt.checkpoint import CONFIG_NAME  # noqa: E402
from tandem_rt.paths import default_model_path  # noqa: E402


def time_mode(engine, prompts, params, mode, gamma, repeats: int, reference=None) -> dict:
    """Median over ``repeats`` of the wall time per generated token (prompts one at a time, batch 1)."""
    per_token, accepted, blocks, tokens = [], 0, 0, None
    for _ in range(repeats):
        t0, n = time.perf_counter(), 0
        out = []
        for p in prompts:
            r = engine.generate([p], params, mode=mode, gamma=gamma)[0]
            out.append(r.token_ids)
            n += len(r.token_ids)
            accepted += r.stats.get("accepted_tokens", 0)
            blocks += r.stats.get("blocks", 0)
        per_token.append((time.perf_counter() - t0) / n)
        tokens = out
    if reference is not None and tokens != reference:
        raise SystemExit(f"{mode} gamma={gamma} did not reproduce the primary's greedy tokens")
    return {"mode": mode, "gamma": gamma, "ms_per_token": 1e3 * statistics.median(per_token),
            "accepted_per_block": accepted / blocks if blocks else None, "tokens": tokens}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--thresholds", default="0.3,0.4,0.5,0.6,0.65,0.7,0.75,0.8,0.85,0.9")
    ap.add_argument("--gammas", default="2,3,4,5,6,8", help="fixed γ timed for comparison")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", help="write the table as JSON here")
    ap.add_argument("--write", action="store_true", help="store the best τ in the checkpoint's config")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else default_model_path()
    engine = tandem_rt.Engine.from_pretrained(path, device=args.device, dtype=args.dtype, max_batch_size=1,
                                              quantized=False)
    router = engine.model.config.router
    if router is None:
        raise SystemExit(f"{path} has no router")
    prompts = split_prompts("val", args.prompts, args.prompt_tokens, engine.tokenizer)
    params = tandem_rt.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:1], params, mode="tandem-speed", gamma=2)  # warm-up
    base = time_mode(engine, prompts, params, "primary", 1, args.repeats)
    reference = base["tokens"]
    rows = [base]
    old = router.threshold
    print(f"{'mode':<14}{'γ / τ':>8}{'ms/token':>10}{'speedup':>9}{'acc/block':>10}")

    def show(row, label):
        acc = f"{row['accepted_per_block']:.2f}" if row["accepted_per_block"] is not None else "-"
        print(f"{row['mode']:<14}{label:>8}{row['ms_per_token']:10.3f}"
              f"{base['ms_per_token'] / row['ms_per_token']:9.2f}{acc:>10}", flush=True)

    show(base, "-")
    for g in (int(x) for x in args.gammas.split(",")):
        rows.append(time_mode(engine, prompts, params, "tandem-speed", g, args.repeats, reference))
        show(rows[-1], str(g))
    auto = []
    try:
        for tau in (float(x) for x in args.thresholds.split(",")):
            router.threshold = tau
            row = time_mode(engine, prompts, params, "tandem-speed", "auto", args.repeats, reference)
            row["threshold"] = tau
            auto.append(row)
            show(row, f"τ={tau:g}")
    finally:
        router.threshold = old
    best = min(auto, key=lambda r: r["ms_per_token"])
    best_fixed = min(rows[1:], key=lambda r: r["ms_per_token"])
    print(f"best τ = {best['threshold']:g} ({best['ms_per_token']:.3f} ms/token); best fixed γ = "
          f"{best_fixed['gamma']} ({best_fixed['ms_per_token']:.3f}); auto / best fixed speedup "
          f"{best_fixed['ms_per_token'] / best['ms_per_token']:.3f}x")
    if args.json:
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        strip = lambda r: {k: v for k, v in r.items() if k != "tokens"}  # noqa: E731
        Path(args.json).write_text(json.dumps({
            "model": str(path), "device": device, "threads": torch.get_num_threads(), "split": "val",
            "prompts": len(prompts), "prompt_tokens": args.prompt_tokens, "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats, "rows": [strip(r) for r in rows + auto], "best_threshold": best["threshold"],
            "best_fixed_gamma": best_fixed["gamma"]}, indent=1))
    if args.write:
        cfg_file = path / CONFIG_NAME
        data = json.loads(cfg_file.read_text())
        data["router"]["threshold"] = best["threshold"]
        cfg_file.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote router.threshold = {best['threshold']:g} to {cfg_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
