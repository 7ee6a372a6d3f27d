"""``tandem-rt train``: a Tandem secondary, a standalone drafter and a router for any primary.

Stages, each resumable (a stage whose output exists is skipped; an interrupted one continues):

a. ``tokenize``  — the corpus with the primary's tokenizer -> ``<run>/tokens/{train,heldout}.bin``
   (uint16, or int32 for vocabularies over 65,536), ``<run>/tokens/*.json`` (counts);
b. ``cache``     — one pass of the frozen primary over the training windows -> ``<run>/cache``
   (:mod:`tandem_rt.train.primary_cache`: layer-map residual streams and the top-k next-token
   distribution, fingerprinted);
c. ``drafter``, ``tandem`` — the standalone drafter and the Tandem secondary with the same
   architecture, initialisation, data, loss and budget (:mod:`tandem_rt.train.draft_training`),
   then ``router`` (features of the Tandem secondary's drafts, labels the TV distance to the
   primary's top-k distribution);
d. ``export``    — a tandem checkpoint (the primary copied, or referenced by source and sha256
   with ``reference_primary``), and ``<run>/eval.json``: held-out metrics of both drafters.

Public API: :class:`TrainPlan`, :func:`run_pipeline`, and each stage's function.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from tandem_rt.config import FEATURE_AT
from tandem_rt.primary_source import PrimarySource, describe, detect_kind, load_primary
from tandem_rt.train.primary_cache import CacheError, PrimaryCache, build_primary_cache, make_fingerprint

EOS_LINE = "<|endoftext|>"
STAGES = ("tokenize", "cache", "drafter", "tandem", "router", "export")


class TrainError(ValueError):
    """Bad training input (corpus, options) or an inconsistent run directory; names the cause."""


@dataclass
class TrainPlan:
    """Every option of the pipeline (saved as ``<run>/plan.json``; a resumed run must match it)."""

    primary: str                        # .gguf file, Hugging Face directory or tandem checkpoint
    corpus: str                         # directory with train.txt[.xz] (+ val.txt[.xz]) or one text file
    out: str                            # checkpoint directory to write
    run_dir: str                        # stage outputs (caches, run states)
    train_tokens: int = 400_000         # tokens of training windows in the primary cache
    heldout_tokens: int = 16_384        # tokens of held-out windows for evaluation and the router
    seq_len: int = 256
    num_layers: int = 2                 # secondary / drafter depth
    init: str = "primary"               # "primary" | "scratch"
    scratch_config: Optional[dict] = None
    layer_map: Optional[list] = None    # default: evenly spaced, the last reads the primary's last layer
                                        # (with init_layers: init_layers, each layer reads its own input)
    init_layers: Optional[list] = None  # primary layers the small models copy (init="primary"; default
                                        # the first num_layers)
    proj_init: str = "lstsq"            # "lstsq" | "random" | "identity" (primary-derived K/V start as
                                        # the primary's own K/V of the copied layers)
    draft_vocab: Optional[int] = 8192   # reduced output vocabulary of both small models (None: full)
    tandem_init: str = "drafter-half"   # "drafter-half": the drafter after half its budget, then the
                                        # Tandem secondary trains the other half (same total budget);
                                        # "init": the same init as the drafter, the full budget
    feature_layer: Optional[int] = None  # primary layer (one of layer_map) fed into the secondary's
                                        # input (the feature input; None: Eq. (2) only)
    feature_hidden: Optional[int] = None  # hidden width of a two-layer feature MLP (None: one matrix)
    feature_at: str = "input"           # "input": added to the input embeddings; "output": to the
                                        # secondary's last residual (before its final norm)
    projection_embed: bool = False      # token-anchored projections: primary-derived residuals add the
                                        # token embeddings (TandemConfig.projection_embed)
    proj_lr_scale: float = 1.0          # learning rate of the Tandem projections (and, with the
                                        # feature input, W_f and its norm) relative to --lr
    feature_lr_scale: Optional[float] = None  # the feature input's own factor (None: proj_lr_scale)
    top_k: int = 32
    gamma_max: int = 8
    distil_weight: float = 0.5
    epochs: float = 2.0
    batch_size: int = 8
    lr: float = 2e-3
    seed: int = 0
    router_top_k: int = 4
    router_steps: int = 1500
    router_threshold: float = 0.9
    train_dtype: Optional[str] = None   # autocast dtype of the small models' training: "bfloat16",
                                        # "float32", or None = bfloat16 where the CPU has native bf16
                                        # products (AVX-512 BF16 / AMX), else float32
    primary_dtype: str = "float32"      # compute dtype of the frozen primary (cache pass, evaluation);
                                        # float32 GEMMs are faster than bf16 on CPUs without AMX
    out_dtype: str = "bfloat16"
    reference_primary: bool = False     # checkpoint names the primary by source + sha256
    package_source: Optional[dict] = None  # {"package": name, "file": path}: the reference names a package file
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("train_tokens", "heldout_tokens", "seq_len", "num_layers", "top_k", "gamma_max",
                     "batch_size", "router_top_k", "router_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TrainError(f"{name} must be a positive integer, got {value!r}")
        if self.seq_len < 2 * self.gamma_max + 1:
            raise TrainError(f"seq_len ({self.seq_len}) must be at least 2 * gamma_max + 1 ({2 * self.gamma_max + 1})")
        if self.init not in ("primary", "scratch"):
            raise TrainError(f"init must be 'primary' or 'scratch', got {self.init!r}")
        if self.draft_vocab is not None and (not isinstance(self.draft_vocab, int) or self.draft_vocab < 2):
            raise TrainError(f"draft_vocab must be None or an integer >= 2, got {self.draft_vocab!r}")
        if self.tandem_init not in ("drafter-half", "init"):
            raise TrainError(f"tandem_init must be 'drafter-half' or 'init', got {self.tandem_init!r}")
        if self.proj_init not in ("lstsq", "random", "identity"):
            raise TrainError(f"proj_init must be 'lstsq', 'random' or 'identity', got {self.proj_init!r}")
        if self.init_layers is not None:
            if self.init != "primary":
                raise TrainError(f"init_layers needs init='primary', got init={self.init!r}")
            if (not isinstance(self.init_layers, (list, tuple)) or len(self.init_layers) != self.num_layers
                    or any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in self.init_layers)
                    or any(a >= b for a, b in zip(self.init_layers, self.init_layers[1:]))):
                raise TrainError(f"init_layers must be {self.num_layers} increasing primary layer indices, "
                                 f"got {self.init_layers!r}")
            self.init_layers = list(self.init_layers)
        if not 0.0 <= float(self.distil_weight) <= 1.0:
            raise TrainError(f"distil_weight must be in [0, 1], got {self.distil_weight!r}")
        if not (isinstance(self.epochs, (int, float)) and self.epochs > 0 and math.isfinite(self.epochs)):
            raise TrainError(f"epochs must be a positive number, got {self.epochs!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise TrainError(f"lr must be in (0, 1), got {self.lr!r}")
        for name in ("proj_lr_scale", "feature_lr_scale"):
            value = getattr(self, name)
            if (value is not None or name == "proj_lr_scale") and not (
                    isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and 0 < value <= 1e3):
                raise TrainError(f"{name} must be a positive number, got {value!r}")
        if not 0.0 <= float(self.router_threshold) <= 1.0:
            raise TrainError(f"router_threshold must be in [0, 1], got {self.router_threshold!r}")
        if self.train_dtype not in (None, "bfloat16", "float32"):
            raise TrainError(f"train_dtype must be None, 'bfloat16' or 'float32', got {self.train_dtype!r}")
        if self.feature_hidden is not None and (not isinstance(self.feature_hidden, int)
                                                or isinstance(self.feature_hidden, bool) or self.feature_hidden < 1):
            raise TrainError(f"feature_hidden must be None or a positive integer, got {self.feature_hidden!r}")
        if not isinstance(self.projection_embed, bool):
            raise TrainError(f"projection_embed must be true or false, got {self.projection_embed!r}")
        if self.feature_at not in FEATURE_AT:
            raise TrainError(f"feature_at must be one of {list(FEATURE_AT)}, got {self.feature_at!r}")
        if self.feature_layer is not None and (not isinstance(self.feature_layer, int)
                                               or isinstance(self.feature_layer, bool) or self.feature_layer < 0):
            raise TrainError(f"feature_layer must be None or a primary layer index, got {self.feature_layer!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- stage a: tokenize

def corpus_files(corpus) -> tuple:
    """``(train_file, heldout_file or None)`` of a corpus directory or file."""
    p = Path(corpus)
    if p.is_file():
        return p, None
    if not p.is_dir():
        raise TrainError(f"corpus {str(p)!r} does not exist")
    def find(stem):
        for name in (f"{stem}.txt.xz", f"{stem}.txt"):
            if (p / name).is_file():
                return p / name
        return None
    train = find("train")
    if train is None:
        raise TrainError(f"corpus directory {str(p)!r} has no train.txt or train.txt.xz")
    return train, find("val")


def _eos_id(tok, primary_cfg) -> Optional[int]:
    tid = tok.token_to_id(EOS_LINE)
    return tid if tid is not None else primary_cfg.eos_token_id


def tokenize_corpus(tok, text_file, out_file: Path, max_tokens: int, eos_id: Optional[int],
                    skip_tokens: int = 0, passage_lines: int = 64, progress: bool = True) -> np.ndarray:
    """Tokenise ``text_file`` (one paragraph per line; a ``<|endoftext|>`` line ends a document)
    into ``out_file``; passages of ``passage_lines`` lines are taken at an even stride over the
    file so that ``max_tokens`` cover the whole corpus, skipping the first ``skip_tokens`` taken
    (a held-out slice). Written through a temporary file; reused when present.
    Returns the token array (memmap, uint16 or int32)."""
    from tqdm import tqdm

    from tandem_rt.train.tokenizer import open_text

    out_file = Path(out_file)
    dtype = np.uint16 if tok.get_vocab_size() <= 65536 else np.int32
    if out_file.is_file():
        return np.memmap(out_file, dtype=dtype, mode="r")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    size = Path(text_file).stat().st_size
    if size == 0:
        raise TrainError(f"corpus file {text_file} is empty")
    # ~4 bytes per token; stride over passages so that the budget spans the file
    est_tokens = size / 4.0
    stride = max(1, int(est_tokens // max(1.2 * (max_tokens + skip_tokens), 1)))
    ids: list = []
    taken = 0
    bar = tqdm(total=max_tokens, desc=f"tokenise {Path(text_file).name}", unit="tok", unit_scale=True,
               disable=not progress, mininterval=2.0)
    batch: list = []

    def flush():
        nonlocal taken
        texts = [line + "\n" for line in batch if line != EOS_LINE]
        encs = iter(tok.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
        for line in batch:
            seq = ([eos_id] if eos_id is not None else []) if line == EOS_LINE else next(encs).ids
            if taken < skip_tokens:
                taken += len(seq)
                continue
            room = max_tokens - (len(ids))
            ids.extend(seq[:room])
            bar.update(min(len(seq), room))
            taken += len(seq)
        batch.clear()

    with open_text(text_file) as fh:
        for n, line in enumerate(fh):
            if (n // passage_lines) % stride:
                continue
            batch.append(line.rstrip("\n"))
            if len(batch) >= 2048:
                flush()
                if len(ids) >= max_tokens:
                    break
        if batch and len(ids) < max_tokens:
            flush()
    bar.close()
    arr = np.asarray(ids, dtype=dtype)
    tmp = out_file.with_suffix(".tmp")
    arr.tofile(tmp)
    os.replace(tmp, out_file)
    return np.memmap(out_file, dtype=dtype, mode="r") if len(arr) else arr


def to_windows(tokens: np.ndarray, seq_len: int, what: str) -> np.ndarray:
    """Non-overlapping windows ``[W, seq_len]`` (int32); TrainError when there is none."""
    n = len(tokens) // seq_len
    if n < 1:
        raise TrainError(f"the {what} text gives {len(tokens)} tokens, fewer than one training window of "
                         f"{seq_len}: give a larger corpus or a smaller --seq-len")
    return np.asarray(tokens[: n * seq_len], dtype=np.int32).reshape(n, seq_len)


# ----------------------------------------------------------------------------- helpers

def default_layer_map_for(primary_layers: int, secondary_layers: int) -> list:
    from tandem_rt.config import default_layer_map

    return default_layer_map(primary_layers, secondary_layers)


def _json_write(file: Path, obj) -> None:
    from tandem_rt.checkpoint import atomic_write_text

    atomic_write_text(file, json.dumps(obj, indent=1))


def run_plan(run_dir) -> TrainPlan:
    """The plan a run directory was started with (``<run>/plan.json``), its ``run_dir`` set to that
    directory (the tools that read a finished run: probes, pilots)."""
    run = Path(run_dir)
    return TrainPlan(**{**json.loads((run / "plan.json").read_text()), "run_dir": str(run)})


def _check_plan(run: Path, plan: TrainPlan) -> None:
    """A run directory belongs to one plan; options that change results must not change on resume."""
    file = run / "plan.json"
    mine = plan.to_dict()
    # paths may move (the primary's identity is its sha256, checked by the cache fingerprint)
    volatile = {"out", "run_dir", "primary", "threads", "reference_primary", "package_source", "out_dtype",
                "router_threshold"}
    if file.is_file():
        old = json.loads(file.read_text())
        defaults = TrainPlan.__dataclass_fields__
        diff = [k for k in mine if k not in volatile
                and old.get(k, defaults[k].default) != mine[k]]
        if diff:
            raise TrainError(f"run directory {run} was started with other options ({', '.join(diff)}: "
                             + "; ".join(f"{k} was {old.get(k)!r}, now {mine[k]!r}" for k in diff)
                             + "); use another --run-dir or the same options")
    _json_write(file, mine)


# ----------------------------------------------------------------------------- stage c: training

def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX); elsewhere torch's bf16 GEMM
    is emulated and far slower than float32 (docs/TRAINING.md)."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def train_autocast(plan: TrainPlan) -> bool:
    """bf16 autocast for the small models' training, projection fit and router features."""
    if plan.train_dtype is None:
        return cpu_has_native_bf16()
    return plan.train_dtype == "bfloat16"


