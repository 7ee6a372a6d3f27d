"""Train the byte-level BPE tokenizer on the train split.

    python tools/train_tokenizer.py --data ../shared/data/gutenberg_kids --out runs/tokenizer.json
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from tandem_rt.train.tokenizer import iter_lines, train_bpe

from tandem_rt.paths import default_data_dir

DEFAULT_DATA = str(default_data_dir(must_exist=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA, help="directory with train.txt.xz")
    ap.add_argument("--out", default="runs/tokenizer.json")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--stride", type=int, default=1, help="use every N-th paragraph")
    args = ap.parse_args()
    t0 = time.time()
    tok = train_bpe(iter_lines(Path(args.data) / "train.txt.xz", args.stride), args.vocab_size)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(args.out)
    sample = "Once upon a time there was a little girl who lived in a wood."
    print(f"saved {args.out} (vocab {tok.get_vocab_size()}) in {time.time() - t0:.1f}s; "
          f"{len(tok.encode(sample).ids)} tokens for {sample!r}")


if __name__ == "__main__":
    main()
