#!/usr/bin/env python
"""How much of the primary's greedy output a reduced draft vocabulary covers: subsets of several
sizes are chosen from a run's training cache exactly as `tandem-rt train --draft-vocab N` does,
and measured on the run's held-out windows (fraction of positions whose primary argmax, and whose
next ground-truth token, lies inside). A greedy draft can only be accepted at a covered position.

    python tools/draft_vocab_coverage.py --run runs/smollm2/main --sizes 2048,4096,8192,16384 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from tandem_rt.primary_source import load_primary
    from tandem_rt.train.draft_training import choose_draft_vocab
    from tandem_rt.train.pipeline import to_windows
    from tandem_rt.train.primary_cache import PrimaryCache

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a `tandem-rt train` run directory")
    ap.add_argument("--sizes", default="2048,4096,8192,16384")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    plan = json.loads((run / "plan.json").read_text())
    cache = PrimaryCache(run / "cache")
    source = load_primary(plan["primary"], dtype=torch.float32)
    cfg = source.model.config
    held = np.fromfile(run / "tokens" / "heldout.bin", dtype=np.uint16 if cfg.vocab_size <= 65536 else np.int32)
    windows = to_windows(held, plan["seq_len"], "held-out")
    argmax = []
    with torch.no_grad():
        for s in range(0, len(windows), 8):
            argmax.append(source.model(torch.from_numpy(windows[s:s + 8].astype(np.int64))).argmax(-1)[:, :-1])
    argmax = torch.cat(argmax).flatten()
    truth = torch.from_numpy(windows[:, 1:].astype(np.int64)).flatten()
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        ids = choose_draft_vocab(cache, n, always=(cfg.eos_token_id, cfg.bos_token_id))
        inside = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        inside[ids] = True
        rows.append({"size": n, "primary_argmax_coverage": float(inside[argmax].float().mean()),
                     "next_token_coverage": float(inside[truth].float().mean())})
    print(f"{len(argmax)} held-out positions of {run}")
    print(f"{'draft vocab':>11s} {'primary argmax in it':>21s} {'next token in it':>17s}")
    for r in rows:
        print(f"{r['size']:11d} {100 * r['primary_argmax_coverage']:20.2f}% {100 * r['next_token_coverage']:16.2f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": str(run), "positions": int(len(argmax)), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