def _train_config(plan: TrainPlan, num_windows: int, fraction: float = 1.0):
    from tandem_rt.train.loop import TrainConfig

    total = int(fraction * plan.epochs * num_windows * plan.seq_len)
    return TrainConfig(total_tokens=max(total, plan.batch_size * plan.seq_len), batch_size=plan.batch_size,
                       seq_len=plan.seq_len, lr=plan.lr, warmup_steps=30, autocast_bf16=train_autocast(plan),
                       log_every=10, ckpt_every=50, seed=plan.seed)


def draft_vocabulary(plan: TrainPlan, source: PrimarySource, cache: PrimaryCache) -> Optional[torch.Tensor]:
    """The reduced draft vocabulary (``<run>/draft_vocab.pt``, chosen once from the cache), or None."""
    from tandem_rt.train.draft_training import choose_draft_vocab

    V = source.model.config.vocab_size
    if plan.draft_vocab is None or plan.draft_vocab >= V:
        return None
    file = Path(plan.run_dir) / "draft_vocab.pt"
    if file.is_file():
        return torch.load(file)
    cfg = source.model.config
    ids = choose_draft_vocab(cache, plan.draft_vocab, always=(cfg.eos_token_id, cfg.bos_token_id))
    torch.save(ids, file)
    return ids


