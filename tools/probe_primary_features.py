#!/usr/bin/env python
"""How much the primary's representations at the previous position tell a drafter: MLP probes on
a `tandem-rt train` run's primary cache predict the primary's greedy token at position i from

* ``token``: the token ``t_i`` alone (a bigram drafter, the floor);
* ``h<L>``: ``x^(L)_{i-1}``, the primary's residual stream after L layers at the previous position,
  for each layer L of the cache (with ``t_i``: ``token+h<L>``);
* ``drafter``: the trained standalone drafter's last residual at ``i`` (it reads the whole context
  through its own attention), alone and with every cached ``x^(L)_{i-1}``.

This is the information a Tandem secondary gets at offset 0 of a drafting block beyond what the
drafter has. Each probe: ``RMSNorm(input parts)`` concatenated -> Linear(·, 1536) -> GELU ->
Linear(1536, d) -> RMSNorm -> the primary's (frozen) output embedding rows of the run's draft
vocabulary; cross-entropy to the primary's argmax, AdamW, cosine schedule. Reported: the relative
accuracy (argmax equal to the primary's) on the last ``--heldout-windows`` cache windows, which no
probe trains on.

    python tools/probe_primary_features.py --run runs/smollm2/main --steps 300 --threads 2 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rms(x: torch.Tensor) -> torch.Tensor:
    """``x [..., d]`` scaled to unit root-mean-square per row."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)


class Probe(nn.Module):
    """Inputs ``[N, d_in]`` -> logits ``[N, len(out_rows)]`` over the frozen rows ``out_rows [N_v, d]``."""

    def __init__(self, d_in: int, out_rows: torch.Tensor, hidden: int = 1536):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, out_rows.shape[1]))
        self.norm = nn.Parameter(torch.ones(out_rows.shape[1]))
        self.register_buffer("out_rows", out_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(rms(self.mlp(x)) * self.norm, self.out_rows)


def probe_inputs(batch, parts: list, layers: list, embed: torch.Tensor, drafter=None):
    """Inputs for positions ``i = 1..T-1`` of a cache batch -> (``[B*(T-1), Σ d]``, primary argmax ``[B*(T-1)]``).

    ``parts``: names ``token``, ``h<L>`` (L in ``layers``, the cache's read order) and ``drafter``."""
    t = batch.tokens
    cols = []
    for part in parts:
        if part == "token":
            cols.append(rms(embed[t[:, 1:]]))
        elif part == "drafter":
            with torch.no_grad():
                _, (h,) = drafter(t, hidden_layers=[drafter.config.num_hidden_layers])
            cols.append(rms(h[:, 1:].float()))
        else:
            cols.append(rms(batch.hidden[layers.index(int(part[1:]))][:, :-1].float()))
    x = torch.cat(cols, -1).flatten(0, 1)
    return x, batch.topk_ids[:, 1:, 0].flatten()


def train_probe(cache, parts, layers, embed, vocab, index, train_ids, held_ids, steps, batch_windows, lr, seed,
                drafter=None) -> dict:
    """One probe: trained on ``train_ids`` windows, evaluated on ``held_ids`` -> result row."""
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    d_in = probe_inputs(cache.batch(train_ids[:1]), parts, layers, embed, drafter)[0].shape[1]
    probe = Probe(d_in, embed[vocab])
    opt = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        x, y = probe_inputs(cache.batch(gen.choice(train_ids, batch_windows, replace=False)), parts, layers, embed, drafter)
        y = index[y]
        keep = y >= 0  # targets outside the draft vocabulary cannot be predicted by any drafter
        loss = F.cross_entropy(probe(x[keep]), y[keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    hit = total = 0
    with torch.no_grad():
        for s in range(0, len(held_ids), batch_windows):
            x, y = probe_inputs(cache.batch(held_ids[s:s + batch_windows]), parts, layers, embed, drafter)
            hit += int((vocab[probe(x).argmax(-1)] == y).sum())
            total += y.numel()
    return {"inputs": "+".join(parts), "relative_accuracy": hit / total, "positions": total,
            "final_train_loss": float(loss.detach()), "wall_s": time.time() - t0}


def load_drafter(plan, source, cache):
    """The run's trained standalone drafter (float32, eval): the pipeline's own drafter model
    (``pipeline.build_small_models``) with the weights of ``<run>/drafter``."""
    from tandem_rt.train.loop import load_run_state
    from tandem_rt.train.pipeline import build_small_models

    drafter = build_small_models(plan, source, [], cache, "drafter")
    state = load_run_state(Path(plan.run_dir) / "drafter")["model"]
    drafter.load_state_dict({k[len("model."):]: v for k, v in state.items()})
    return drafter.eval()


def main(argv=None) -> int:
    from tandem_rt.primary_source import load_primary
    from tandem_rt.train.draft_training import subset_index
    from tandem_rt.train.pipeline import draft_vocabulary, run_plan
    from tandem_rt.train.primary_cache import PrimaryCache

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a `tandem-rt train` run directory (cache, draft_vocab.pt, drafter)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-windows", type=int, default=8)
    ap.add_argument("--heldout-windows", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--probes", default=None, help="comma-separated input sets, parts joined by '+' "
                    "(default: token, each token+h<L>, token+all layers, drafter, drafter+all layers)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch_windows < 1 or args.heldout_windows < 1:
        raise SystemExit("--steps, --batch-windows and --heldout-windows must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    plan = run_plan(run)
    cache = PrimaryCache(run / "cache")
    if len(cache) <= args.heldout_windows + args.batch_windows:
        raise SystemExit(f"the cache has {len(cache)} windows: too few for {args.heldout_windows} held out")
    layers = list(cache.read_map)
    source = load_primary(plan.primary, dtype=torch.float32)
    embed = source.model.output_weight.detach().float()
    vocab = draft_vocabulary(plan, source, cache)   # the run's draft vocabulary (None: the full one)
    vocab = torch.arange(embed.shape[0]) if vocab is None else vocab
    index = subset_index(vocab, embed.shape[0])
    hs = [f"h{l}" for l in dict.fromkeys(layers)]
    if args.probes:
        probes = [p.split("+") for p in args.probes.split(",")]
    else:
        probes = [["token"], *[["token", h] for h in hs], ["token", *hs], ["drafter"], ["drafter", *hs]]
        probes = [list(p) for p in dict.fromkeys(map(tuple, probes))]   # one layer: token+h<L> once
    bad = [part for parts in probes for part in parts if part not in ("token", "drafter", *hs)]
    if bad:
        raise SystemExit(f"unknown probe input {bad[0]!r}: use token, drafter or one of {hs}")
    drafter = None
    if any("drafter" in p for p in probes):
        drafter = load_drafter(plan, source, cache)
    n = len(cache)
    train_ids, held_ids = np.arange(n - args.heldout_windows), np.arange(n - args.heldout_windows, n)
    rows = []
    for parts in probes:
        row = train_probe(cache, parts, layers, embed, vocab, index, train_ids, held_ids, args.steps,
                          args.batch_windows, args.lr, plan.seed, drafter)
        rows.append(row)
        print(f"| {row['inputs']} | {100 * row['relative_accuracy']:.2f} | {row['wall_s']:.0f} s |", flush=True)
    if args.json:
        meta = {"run": str(run), "layer_map": layers, "steps": args.steps, "batch_windows": args.batch_windows,
                "heldout_windows": args.heldout_windows, "lr": args.lr, "torch_threads": torch.get_num_threads()}
        Path(args.json).write_text(json.dumps({"probes": rows, "_meta": meta}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
