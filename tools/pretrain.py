"""Pretrain a standalone model (primary or secondary) with next-token cross-entropy.

Single process:   python tools/pretrain.py --role primary --tokens 6000000 --out runs/primary
Data parallel:    torchrun --nproc_per_node 2 tools/pretrain.py --role primary ...
Resumable: rerunning with the same --out continues from runs/<name>/ckpt.pt.
"""
from __future__ import annotations

import argparse
import json

import torch

from tandem_rt.models.llama import LlamaForCausalLM
from tandem_rt.train.data import WindowSampler, load_tokens
from tandem_rt.train.distributed import cleanup, init_distributed
from tandem_rt.train.loop import TrainConfig, train
from tandem_rt.train.pretrain import CausalLMObjective, count_params, init_weights, preset_config


def add_train_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", default="runs/data", help="directory with train.bin (tools/prepare_data.py)")
    ap.add_argument("--tokens", type=int, required=True, help="total training tokens (all ranks)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training objective")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--max-steps", type=int, default=None, help="stop after N steps in this call")


def train_config(args) -> TrainConfig:
    return TrainConfig(total_tokens=args.tokens, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                       warmup_steps=args.warmup, autocast_bf16=args.bf16, compile=args.compile, ckpt_every=args.ckpt_every,
                       seed=args.seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", required=True, choices=["primary", "secondary"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab-size", type=int, default=8192)
    add_train_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = init_distributed(args.device)
    torch.manual_seed(args.seed)
    cfg = preset_config(args.role, args.vocab_size)
    model = init_weights(LlamaForCausalLM(cfg)).to(info.device)
    if info.is_main:
        print(f"{args.role}: {count_params(model):,} parameters; config {json.dumps(cfg.to_dict())}", flush=True)
    sampler = WindowSampler(load_tokens(f"{args.data}/train.bin"), args.seq_len, args.seed, info.rank)
    result = train(CausalLMObjective(model), sampler.sample, train_config(args), args.out, info,
                   extra_state={"model_config": cfg.to_dict(), "role": args.role}, sampler=sampler,
                   desc=args.role, max_steps=args.max_steps)
    if info.is_main:
        print(json.dumps(result), flush=True)
    cleanup(info)


if __name__ == "__main__":
    main()