def build_small_models(plan: TrainPlan, source: PrimarySource, layer_map: list, cache: PrimaryCache,
                       which: str, restoring: bool = False):
    """The untrained drafter (``which="drafter"``) or Tandem draft model (``"tandem"``).
    ``restoring``: a saved state will replace the weights, so the projections are not fitted."""
    from tandem_rt.train.draft_training import (TandemDraft, fit_projections, init_projections_identity,
                                                init_projections_random, init_small_model, small_model_config)

    primary = source.model
    subset = draft_vocabulary(plan, source, cache)
    cfg = small_model_config(primary.config, plan.num_layers, plan.init, plan.scratch_config,
                             None if subset is None else subset.numel())
    try:
        small = init_small_model(primary, cfg, plan.init, seed=plan.seed, vocab_subset=subset,
                                 layers=plan.init_layers)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    if which == "drafter":
        return small
    if plan.tandem_init == "drafter-half":
        from tandem_rt.train.loop import load_run_state

        state = load_run_state(Path(plan.run_dir) / "drafter" / "half")["model"]
        small.load_state_dict({k[len("model."):]: v for k, v in state.items()})
    feature_index = None if plan.feature_layer is None else list(layer_map).index(plan.feature_layer)
    draft = TandemDraft(small, primary.config.hidden_size, feature_index=feature_index,
                        eps=primary.config.rms_norm_eps, feature_at=plan.feature_at,
                        feature_hidden=plan.feature_hidden, projection_embed=plan.projection_embed)
    if restoring:
        pass
    elif plan.proj_init == "lstsq":
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=train_autocast(plan)):
            r2 = fit_projections(draft, cache)
        print(f"projections fitted by ridge regression: R^2 per layer {[round(x, 3) for x in r2]}", flush=True)
    elif plan.proj_init == "identity":
        try:
            init_projections_identity(draft)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
    else:
        init_projections_random(draft, plan.seed)
    set_lr_scale(draft.proj, plan.proj_lr_scale)
    if draft.feature is not None:
        set_lr_scale(draft.feature, plan.proj_lr_scale if plan.feature_lr_scale is None else plan.feature_lr_scale)
    return draft


