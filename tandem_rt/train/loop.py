"""A small resumable training loop: AdamW, warmup + cosine schedule, gradient clipping,
optional bf16 autocast, a progress bar with loss and tokens/s, JSONL log, DDP.

The model side is an *objective*: an ``nn.Module`` whose ``forward(input_ids [B, T] int64)``
returns ``(loss scalar, {name: float metric})``. Parameters with ``requires_grad=False``
(a frozen primary) are neither optimised nor synchronised.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from tandem_rt.train.distributed import DistInfo, all_reduce_mean, wrap_ddp


@dataclass
class TrainConfig:
    total_tokens: int          # tokens over all ranks (batch_size * seq_len * world per step)
    batch_size: int = 16       # sequences per rank per step
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    autocast_bf16: bool = False
    compile: bool = False      # torch.compile the objective (fuses the elementwise ops; ~1.4x on CPU)
    log_every: int = 10
    ckpt_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("total_tokens", "batch_size", "seq_len", "log_every", "ckpt_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")

    def total_steps(self, world_size: int = 1) -> int:
        return max(1, math.ceil(self.total_tokens / (self.batch_size * self.seq_len * world_size)))


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup for ``warmup_steps`` then cosine decay to ``lr * min_lr_ratio`` at ``total``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on vectors (norms, biases).

    A parameter with an ``lr_scale`` attribute (a float set by the model, e.g. the feature input's
    ``W_f``) trains at ``lr_scale`` times the scheduled learning rate: its group keeps the factor
    as ``"lr_scale"`` and :func:`train` multiplies each step's rate by it.
    """
    groups: dict = {}
    for p in module.parameters():
        if p.requires_grad:
            key = (p.dim() >= 2, float(getattr(p, "lr_scale", 1.0)))
            groups.setdefault(key, []).append(p)
    param_groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": scale}
                    for (decay, scale), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas))


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(objective: nn.Module, sample: Callable[[int], torch.Tensor], cfg: TrainConfig, out_dir,
          info: Optional[DistInfo] = None, extra_state: Optional[dict] = None, sampler=None,
          desc: str = "train", progress: bool = True, max_steps: Optional[int] = None) -> dict:
    """Train ``objective`` until ``cfg.total_tokens`` have been seen; resumable.

    Args:
        objective: module, ``forward(input_ids [B, T]) -> (loss, metrics)``.
        sample: ``sample(batch_size) -> int64 [B, seq_len]`` batch for this rank.
        out_dir: run directory: ``ckpt.pt`` (weights of ``objective``, optimizer, step, sampler
            state, ``extra_state``) and ``log.jsonl`` (one line per logged step; rank 0 only).
        info: distributed info (None = single process on CPU).
        sampler: object with ``state_dict``/``load_state_dict`` saved alongside (optional).
        max_steps: stop after this many steps in *this call* (for tests / time slicing).
    Returns:
        ``{"step", "tokens", "loss" (last logged), "wall_s" (this call), "done"}``.
    """
    info = info or DistInfo(0, 1, 0, torch.device("cpu"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "ckpt.pt"
    log_path = out_dir / "log.jsonl"
    total = cfg.total_steps(info.world_size)
    opt = make_optimizer(objective, cfg)
    step, tokens, wall_before = 0, 0, 0.0
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        objective.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, tokens, wall_before = state["step"], state["tokens"], state.get("wall_s", 0.0)
        if sampler is not None and state.get("sampler") is not None:
            if info.rank == 0:
                sampler.load_state_dict(state["sampler"])
            elif hasattr(sampler, "reseed"):
                sampler.reseed(step)  # only rank 0's stream is saved; others continue on a fresh stream
    model = wrap_ddp(objective, info)
    if cfg.compile:
        model = torch.compile(model)
    params = [p for p in objective.parameters() if p.requires_grad]
    tokens_per_step = cfg.batch_size * cfg.seq_len * info.world_size
    bar = tqdm(total=total, initial=step, desc=desc, disable=not (progress and info.is_main),
               dynamic_ncols=True, mininterval=2.0)
    t_start = time.time()
    t_log, tok_log = time.time(), 0
    last = {"loss": float("nan")}
    done_here = 0

    def save():
        if info.is_main:
            _atomic_save({"model": objective.state_dict(), "optimizer": opt.state_dict(), "step": step,
                          "tokens": tokens, "wall_s": wall_before + time.time() - t_start,
                          "sampler": sampler.state_dict() if sampler is not None else None,
                          "train_config": asdict(cfg), "extra": extra_state or {}}, ckpt_path)

    model.train()
    while step < total and (max_steps is None or done_here < max_steps):
        lr = lr_at(step, total, cfg)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        batch = sample(cfg.batch_size).to(info.device)
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
            loss, metrics = model(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        done_here += 1
        tokens += tokens_per_step
        tok_log += tokens_per_step
        if step % cfg.log_every == 0 or step == total:
            loss_v = all_reduce_mean(float(loss.detach()), info)
            now = time.time()
            rate = tok_log / max(now - t_log, 1e-9)
            t_log, tok_log = now, 0
            last = {"step": step, "tokens": tokens, "loss": loss_v, "lr": lr, "grad_norm": float(gnorm),
                    "tok_per_s": rate, "wall_s": wall_before + now - t_start,
                    **{k: all_reduce_mean(float(v), info) for k, v in metrics.items()}}
            if info.is_main:
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(last) + "\n")
            bar.set_postfix(loss=f"{loss_v:.3f}", tok_s=f"{rate:,.0f}", lr=f"{lr:.2e}")
        bar.update(1)
        if step % cfg.ckpt_every == 0 or step == total:
            save()
    bar.close()
    if done_here:
        save()
    final_loss = float(loss.detach()) if done_here else last.get("loss")
    return {"step": step, "tokens": tokens, "loss": final_loss, "wall_s": time.time() - t_start,
            "done": step >= total}


def load_run_state(out_dir) -> dict:
    """The saved ``ckpt.pt`` of a run (CPU tensors)."""
    path = Path(out_dir) / "ckpt.pt"
    if not path.is_file():
        raise ValueError(f"no checkpoint at {str(path)!r}")
    return torch.load(path, map_location="cpu", weights_only=False)
