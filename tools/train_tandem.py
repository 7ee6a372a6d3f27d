"""Train the Tandem secondary (primary frozen) or the distilled standalone drafter.

Tandem stage 1 (CE) from the pretrained secondary, projections random:
    python tools/train_tandem.py --mode tandem --primary runs/primary --init runs/secondary \
        --distil-weight 0 --tokens 1000000 --out runs/tandem_s1
Tandem-Distil stage 2 (from stage 1):
    python tools/train_tandem.py --mode tandem --primary runs/primary --init runs/tandem_s1 \
        --distil-weight 0.5 --tokens 1000000 --out runs/tandem_distil
secondary-Distil (standalone secondary, same stage-2 loss and tokens):
    python tools/train_tandem.py --mode drafter --primary runs/primary --init runs/secondary \
        --distil-weight 0.5 --tokens 1000000 --out runs/secondary_distil
Runs under torchrun (DDP) as tools/pretrain.py does; rerunning with the same --out resumes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain import add_train_args, train_config  # noqa: E402

from tandem_rt.train.data import WindowSampler, load_tokens  # noqa: E402
from tandem_rt.train.distributed import cleanup, init_distributed  # noqa: E402
from tandem_rt.train.loop import load_run_state, train  # noqa: E402
from tandem_rt.train.pretrain import load_lm  # noqa: E402
from tandem_rt.train.tandem import (DistilObjective, TandemObjective, build_tandem, freeze,  # noqa: E402
                                    load_tandem_run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", required=True, choices=["tandem", "drafter"])
    ap.add_argument("--primary", required=True, help="pretraining run directory of the primary")
    ap.add_argument("--init", required=True, help="run directory to start from (pretrained secondary or a tandem run)")
    ap.add_argument("--distil-weight", type=float, default=0.0, help="w in (1-w)·CE + w·CE(primary soft labels)")
    ap.add_argument("--block-length", type=int, default=2)
    ap.add_argument("--out", required=True)
    add_train_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = init_distributed(args.device)
    primary = freeze(load_lm(args.primary))
    init_state = load_run_state(args.init)
    if args.mode == "tandem":
        if "secondary_config" in init_state["extra"]:
            tandem = load_tandem_run(args.init)
        else:
            tandem = build_tandem(primary, load_lm(args.init), seed=args.seed, block_length=args.block_length)
        tandem.primary.load_state_dict(primary.state_dict())
        objective = TandemObjective(tandem, args.distil_weight, args.block_length)
        extra = {"primary_config": primary.config.to_dict(), "secondary_config": tandem.secondary.config.to_dict(),
                 "block_length": args.block_length, "distil_weight": args.distil_weight, "init": args.init}
    else:
        student = load_lm(args.init)
        objective = DistilObjective(student, primary, args.distil_weight)
        extra = {"model_config": student.config.to_dict(), "prefix": "student.",
                 "distil_weight": args.distil_weight, "init": args.init}
    objective.to(info.device)
    sampler = WindowSampler(load_tokens(f"{args.data}/train.bin"), args.seq_len, args.seed + 17, info.rank)
    result = train(objective, sampler.sample, train_config(args), args.out, info, extra_state=extra,
                   sampler=sampler, desc=Path(args.out).name, max_steps=args.max_steps)
    if info.is_main:
        print(json.dumps(result), flush=True)
    cleanup(info)


if __name__ == "__main__":
    main()
