"""Evaluate every trained model on the test split and write docs/results.json + plots.

    python tools/report.py --runs runs --data runs/data --max-tokens 65536 --out docs

Table 1 columns (tandem_rt.train.evaluate.evaluate_models) for the standalone secondary,
secondary-Distil, Tandem-CE, Tandem-Distil and the primary; training curves from each run's
log.jsonl; greedy generations from the primary; accepted tokens per block of exact greedy
speculative decoding with the reference models (secondary-Distil vs Tandem-Distil drafting).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from tandem_rt.train.data import load_tokens
from tandem_rt.train.evaluate import evaluate_models, format_table, greedy_generate, speculative_greedy
from tandem_rt.train.loop import load_run_state
from tandem_rt.train.pretrain import count_params, load_lm
from tandem_rt.train.tandem import load_tandem_run
from tandem_rt.train.tokenizer import load_tokenizer

PROMPTS = ["Once upon a time there was a little girl who",
           "The old king called his three sons to him and said,",
           "\"Oh, mother!\" cried Jo, \"",
           "The rabbit ran into the garden, and",
           "In the morning the children went down to the sea",
           "Dorothy looked at the Scarecrow and"]


def read_log(run: Path) -> list:
    f = run / "log.jsonl"
    return [json.loads(l) for l in f.read_text().splitlines()] if f.is_file() else []


def plot_curves(runs: Path, img: Path) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("primary", "secondary"):
        log = read_log(runs / name)
        if log:
            ax.plot([r["tokens"] / 1e6 for r in log], [r["loss"] for r in log], label=name)
    ax.set_xlabel("training tokens (M)"); ax.set_ylabel("train CE (nats)"); ax.set_title("Pretraining")
    ax.legend(); ax.grid(alpha=.3); fig.tight_layout()
    fig.savefig(img / "pretrain_loss.png", dpi=110); plt.close(fig); files.append("img/pretrain_loss.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    s1 = read_log(runs / "tandem_s1")
    offset = s1[-1]["tokens"] if s1 else 0
    series = [("Tandem stage 1 (CE)", s1, 0), ("Tandem-CE stage 2", read_log(runs / "tandem_ce"), offset),
              ("Tandem-Distil stage 2", read_log(runs / "tandem_distil"), offset),
              ("secondary-Distil", read_log(runs / "secondary_distil"), offset)]
    for label, log, off in series:
        if log:
            ax.plot([(r["tokens"] + off) / 1e6 for r in log], [r.get("ce", r["loss"]) for r in log], label=label)
    ax.set_xlabel("tokens (M)"); ax.set_ylabel("train CE vs ground truth (nats)")
    ax.set_title("Tandem / distillation training (primary frozen)"); ax.legend(); ax.grid(alpha=.3); fig.tight_layout()
    fig.savefig(img / "tandem_loss.png", dpi=110); plt.close(fig); files.append("img/tandem_loss.png")
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--data", default="runs/data")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--out", default="docs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gen-tokens", type=int, default=48)
    ap.add_argument("--spec-prompts", type=int, default=6)
    ap.add_argument("--spec-tokens", type=int, default=48)
    ap.add_argument("--gammas", type=int, nargs="+", default=[3, 5, 7])
    ap.add_argument("--skip", nargs="*", default=[], choices=["table", "gen", "spec", "plots"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_file = out / "results.json"
    results = json.loads(res_file.read_text()) if res_file.is_file() else {}
    t0 = time.time()
    primary = load_lm(runs / "primary")
    secondary = load_lm(runs / "secondary")
    sec_distil = load_lm(runs / "secondary_distil")
    t_ce = load_tandem_run(runs / "tandem_ce")
    t_distil = load_tandem_run(runs / "tandem_distil")
    results["models"] = {
        "primary": {"parameters": count_params(primary), "config": primary.config.to_dict()},
        "secondary": {"parameters": count_params(secondary), "config": secondary.config.to_dict()},
        "tandem_projections": {"parameters": sum(p.numel() for p in t_distil.tandem.parameters()),
                               "layer_map": t_distil.layer_map},
    }
    results["training"] = {}
    for name in ("primary", "secondary", "tandem_s1", "tandem_ce", "tandem_distil", "secondary_distil"):
        st = load_run_state(runs / name)
        log = read_log(runs / name)
        results["training"][name] = {"steps": st["step"], "tokens": st["tokens"], "wall_s": st["wall_s"],
                                     "final_loss": log[-1]["loss"] if log else None,
                                     "train_config": st["train_config"], "extra": {k: v for k, v in st["extra"].items()
                                                                                   if not k.endswith("config")}}
    if "table" not in args.skip:
        tokens = load_tokens(Path(args.data) / f"{args.split}.bin")
        table = evaluate_models(primary, tokens,
                                standalone={"secondary": secondary, "secondary-Distil": sec_distil},
                                tandems={"Tandem-CE": t_ce, "Tandem-Distil": t_distil},
                                max_tokens=args.max_tokens, block_length=2)
        table["_meta"]["split"] = args.split
        results["table1"] = table
        print(format_table(table, ["secondary", "secondary-Distil", "Tandem-CE", "Tandem-Distil", "primary"]), flush=True)
    tok = load_tokenizer(runs / "tokenizer.json")
    if "gen" not in args.skip:
        gens = []
        for prompt in PROMPTS:
            ids = tok.encode(prompt).ids
            new = greedy_generate(primary, ids, args.gen_tokens, eos_id=1)
            gens.append({"prompt": prompt, "primary_greedy": tok.decode(new)})
        results["generations"] = gens
    if "spec" not in args.skip:
        spec = {}
        reference = {}
        for prompt in PROMPTS[:args.spec_prompts]:
            ids = tok.encode(prompt).ids
            reference[prompt] = greedy_generate(primary, ids, args.spec_tokens)
        for gamma in args.gammas:
            row = {}
            for label, kw in (("secondary-Distil", {"drafter": sec_distil}), ("Tandem-Distil", {"tandem": t_distil})):
                acc, blocks, same = [], 0, True
                for prompt in PROMPTS[:args.spec_prompts]:
                    ids = tok.encode(prompt).ids
                    r = speculative_greedy(primary, ids, args.spec_tokens, gamma, **kw)
                    acc += r["accepted"]
                    same &= r["tokens"] == reference[prompt]
                row[label] = {"mean_accepted_drafts": float(np.mean(acc)),
                              "mean_tokens_per_block": float(np.mean(acc)) + 1.0, "blocks": len(acc),
                              "output_equals_primary_greedy": bool(same)}
            row["tandem_gain_pct"] = 100.0 * (row["Tandem-Distil"]["mean_tokens_per_block"] /
                                              row["secondary-Distil"]["mean_tokens_per_block"] - 1.0)
            spec[str(gamma)] = row
            print(f"gamma {gamma}: {json.dumps(row)}", flush=True)
        results["speculative_reference"] = spec
    if "plots" not in args.skip:
        results["plots"] = plot_curves(runs, out / "img")
    results["report_wall_s"] = time.time() - t0
    res_file.write_text(json.dumps(results, indent=2))
    print(f"wrote {res_file} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
