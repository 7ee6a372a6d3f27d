#!/usr/bin/env python
"""Where a speculative block's time goes in real generation: wall time of each phase of
``steps.speculative_step`` (the drafting models' forwards and the rest of ``steps.draft``, the
primary's verify forward, the Tandem refresh, the verification op, the remainder of the step),
summed over greedy generations of the prompts and divided per block and per token.

    python tools/profile_block.py [--model DIR] [--dtype bfloat16] [--threads 1] [--quantized] \\
        [--draft-quantization Q8_0] [--mode tandem-speed] [--gamma 3] [--json out.json]

Unlike ``bench_forward.py`` (one model's forward timed alone in a loop, its weights warm in the
caches), the phases here run as the engine runs them, so a drafting model's forward pays for the
primary's weight stream having evicted its weights. The phases are timed by wrapping the engine's
functions with ``time.perf_counter`` (the wrappers cost a few µs per call). Forwards are labelled
by pool and row count, so the prompts' prefills appear as rows of their own; ``refresh`` also
counts the prefills' refreshes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import add_model_args, cpu_model, engine_from_args  # noqa: E402
from profile_step import HostTimer  # noqa: E402


def instrument(engine, timer: HostTimer) -> None:
    """Wrap the phases of a speculative step: each model's ``forward`` (labelled with its pool and
    row count), ``steps.draft``, ``steps.speculative_step``, the runner's Tandem refresh and
    ``run_verify``."""
    from tandem_rt.engine import model_runner, steps

    pools = [("primary", engine.primary), ("secondary", engine.secondary), ("drafter", engine.drafter)]
    for pool, model in pools:
        if model is not None:
            timer.wrap(model, "forward", lambda ids, *a, _p=pool, **k: f"{_p} forward, {ids.shape[0]} row(s)")
    timer.wrap(engine.runner, "refresh", "refresh")
    timer.wrap(model_runner, "run_verify", "verify op")
    timer.wrap(steps, "draft", "draft (whole)")
    timer.wrap(steps, "speculative_step", "speculative step (whole)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--mode", default="tandem-speed", choices=["speed", "tandem-speed"])
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--prompts-file", default=str(Path(__file__).resolve().parent / "prompts.txt"),
                    help="one prompt per line (a checkpoint without a tokenizer: 4 random prompts instead)")
    ap.add_argument("--prompt-len", type=int, default=16, help="tokens of each random prompt")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args(argv)
    from tandem_rt.engine import SamplingParams

    path, engine = engine_from_args(args)
    if engine.tokenizer is None:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(2, engine.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(4)]
    else:
        prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"--prompts-file {args.prompts_file}: no prompts")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=8, ignore_eos=True), mode=args.mode,
                    gamma=args.gamma)                                     # warm-up
    timer = HostTimer()
    instrument(engine, timer)
    tokens, accepted = 0, []
    t0 = time.perf_counter()
    try:
        for p in prompts:   # one request at a time: batch 1, as bench_e2e's batch-1 rows
            r = engine.generate([p], params, mode=args.mode, gamma=args.gamma)[0]
            tokens += len(r.token_ids)
            accepted.append(r.stats.get("mean_accepted"))
    finally:
        timer.undo()
    wall = time.perf_counter() - t0
    blocks = timer.calls["speculative step (whole)"]
    rows = sorted(((k, (timer.calls[k], s)) for k, s in timer.total.items()), key=lambda kv: -kv[1][1])
    print(f"{path}: {args.device} ({cpu_model() if args.device == 'cpu' else args.device}), {args.dtype}, "
          f"{torch.get_num_threads()} thread(s), quantized primary: {args.quantized}, drafts: "
          f"{args.draft_quantization}; {args.mode} γ={args.gamma}, {len(prompts)} prompts x {args.max_new_tokens} "
          f"tokens: {1e3 * wall / tokens:.2f} ms/token, {blocks} blocks, {tokens / max(blocks, 1):.2f} tokens/block")
    print(f"{'phase':40s} {'calls':>6s} {'ms/call':>8s} {'ms/block':>9s} {'ms/token':>9s}")
    for label, (calls, sec) in rows:
        print(f"{label:40s} {calls:6d} {1e3 * sec / calls:8.3f} {1e3 * sec / max(blocks, 1):9.3f} "
              f"{1e3 * sec / tokens:9.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            model=str(path), device=args.device, device_name=cpu_model() if args.device == "cpu" else args.device,
            dtype=args.dtype, threads=torch.get_num_threads(), quantized=args.quantized,
            draft_quantization=args.draft_quantization, mode=args.mode, gamma=args.gamma, prompts=len(prompts),
            tokens=tokens, blocks=blocks, wall_s=wall, mean_accepted=accepted,
            phases={label: dict(calls=c, total_ms=1e3 * s) for label, (c, s) in rows}), indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
