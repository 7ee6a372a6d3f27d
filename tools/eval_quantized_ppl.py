#!/usr/bin/env python
"""Perplexity of the primary on held-out text, through the engine's own paged forward, with the
weights dequantised (the compute dtype) and kept as their GGUF blocks (``--quantized``
numerics: ``linear_rows_q``'s int8 activations for windows of at most 64 rows), measured on the
same windows in one run.

    python tools/eval_quantized_ppl.py [--model DIR] [--dtype bfloat16] [--split test] \\
        [--tokens 16384] [--window 64] [--threads 2] [--json out.json]

Windows of ``--window`` tokens (each token predicted from the window's earlier tokens only);
prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import cpu_model  # noqa: E402


def window_tokens(model_dir: Path, data_dir: Path, split: str, tokens: int) -> list:
    from tandem_rt.checkpoint import TOKENIZER_NAME, read_config
    from tandem_rt.train.pipeline import _eos_id
    from tandem_rt.train.tokenizer import encode_lines, iter_lines, load_tokenizer

    tok = load_tokenizer(model_dir / TOKENIZER_NAME)
    eos = _eos_id(tok, read_config(model_dir).primary)
    text = data_dir / f"{split}.txt.xz"
    if not text.is_file():
        raise SystemExit(f"--split {split!r}: {text} does not exist")
    ids, batch = [], []
    for line in iter_lines(text):
        batch.append(line)
        if len(batch) == 512:
            ids.extend(i for seq in encode_lines(tok, batch, eos) for i in seq)
            batch.clear()
            if len(ids) >= tokens:
                break
    if batch and len(ids) < tokens:
        ids.extend(i for seq in encode_lines(tok, batch, eos) for i in seq)
    return ids[:tokens]


@torch.no_grad()
def mean_nll(engine, ids: list, window: int) -> float:
    """Mean next-token negative log-likelihood (nats) of the primary over windows of ``ids``."""
    from tandem_rt.engine.paged_model import build_meta

    pm, model, cache = engine.page_manager, engine.primary, engine.primary_cache
    total, count = 0.0, 0
    for w0 in range(0, len(ids) - window + 1, window):
        chunk = torch.tensor(ids[w0:w0 + window], dtype=torch.int64)
        sid = ("ppl", w0)
        pm.add_sequence(sid)
        try:
            pm.prepare_write(sid, 0, window)
            meta = build_meta(pm, [sid], [0], [window], [0], engine.device, dense=True)
            logits, _ = model.forward(chunk, meta, cache.k, cache.v)
        finally:
            pm.free(sid)
        lp = torch.log_softmax(logits[:-1].float(), -1)
        total += -float(lp.gather(1, chunk[1:, None]).sum())
        count += window - 1
    return total / count


def main(argv=None) -> int:
    from tandem_rt.engine import Engine
    from tandem_rt.paths import default_data_dir, default_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint referencing a GGUF primary (default: the bundled model)")
    ap.add_argument("--data", default=None, help="corpus directory (default: $TANDEM_RT_DATA/gutenberg_kids)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=64, help="tokens per window (<= 64: the quantized kernel's rows)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else default_model_path()
    ids = window_tokens(model_dir, Path(args.data) if args.data else default_data_dir(), args.split, args.tokens)
    rows = {}
    for name, quantized in (("dequantised", False), ("quantized (GGUF blocks)", True)):
        engine = Engine.from_pretrained(model_dir, dtype=args.dtype, quantized=quantized)
        t0 = time.perf_counter()
        nll = mean_nll(engine, ids, args.window)
        rows[name] = dict(nll=nll, ppl=math.exp(nll), wall_s=time.perf_counter() - t0)
        del engine
    print(f"{model_dir}: {args.split}, {len(ids):,} tokens in windows of {args.window}, {args.dtype}, "
          f"{cpu_model()}, {torch.get_num_threads()} thread(s)")
    print(f"{'primary weights':26s} {'NLL (nats)':>10s} {'perplexity':>10s}")
    for name, r in rows.items():
        print(f"{name:26s} {r['nll']:10.4f} {r['ppl']:10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=str(model_dir), split=args.split, tokens=len(ids),
                                                   window=args.window, dtype=args.dtype, device=cpu_model(),
                                                   threads=torch.get_num_threads(), rows=rows), indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