def set_lr_scale(module: torch.nn.Module, scale: float) -> None:
    """Train every parameter of ``module`` at ``scale`` times the scheduled learning rate
    (``loop.make_optimizer`` reads the ``lr_scale`` attribute). The primary-derived paths start
    fitted (ridge projections) or neutral (``W_f = 0``), and a full-rate AdamW step moves each of
    their entries by up to ``lr`` (docs/TRAINING.md)."""
    for p in module.parameters():
        p.lr_scale = float(scale)


def train_small(plan: TrainPlan, source: PrimarySource, layer_map: list, cache: PrimaryCache, which: str,
                run: Path, progress: bool = True):
    """Train (or resume, or reload when finished) the drafter or the Tandem draft model."""
    from tandem_rt.train.draft_training import CacheWindowSampler, CachedDraftObjective
    from tandem_rt.train.loop import load_run_state, train

    import shutil

    out = run / which
    done_file = out / "done.json"
    model = build_small_models(plan, source, layer_map, cache, which, restoring=(out / "ckpt.pt").is_file())
    objective = CachedDraftObjective(model, cache, plan.distil_weight)
    half = which == "tandem" and plan.tandem_init == "drafter-half"
    cfg = _train_config(plan, len(cache), 0.5 if half else 1.0)
    sampler = CacheWindowSampler(len(cache), plan.gamma_max if which == "tandem" else 1, seed=plan.seed + 1)
    if done_file.is_file():
        state = load_run_state(out)
        objective.load_state_dict(state["model"])
        return model
    if which == "drafter" and plan.tandem_init == "drafter-half" and not (out / "half" / "ckpt.pt").is_file():
        half_steps = cfg.total_steps() // 2
        step = load_run_state(out)["step"] if (out / "ckpt.pt").is_file() else 0
        if step < half_steps:
            train(objective, sampler.sample, cfg, out, sampler=sampler, desc=f"{which} (first half)",
                  progress=progress, max_steps=half_steps - step)
        (out / "half").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "ckpt.pt", out / "half" / "ckpt.pt.tmp")
        os.replace(out / "half" / "ckpt.pt.tmp", out / "half" / "ckpt.pt")
    result = train(objective, sampler.sample, cfg, out, sampler=sampler, desc=which, progress=progress)
    if result["done"]:
        _json_write(done_file, result)
    return model


