#!/usr/bin/env python
"""A training corpus of the primary's own greedy continuations (self-distillation data), for
`tandem-rt train --corpus`.

Drafts are verified against the primary's greedy continuations, and those differ from held-out prose:
a small primary soon repeats its own earlier phrases. This tool takes the first ``--prompts``
paragraphs (>= 200 characters) of a corpus split, lets the primary continue the first
``--prompt-tokens`` tokens of each greedily for ``--new-tokens`` tokens, and writes
``<out>/train.txt``: for each paragraph the original line, then (with ``--mix``, the default) the
prompt followed by the primary's continuation as a second line. ``<out>/val.txt[.xz]`` links to the
source corpus's validation split, so evaluations stay comparable with runs on the source corpus.

    python tools/greedy_corpus.py --corpus ../shared/data/gutenberg_kids --prompts 1600 \
        --out runs/smollm2/greedy_corpus

Resumable: continuations are appended in batches of ``--batch`` prompts to ``<out>/train.txt.part``
with a count in ``<out>/progress.json``; ``train.txt`` appears when all are done.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def paragraphs(corpus: Path, split: str, count: int, min_chars: int = 200) -> list:
    """The first ``count`` lines of ``corpus/<split>.txt[.xz]`` with at least ``min_chars``
    characters (stripped)."""
    from tandem_rt.train.tokenizer import open_text

    src = next((corpus / f"{split}{ext}" for ext in (".txt.xz", ".txt") if (corpus / f"{split}{ext}").is_file()), None)
    if src is None:
        raise SystemExit(f"--corpus {str(corpus)!r} has no {split}.txt or {split}.txt.xz")
    out = []
    with open_text(src) as fh:
        for line in fh:
            line = line.strip()
            if len(line) >= min_chars and line != "<|endoftext|>":
                out.append(line)
                if len(out) == count:
                    break
    if len(out) < count:
        raise SystemExit(f"{src} has only {len(out)} paragraphs of >= {min_chars} characters, --prompts asks {count}")
    return out


def main(argv=None) -> int:
    import torch
    from tqdm import tqdm

    import tandem_rt

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint whose primary continues (default: the bundled model)")
    ap.add_argument("--corpus", required=True, help="corpus directory with <split>.txt[.xz] (and val.txt[.xz])")
    ap.add_argument("--split", default="train")
    ap.add_argument("--prompts", type=int, required=True)
    ap.add_argument("--min-chars", type=int, default=200, help="shortest paragraph taken as a prompt")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-mix", dest="mix", action="store_false", help="write only the continuations")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    for name in ("prompts", "prompt_tokens", "new_tokens", "batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus, out = Path(args.corpus), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    final, part, progress_file = out / "train.txt", out / "train.txt.part", out / "progress.json"
    settings = {k: getattr(args, k) for k in ("model", "corpus", "split", "prompts", "min_chars", "prompt_tokens",
                                              "new_tokens", "dtype", "mix")}
    if final.is_file():
        print(f"{final} exists")
        return 0
    done = 0
    if progress_file.is_file():
        state = json.loads(progress_file.read_text())
        if state["settings"] != settings:
            raise SystemExit(f"{out} was started with other settings {state['settings']}; remove it or use them")
        done = state["done"]
        with open(part, "r+", encoding="utf-8") as fh:   # drop a batch written after the last count
            fh.truncate(state["bytes"])
    else:
        part.write_text("", encoding="utf-8")
    for ext in (".txt.xz", ".txt"):
        if (corpus / f"val{ext}").is_file() and not (out / f"val{ext}").exists():
            os.symlink((corpus / f"val{ext}").resolve(), out / f"val{ext}")
    lines = paragraphs(corpus, args.split, args.prompts, args.min_chars)
    engine = tandem_rt.Engine.from_pretrained(args.model, dtype=args.dtype, max_batch_size=args.batch,
                                              quantized=False)
    tok = engine.tokenizer
    params = tandem_rt.SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    t0 = time.time()
    bar = tqdm(total=args.prompts, initial=done, desc="greedy continuations", unit="prompt")
    while done < args.prompts:
        batch = lines[done:done + args.batch]
        prompts = [tok.encode(line).ids[:args.prompt_tokens] for line in batch]
        results = sorted(engine.generate(prompts, params, mode="primary"), key=lambda r: r.prompt_index)
        with open(part, "a", encoding="utf-8") as fh:
            for line, p, r in zip(batch, prompts, results):
                text = " ".join(tok.decode(p + r.token_ids).split())   # one line: newlines folded
                fh.write((f"{line}\n" if args.mix else "") + f"{text}\n")
            fh.flush()
            os.fsync(fh.fileno())
        done += len(batch)
        progress_file.write_text(json.dumps({"settings": settings, "done": done, "bytes": part.stat().st_size}))
        bar.update(len(batch))
    bar.close()
    os.replace(part, final)
    print(f"wrote {final}: {args.prompts} prompts x {args.new_tokens} greedy tokens in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
