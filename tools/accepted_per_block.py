#!/usr/bin/env python
"""Mean accepted drafts per block through the engine: `speed` (standalone drafter) vs
`tandem-speed` (Tandem secondary), greedy and sampled, on prompts from a data split (paper Table 2 column).
The Tandem gain comes with a 95% paired bootstrap interval over the prompts (tandem_rt.stats).

    python tools/accepted_per_block.py --split test --gammas 3,5,7 --temperatures 0,1 --prompts 24 \
        --json docs/benchmarks/<date>-cpu-<model>-accepted.json
"""
from __future__ import annotations

import argparse
import json
import lzma
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tandem_rt  # noqa: E402
from tandem_rt.cli import draft_quantization as cli_draft_quantization  # noqa: E402
from tandem_rt.paths import default_data_dir  # noqa: E402
from tandem_rt.stats import paired_ratio_gain  # noqa: E402


def split_prompts(split: str, count: int, tokens: int, tokenizer) -> list:
    """The first ``count`` paragraphs of at least 200 characters, cut to ``tokens`` token ids."""
    prompts = []
    with lzma.open(default_data_dir() / f"{split}.txt.xz", "rt", encoding="utf-8") as fh:
        for line in fh:
            if len(line) >= 200:
                prompts.append(tokenizer.encode(line.strip()).ids[:tokens])
                if len(prompts) == count:
                    break
    return prompts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--gammas", default="3,5,7")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="engine dtype (default: the checkpoint's)")
    ap.add_argument("--temperatures", default="0", help="comma-separated; 0 = greedy (checked equal to "
                    "primary), > 0 = speculative sampling (lossless by construction; seeded)")
    ap.add_argument("--draft-quantization", default="none", choices=["none", "Q8_0", "Q4_1"],
                    help="the drafting models read their matrices as blocks of this type (quantized at load)")
    ap.add_argument("--quantized", action="store_true",
                    help="the primary reads the GGUF blocks its checkpoint references (Engine quantized=True)")
    ap.add_argument("--max-batch-size", type=int, default=None,
                    help="sequences per engine step (default: every prompt at once)")
    ap.add_argument("--json", help="write the table as JSON here")
    args = ap.parse_args(argv)
    engine = tandem_rt.Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                              max_batch_size=args.max_batch_size or args.prompts,
                                              quantized=args.quantized,
                                              draft_quantization=cli_draft_quantization(args))
    prompts = split_prompts(args.split, args.prompts, args.prompt_tokens, engine.tokenizer)
    rows = []
    print(f"{'temp':>5} {'gamma':>5} {'speed':>8} {'tandem-speed':>13} {'gain':>7} {'95% interval':>17}"
          "   (mean accepted drafts per block)")
    for temperature in (float(t) for t in args.temperatures.split(",")):
        params = tandem_rt.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=temperature,
                                          seed=0 if temperature > 0 else None, ignore_eos=True)
        reference = None
        if temperature == 0:
            reference = [r.token_ids for r in engine.generate(prompts, params, mode="primary")]
        for gamma in (int(g) for g in args.gammas.split(",")):
            row = {"temperature": temperature, "gamma": gamma}
            for mode in ("speed", "tandem-speed"):
                results = sorted(engine.generate(prompts, params, mode=mode, gamma=gamma),
                                 key=lambda r: r.prompt_index)
                if reference is not None and [r.token_ids for r in results] != reference:
                    raise SystemExit(f"{mode} gamma={gamma} did not reproduce the primary's greedy tokens")
                row[f"{mode}_accepted_per_prompt"] = [r.stats["accepted_tokens"] for r in results]
                row[f"{mode}_blocks_per_prompt"] = [r.stats["blocks"] for r in results]
                row[mode] = sum(row[f"{mode}_accepted_per_prompt"]) / sum(row[f"{mode}_blocks_per_prompt"])
            ci = paired_ratio_gain(row["speed_accepted_per_prompt"], row["speed_blocks_per_prompt"],
                                   row["tandem-speed_accepted_per_prompt"], row["tandem-speed_blocks_per_prompt"])
            row["gain_pct"] = 100.0 * ci["estimate"]
            row["gain_pct_95"] = [100.0 * ci["low"], 100.0 * ci["high"]]
            rows.append(row)
            print(f"{temperature:5.2f} {gamma:5d} {row['speed']:8.3f} {row['tandem-speed']:13.3f} "
                  f"{row['gain_pct']:+6.1f}% [{row['gain_pct_95'][0]:+6.1f}, {row['gain_pct_95'][1]:+6.1f}]%", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"split": args.split, "prompts": len(prompts),
                                               "dtype": str(engine.dtype).replace("torch.", ""),
                                               "draft_quantization": engine.runner.draft_quantization,
                                               "quantized_primary": args.quantized,
                                               "max_batch_size": engine.max_batch_size,
                                               "prompt_tokens": args.prompt_tokens,
                                               "max_new_tokens": args.max_new_tokens, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