def train_router_stage(plan: TrainPlan, draft, cache: PrimaryCache, run: Path):
    """Router on the Tandem secondary's drafting distributions over cached windows."""
    from tandem_rt.config import RouterConfig
    from tandem_rt.models.router import Router, router_features
    from tandem_rt.train.draft_training import drafting_boundary
    from tandem_rt.train.router import train_router

    file = run / "router" / "router.pt"
    cfg = RouterConfig(embed_dim=draft.secondary.config.hidden_size, top_k=plan.router_top_k,
                       threshold=plan.router_threshold, gamma_max=plan.gamma_max)
    router = Router(cfg)
    if file.is_file():
        router.load_state_dict(torch.load(file, map_location="cpu")["state"])
        return router.eval()
    feats, labels = [], []
    n = min(len(cache), 64)
    embed = draft.secondary.model.embed_tokens.weight
    with torch.no_grad():
        for s in range(0, n, 8):
            batch = cache.batch(np.arange(s, min(n, s + 8)))
            T = batch.tokens.shape[1]
            b = drafting_boundary(T, plan.gamma_max).expand(batch.tokens.shape[0], -1)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=train_autocast(plan)):
                logits = draft(batch.tokens, batch.hidden, b).float()
            feats.append(router_features(logits, embed.float(), cfg.top_k).flatten(0, -2))
            labels.append(topk_tv(logits, batch.topk_ids, batch.topk_probs).flatten())
    f, tv = torch.cat(feats), torch.cat(labels)
    torch.manual_seed(plan.seed)
    train_router(router, f, tv, steps=plan.router_steps)
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg.to_dict(), "state": router.state_dict(), "mean_tv": float(tv.mean())}, file)
    return router.eval()


