"""``tandem-rt eval --model DIR --split test``: the paper's Table 1 metrics for a checkpoint.

Evaluates the primary, the Tandem secondary (γ-block forward, Eq. (2)) and, when the
checkpoint has one, the standalone drafter, on a split of the corpus tokenised with the
checkpoint's tokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path


def run(args) -> int:
    import numpy as np
    import torch

    from tandem_rt.checkpoint import TOKENIZER_NAME, load_checkpoint
    from tandem_rt.paths import default_data_dir, default_model_path
    from tandem_rt.train.evaluate import evaluate_models, format_table
    from tandem_rt.train.tokenizer import encode_lines, iter_lines, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else default_model_path()
    data_dir = Path(args.data) if args.data else default_data_dir()
    text = data_dir / f"{args.split}.txt.xz"
    if not text.is_file():
        raise ValueError(f"--split {args.split!r}: {text} does not exist")
    tok_file = model_dir / TOKENIZER_NAME
    if not tok_file.is_file():
        raise ValueError(f"--model {str(model_dir)!r} has no {TOKENIZER_NAME}")
    tok = load_tokenizer(tok_file)
    from tandem_rt.checkpoint import read_config
    from tandem_rt.train.pipeline import _eos_id

    eos = _eos_id(tok, read_config(model_dir).primary)
    limit = args.max_tokens
    ids: list = []
    batch: list = []
    for line in iter_lines(text):
        batch.append(line)
        if len(batch) == 2048:
            ids.extend(i for seq in encode_lines(tok, batch, eos) for i in seq)
            batch.clear()
            if limit is not None and len(ids) >= limit:
                break
    if batch and (limit is None or len(ids) < limit):
        ids.extend(i for seq in encode_lines(tok, batch, eos) for i in seq)
    tokens = np.asarray(ids, dtype=np.int64)
    model = load_checkpoint(model_dir, dtype=torch.float32)
    standalone = {"secondary-Distil (drafter)": model.drafter} if model.drafter is not None else {}
    block = args.block_length or model.config.train_block_length
    boundary = args.boundary or model.config.train_boundary
    results = evaluate_models(model.primary, tokens, standalone=standalone, tandems={"Tandem secondary": model},
                              seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=limit,
                              block_length=block, progress=not args.quiet, boundary=boundary)
    meta = results["_meta"]
    print(f"{model_dir} on {args.split}: {meta['tokens']:,} tokens, windows of {meta['seq_len']}, "
          f"Tandem block length {meta['block_length']}, {meta['boundary']} boundaries")
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="Table 1 metrics (accuracy, CE, relative accuracy, relative TV) on a split")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--data", default=None, help="corpus directory with <split>.txt.xz (default: $TANDEM_RT_DATA/gutenberg_kids)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate at most N tokens")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-length", type=int, default=None, help="γ of the Tandem block forward (default: training γ)")
    p.add_argument("--boundary", default=None, choices=["training", "drafting"],
                   help="the Tandem secondary's attention boundaries (default: the checkpoint's train_boundary; "
                        "docs/DESIGN.md §2.3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--json", default=None, help="also write the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
