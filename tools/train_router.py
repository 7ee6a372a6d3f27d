"""Train the adaptive-block-length router and choose its threshold on val.

    python tools/train_router.py --tandem runs/tandem_distil --data runs/data --out runs/router

Features come from the Tandem-Distil secondary's block forward (block length --gamma-max, the
depths the runtime drafts at) on train windows; labels are TV(secondary, primary). The
threshold is chosen on val windows with the teacher-forced proxy of
``tandem_rt.train.router.simulate_threshold`` (accepted tokens per cost, cost of a draft step
= --cost-ratio primary passes), unless the runtime engine is available to measure speed.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tandem_rt.config import RouterConfig
from tandem_rt.models.router import Router
from tandem_rt.train.data import WindowSampler, load_tokens, sequential_windows
from tandem_rt.train.router import router_batch, simulate_threshold, train_router
from tandem_rt.train.tandem import load_tandem_run


def collect(tandem, windows, top_k, gamma, batch_size):
    feats, tvs, agrees = [], [], []
    for s in range(0, len(windows), batch_size):
        f, tv, ag = router_batch(tandem, torch.stack(windows[s:s + batch_size]), top_k, gamma)
        feats.append(f)
        tvs.append(tv)
        agrees.append(ag)
    return torch.cat(feats), torch.cat(tvs), torch.cat(agrees)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tandem", required=True, help="Tandem-Distil run directory")
    ap.add_argument("--data", default="runs/data")
    ap.add_argument("--out", default="runs/router")
    ap.add_argument("--train-windows", type=int, default=192)
    ap.add_argument("--val-windows", type=int, default=96)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--gamma-max", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--cost-ratio", type=float, default=None,
                    help="cost of one secondary draft step in primary passes (default: parameter ratio)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    tandem = load_tandem_run(args.tandem)
    sampler = WindowSampler(load_tokens(f"{args.data}/train.bin"), args.seq_len, seed=1234)
    train_windows = list(sampler.sample(args.train_windows))
    f, tv, _ = collect(tandem, train_windows, args.top_k, args.gamma_max, 8)
    print(f"router data: {len(tv):,} positions, mean TV {tv.mean():.3f} ({time.time() - t0:.0f}s)", flush=True)
    torch.manual_seed(0)
    router = Router(RouterConfig(embed_dim=tandem.config.secondary.hidden_size, top_k=args.top_k,
                                 hidden_size=args.hidden, gamma_max=args.gamma_max))
    losses = train_router(router, f, tv, steps=args.steps)
    router.eval()
    # ---- threshold on val (teacher-forced proxy)
    val = load_tokens(f"{args.data}/val.bin")
    windows = list(sequential_windows(val, args.seq_len, args.val_windows * args.seq_len))
    vf, vtv, vag = collect(tandem, windows, args.top_k, args.gamma_max, 8)
    with torch.no_grad():
        pred_tv = router(vf)
    G = args.gamma_max
    T = args.seq_len
    # blocks: the first draft of a block sits at position b-1 with b a multiple of G
    starts = torch.arange(G - 1, T - G + 1, G)
    idx = (torch.arange(len(windows))[:, None, None] * T + starts[None, :, None] + torch.arange(G)[None, None, :]).reshape(-1, G)
    pred_accept, agree, true_accept = 1.0 - pred_tv[idx], vag[idx], 1.0 - vtv[idx]
    if args.cost_ratio is None:
        p = sum(x.numel() for x in tandem.primary.parameters())
        s = sum(x.numel() for x in tandem.secondary.parameters())
        cost = s / p
    else:
        cost = args.cost_ratio
    table = []
    for thr in [0.0] + [round(0.05 * i, 2) for i in range(1, 20)] + [1.01]:
        table.append(vars(simulate_threshold(pred_accept, agree, thr, cost, G)))
    fixed = {g: vars(simulate_threshold(torch.ones_like(pred_accept), agree, 0.0, cost, g)) for g in (1, 2, 3, 5, 7)}
    best = max(table, key=lambda r: r["tokens_per_cost"])
    router.config.threshold = float(min(best["threshold"], 1.0))
    corr = torch.corrcoef(torch.stack([pred_tv, vtv]))[0, 1].item()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"config": router.config.to_dict(), "state": router.state_dict()}, out / "router.pt")
    report = {"train_positions": len(tv), "val_positions": len(vtv), "train_loss_first": losses[0],
              "train_loss_last": sum(losses[-50:]) / 50, "val_tv_mean": vtv.mean().item(),
              "val_pred_tv_corr": corr, "val_mae": (pred_tv - vtv).abs().mean().item(),
              "cost_ratio": cost, "gamma_max": G, "threshold": router.config.threshold,
              "selection": "teacher-forced proxy on val: max (accepted+1)/(drafts*cost_ratio+1)",
              "thresholds": table, "fixed_gamma": fixed, "wall_s": time.time() - t0, "losses": losses[::10]}
    (out / "router_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in ("thresholds", "losses")}, indent=2))


if __name__ == "__main__":
    main()