def topk_tv(logits: torch.Tensor, topk_ids: torch.Tensor, topk_probs: torch.Tensor) -> torch.Tensor:
    """Total-variation distance between ``softmax(logits)`` ``[..., V]`` and a distribution known on
    its top-k support ``topk_ids``/``topk_probs`` ``[..., k]`` (the remaining mass's placement
    unknown: the lower bound ``0.5·(Σ_S |p - q| + |P(S^c) - Q(S^c)|)``) -> float32 ``[...]``."""
    q_all = torch.softmax(logits.float(), -1)
    q = q_all.gather(-1, topk_ids)
    p = topk_probs.float()
    rest = (1.0 - p.sum(-1)) - (1.0 - q.sum(-1))
    return 0.5 * ((p - q).abs().sum(-1) + rest.abs())


# ----------------------------------------------------------------------------- stage d: export

def export_checkpoint(plan: TrainPlan, source: PrimarySource, layer_map: list, draft, drafter, router) -> Path:
    """Assemble and save the tandem checkpoint (see docs/CHECKPOINT.md for a referenced primary)."""
    from tandem_rt.checkpoint import materialize, save_checkpoint, skip_param_init
    from tandem_rt.config import TandemConfig
    from tandem_rt.dtypes import default_dtype, resolve_dtype
    from tandem_rt.models.tandem import TandemModel

    out_dtype = resolve_dtype(plan.out_dtype)
    sec_cfg = draft.secondary.config
    cfg = TandemConfig(primary=source.model.config, secondary=sec_cfg, layer_map=list(layer_map),
                       train_block_length=min(5, plan.gamma_max), train_boundary="drafting", projection_bias=True,
                       drafter=drafter.config, router=router.config, torch_dtype=plan.out_dtype,
                       feature_layer=plan.feature_layer,
                       feature_at=plan.feature_at if plan.feature_layer is not None else "input",
                       feature_hidden=plan.feature_hidden if plan.feature_layer is not None else None,
                       projection_embed=plan.projection_embed)
    with torch.device("meta"), default_dtype(out_dtype), skip_param_init():
        model = TandemModel(cfg)
    model = materialize(model, "cpu")
    with torch.no_grad():
        model.primary.load_state_dict(source.model.state_dict())
        model.secondary.load_state_dict(draft.secondary.state_dict())
        for j, proj in enumerate(draft.proj):
            model.tandem.proj[j].load_state_dict(proj.state_dict())
        if draft.feature is not None:
            model.tandem.feature.load_state_dict(draft.feature.state_dict())
        model.drafter.load_state_dict(drafter.state_dict())
        model.router.load_state_dict(router.state_dict())
    shared = [name for name, m in (("secondary", model.secondary), ("drafter", model.drafter))
              if plan.init == "primary" and torch.equal(m.model.embed_tokens.weight, model.primary.model.embed_tokens.weight)]
    ref = None
    if plan.reference_primary:
        ref = {"kind": source.kind, "sha256": source.sha256}
        if plan.package_source:
            ref.update({"package": plan.package_source["package"], "file": plan.package_source["file"]})
        else:
            ref["path"] = str(Path(source.path).resolve())
    return save_checkpoint(model.eval(), plan.out, tokenizer=source.tokenizer, dtype=out_dtype,
                           primary_source=ref, shared_embeddings=shared)


# ----------------------------------------------------------------------------- the pipeline

