"""Render docs/RESULTS_TOY.md from docs/results.json (written by tools/report.py) and the router report.

    python tools/render_results.py --results docs/results.json --router runs/router/router_report.json \
        --notes docs/results_notes.md --out docs/RESULTS_TOY.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = ["secondary", "secondary-Distil", "Tandem-CE", "Tandem-Distil", "primary"]


def pct(x):
    return f"{100 * x:.2f}%"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default="docs/results.json")
    ap.add_argument("--router", default="runs/router/router_report.json")
    ap.add_argument("--notes", default="docs/results_notes.md", help="hand-written text placed after the tables")
    ap.add_argument("--out", default="docs/RESULTS_TOY.md")
    args = ap.parse_args()
    r = json.loads(Path(args.results).read_text())
    router = json.loads(Path(args.router).read_text()) if Path(args.router).is_file() else None
    if router is not None:
        r["router"] = {k: v for k, v in router.items() if k != "losses"}
        Path(args.results).write_text(json.dumps(r, indent=2))
    L = ["# Results: Tandem Transformers at toy scale (Gutenberg children's books)", ""]
    t = r["table1"]
    meta = t["_meta"]
    L += [f"## Table 1 reproduction ({meta.get('split', 'test')} split, first {meta['tokens']:,} tokens, "
          f"windows of {meta['seq_len']}, Tandem block length γ = {meta['block_length']})", "",
          "| model | accuracy | cross-entropy (nats) | relative accuracy | relative TV distance |",
          "|---|---|---|---|---|"]
    for n in ORDER:
        m = t[n]
        L.append(f"| {n} | {pct(m['accuracy'])} | {m['cross_entropy']:.3f} | {pct(m['relative_accuracy'])} | "
                 f"{m['relative_tv']:.3f} |")
    sec, td, sd = t["secondary"], t["Tandem-Distil"], t["secondary-Distil"]
    acc_gain = 100 * (td["accuracy"] - sec["accuracy"])
    tv_red = 100 * (1 - td["relative_tv"] / sec["relative_tv"])
    L += ["", "## Goals at our scale", "",
          "| goal | measured | met |", "|---|---|---|",
          f"| Tandem-Distil accuracy ≥ secondary + 3.0 points (paper +3.55) | {acc_gain:+.2f} points | "
          f"{'yes' if acc_gain >= 3.0 else 'no'} |",
          f"| relative TV ≥ 40% lower than the secondary's (paper 0.391 → 0.141) | {sec['relative_tv']:.3f} → "
          f"{td['relative_tv']:.3f} ({tv_red:.1f}% lower) | {'yes' if tv_red >= 40 else 'no'} |"]
    spec = r.get("speculative_reference")
    if spec and "5" in spec:
        g = spec["5"]["tandem_gain_pct"]
        L.append(f"| ≥ 10% more accepted tokens per block than secondary-Distil at γ = 5 (paper +11.24%) | "
                 f"{g:+.1f}% (reference-model greedy SPEED, not the engine) | {'yes' if g >= 10 else 'no'} |")
    if spec:
        L += ["", "## Accepted tokens per block, greedy speculative decoding (reference models)", "",
              "Exact greedy SPEED with the plain PyTorch models (`tandem_rt.train.evaluate.speculative_greedy`): "
              "per block γ drafts, one primary pass, the longest agreeing prefix plus the primary's next token. "
              "Tokens per block = accepted drafts + 1. Every run's output equals the primary's own greedy output.", "",
              "| γ | secondary-Distil tokens/block | Tandem-Distil tokens/block | Tandem gain | blocks (each) |",
              "|---|---|---|---|---|"]
        for gamma, row in spec.items():
            a, b = row["secondary-Distil"], row["Tandem-Distil"]
            L.append(f"| {gamma} | {a['mean_tokens_per_block']:.3f} | {b['mean_tokens_per_block']:.3f} | "
                     f"{row['tandem_gain_pct']:+.1f}% | {a['blocks']} / {b['blocks']} |")
    L += ["", "## Models", "", "| model | parameters | layers | hidden | heads / KV heads | head dim | FFN | vocab |",
          "|---|---|---|---|---|---|---|---|"]
    for n in ("primary", "secondary"):
        c = r["models"][n]["config"]
        L.append(f"| {n} | {r['models'][n]['parameters']:,} | {c['num_hidden_layers']} | {c['hidden_size']} | "
                 f"{c['num_attention_heads']} / {c['num_key_value_heads']} | {c['head_dim']} | "
                 f"{c['intermediate_size']} | {c['vocab_size']} |")
    tp = r["models"]["tandem_projections"]
    L += ["", f"Tandem projections: {tp['parameters']:,} parameters, layer map {tp['layer_map']} "
          "(secondary layer j reads primary layer l(j)). Tied embeddings, RoPE θ = 10000.", "",
          "## Training runs", "", "| run | steps | tokens | wall time | final train loss | notes |", "|---|---|---|---|---|---|"]
    notes = {"primary": "AdamW, cosine, bf16 autocast; see the note on the budget below",
             "secondary": "AdamW, cosine, bf16 autocast",
             "tandem_s1": "Tandem stage 1: CE, primary frozen, γ = 2, from the pretrained secondary",
             "tandem_ce": "Tandem-CE stage 2: CE, from stage 1",
             "tandem_distil": "Tandem-Distil stage 2: 0.5·CE + 0.5·CE(primary soft labels), from stage 1",
             "secondary_distil": "secondary-Distil: standalone secondary, same stage-2 loss and tokens"}
    for n, v in r["training"].items():
        loss = f"{v['final_loss']:.3f}" if v["final_loss"] is not None else "–"
        L.append(f"| {n} | {v['steps']} | {v['tokens']:,} | {v['wall_s'] / 60:.1f} min | {loss} | {notes.get(n, '')} |")
    if router is not None:
        L += ["", "## Router", "",
              f"2-layer MLP ({router['train_positions']:,} train positions from the Tandem-Distil secondary's "
              f"γ = {router['gamma_max']} block forward; BCE toward TV(secondary, primary)). On val: mean TV "
              f"{router['val_tv_mean']:.3f}, router MAE {router['val_mae']:.3f}, correlation with the true TV "
              f"{router['val_pred_tv_corr']:.3f}. Threshold {router['threshold']:.2f}, chosen by "
              f"{router['selection']} (cost ratio {router['cost_ratio']:.3f} primary passes per draft step; the "
              "engine was not available to measure speed).", "",
              "| threshold τ | drafts / block | tokens / block | tokens per cost |", "|---|---|---|---|"]
        for row in router["thresholds"]:
            L.append(f"| {row['threshold']:.2f} | {row['drafts_per_block']:.2f} | {row['tokens_per_block']:.3f} | "
                     f"{row['tokens_per_cost']:.3f} |")
        L += ["", "Fixed block lengths under the same proxy:", "", "| γ | tokens / block | tokens per cost |", "|---|---|---|"]
        for g, row in router["fixed_gamma"].items():
            L.append(f"| {g} | {row['tokens_per_block']:.3f} | {row['tokens_per_cost']:.3f} |")
    if r.get("generations"):
        L += ["", "## Greedy generations (primary, plain reference forward)", ""]
        for g in r["generations"]:
            text = g["primary_greedy"].replace("\n", " ⏎ ")
            L += [f"* **{g['prompt']}**{text}"]
    if r.get("plots"):
        L += ["", "## Training curves", ""] + [f"![{p}]({p})" for p in r["plots"]]
    if Path(args.notes).is_file():
        L += ["", Path(args.notes).read_text().rstrip()]
    Path(args.out).write_text("\n".join(L) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
