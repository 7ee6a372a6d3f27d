"""Export the trained pipeline as a tandem_rt checkpoint (bf16): primary, Tandem-Distil secondary
with projections, secondary-Distil as the drafter, router, tokenizer.

    python tools/export_bundled.py --tandem runs/tandem_distil --drafter runs/secondary_distil \
        --router runs/router/router.pt --tokenizer runs/tokenizer.json --out runs/toy/ckpt
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tandem_rt.checkpoint import load_checkpoint, save_checkpoint
from tandem_rt.config import RouterConfig
from tandem_rt.models.router import Router
from tandem_rt.train.export import assemble
from tandem_rt.train.pretrain import load_lm
from tandem_rt.train.tandem import load_tandem_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tandem", required=True)
    ap.add_argument("--drafter", default=None)
    ap.add_argument("--router", default=None)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    tandem = load_tandem_run(args.tandem)
    drafter = load_lm(args.drafter) if args.drafter else None
    router = None
    if args.router:
        state = torch.load(args.router, map_location="cpu", weights_only=False)
        router = Router(RouterConfig.from_dict(state["config"]))
        router.load_state_dict(state["state"])
    model = assemble(tandem, drafter, router, dtype=args.dtype)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    out = save_checkpoint(model, args.out, tokenizer=args.tokenizer, dtype=dtype)
    back = load_checkpoint(out)  # validates the written checkpoint
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    print(f"exported {out}: {size / 2**20:.2f} MiB, parts: primary, secondary, tandem"
          f"{', drafter' if back.drafter is not None else ''}{', router' if back.router is not None else ''}")


if __name__ == "__main__":
    main()