def run_pipeline(plan: TrainPlan, progress: bool = True, stop_after: Optional[str] = None) -> dict:
    """Run (or resume) every stage of ``plan``; returns the evaluation report (``<run>/eval.json``).

    ``stop_after``: the last stage to run (one of :data:`STAGES`), for time slicing.
    Raises:
        TrainError / CacheError naming a bad corpus, option or run directory.
    """
    from tandem_rt.dtypes import resolve_dtype
    from tandem_rt.train.draft_eval import evaluate_drafts, format_comparison, format_eval_table, paired_comparison

    if stop_after is not None and stop_after not in STAGES:
        raise TrainError(f"stop_after must be one of {STAGES}, got {stop_after!r}")
    if plan.threads:
        torch.set_num_threads(plan.threads)
    train_file, heldout_file = corpus_files(plan.corpus)
    detect_kind(plan.primary)  # a missing or unsupported primary is named before anything runs
    run = Path(plan.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    _check_plan(run, plan)
    t0 = time.time()
    source = load_primary(plan.primary, dtype=resolve_dtype(plan.primary_dtype), progress=progress)
    print(f"primary: {describe(source)}", flush=True)
    pcfg = source.model.config
    if plan.layer_map:
        layer_map = list(plan.layer_map)
    elif plan.init_layers:
        layer_map = list(plan.init_layers)
    else:
        layer_map = default_layer_map_for(pcfg.num_hidden_layers, plan.num_layers)
    if plan.init_layers and max(plan.init_layers) >= pcfg.num_hidden_layers:
        raise TrainError(f"init_layers {plan.init_layers} must be primary layers in 0..{pcfg.num_hidden_layers - 1}")
    if len(layer_map) != plan.num_layers:
        raise TrainError(f"layer_map has {len(layer_map)} entries; the secondary has {plan.num_layers} layers")
    if plan.feature_layer is not None and plan.feature_layer not in layer_map:
        raise TrainError(f"feature_layer {plan.feature_layer} must be one of layer_map {layer_map}")

    # a. tokenize
    eos = _eos_id(source.tokenizer, pcfg)
    train_tok = tokenize_corpus(source.tokenizer, train_file, run / "tokens" / "train.bin", plan.train_tokens,
                                eos, skip_tokens=0 if heldout_file else plan.heldout_tokens, progress=progress)
    held_tok = tokenize_corpus(source.tokenizer, heldout_file or train_file, run / "tokens" / "heldout.bin",
                               plan.heldout_tokens, eos, progress=progress)
    train_w = to_windows(train_tok, plan.seq_len, "training")
    held_w = to_windows(held_tok, plan.seq_len, "held-out")
    if stop_after == "tokenize":
        return {}

    # b. cache
    cache = build_primary_cache(source.model, train_w, run / "cache", layer_map, plan.top_k, source.sha256,
                                source.tokenizer_sha256, progress=progress)
    print(f"primary cache: {len(cache)} windows of {plan.seq_len} ({cache.meta['bytes_per_token']} bytes/token)",
          flush=True)
    if stop_after == "cache":
        return {}

    # c. drafter, tandem, router
    drafter = train_small(plan, source, layer_map, cache, "drafter", run, progress)
    if stop_after == "drafter":
        return {}
    draft = train_small(plan, source, layer_map, cache, "tandem", run, progress)
    if stop_after == "tandem":
        return {}
    router = train_router_stage(plan, draft, cache, run)
    if stop_after == "router":
        return {}

    # d. export + held-out evaluation
    ckpt = export_checkpoint(plan, source, layer_map, draft, drafter, router)
    report = evaluate_drafts(source.model, held_w, {"drafter-Distil": drafter.eval(), "Tandem-Distil": draft.eval()},
                             layer_map, progress=progress)
    report["_compare"] = {"Tandem-Distil vs drafter-Distil": paired_comparison(report, "drafter-Distil", "Tandem-Distil")}
    report["_meta"] = {"checkpoint": str(ckpt), "heldout_windows": int(len(held_w)), "train_windows": int(len(train_w)),
                       "layer_map": layer_map, "wall_s": time.time() - t0, "plan": plan.to_dict()}
    _json_write(run / "eval.json", report)
    print(format_eval_table(report), flush=True)
    print("Tandem-Distil vs drafter-Distil (95% paired bootstrap over held-out windows):\n"
          + format_comparison(report["_compare"]["Tandem-Distil vs drafter-Distil"]), flush=True)
    print(f"wrote {ckpt}", flush=True)
    return report
