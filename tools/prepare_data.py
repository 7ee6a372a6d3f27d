"""Tokenise the corpus splits once into cached uint16 memmaps.

    python tools/prepare_data.py --tokenizer runs/tokenizer.json --out runs/data
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from tandem_rt.train.data import tokenize_to_memmap
from tandem_rt.train.tokenizer import load_tokenizer

from tandem_rt.paths import default_data_dir

DEFAULT_DATA = str(default_data_dir(must_exist=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--tokenizer", default="runs/tokenizer.json")
    ap.add_argument("--out", default="runs/data")
    ap.add_argument("--splits", nargs="+", default=["val", "test", "train"])
    args = ap.parse_args()
    tok = load_tokenizer(args.tokenizer)
    for split in args.splits:
        t0 = time.time()
        arr = tokenize_to_memmap(tok, Path(args.data) / f"{split}.txt.xz", Path(args.out) / f"{split}.bin")
        print(f"{split}: {len(arr):,} tokens ({time.time() - t0:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
