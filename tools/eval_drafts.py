#!/usr/bin/env python
"""Table 1 of the paper for a trained checkpoint on a held-out split: accuracy, cross-entropy,
relative accuracy and relative TV to the primary for the standalone drafter and the Tandem
secondary, plus the greedy accepted drafts per block (teacher-forced with the drafting masks).

    python tools/eval_drafts.py --model runs/smollm2/ckpt --split test --tokens 32768 --json out.json

Several checkpoints of the same primary (ablation variants) can be given with --model A --model B;
the primary runs once per window for all of them. Each checkpoint's Tandem secondary is compared with
its drafter on the same windows, with 95% paired bootstrap intervals (JSON key ``_compare``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def draft_models(ckpt, name: str) -> dict:
    """``{name/drafter-Distil: drafter, name/Tandem-Distil: TandemDraft}`` of a loaded checkpoint (float32);
    the Tandem secondary keeps its projections and, where the checkpoint has one, its feature input."""
    from tandem_rt.train.draft_training import TandemDraft

    out = {}
    if ckpt.drafter is not None:
        out[f"{name}drafter-Distil"] = ckpt.drafter.float().eval()
    out[f"{name}Tandem-Distil"] = TandemDraft.from_tandem_model(ckpt.float()).eval()
    return out


def main(argv=None) -> int:
    from tandem_rt.checkpoint import load_checkpoint
    from tandem_rt.paths import default_data_dir
    from tandem_rt.train.draft_eval import evaluate_drafts, format_comparison, format_eval_table, paired_comparison
    from tandem_rt.train.pipeline import _eos_id, to_windows, tokenize_corpus

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=[], help="checkpoint directory (repeatable; default: "
                    "the bundled model)")
    ap.add_argument("--split", default="test", choices=["val", "test"])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tandem_rt.paths import default_model_path

    paths = args.model or [str(default_model_path())]
    t0 = time.time()
    ckpts = [load_checkpoint(p, dtype=torch.float32) for p in paths]
    primary = ckpts[0].primary.eval()
    for p, c in zip(paths[1:], ckpts[1:]):
        if c.config.primary.to_dict() != ckpts[0].config.primary.to_dict():
            raise SystemExit(f"{p}: another primary than {paths[0]}")
    layers = sorted({l for c in ckpts for l in c.layer_map})
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(paths[0]) / "tokenizer.json"))
    text = default_data_dir() / f"{args.split}.txt.xz"
    import hashlib

    tok_sha = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]   # stable across processes
    tmp = Path(".cache") / "eval_drafts" / f"{args.split}-{args.tokens}-{tok_sha}.bin"
    tokens = tokenize_corpus(tok, text, tmp, args.tokens, _eos_id(tok, primary.config), progress=False)
    windows = to_windows(tokens, args.seq_len, args.split)
    models = {}
    for p, c in zip(paths, ckpts):
        models.update(draft_models(c, f"{Path(p).name}: " if len(paths) > 1 else ""))
    res = evaluate_drafts(primary, windows, models, layers, progress=True)
    print(format_eval_table(res))
    res["_compare"] = {}
    for p in paths:
        prefix = f"{Path(p).name}: " if len(paths) > 1 else ""
        if f"{prefix}drafter-Distil" in res:
            cmp = paired_comparison(res, f"{prefix}drafter-Distil", f"{prefix}Tandem-Distil")
            res["_compare"][f"{prefix}Tandem-Distil vs drafter-Distil"] = cmp
            print(f"{prefix}Tandem-Distil vs drafter-Distil (95% paired bootstrap over windows):\n"
                  f"{format_comparison(cmp)}")
    print(f"{len(windows)} windows of {args.seq_len} tokens from {args.split}; {time.time() - t0:.0f}s")
    if args.json:
        res["_meta"] = {"models": paths, "split": args.split, "windows": int(len(windows)), "seq_len": args.seq_len,
                        "torch_threads": torch.get_num_threads()}
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
