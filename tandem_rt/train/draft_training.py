"""Training the Tandem secondary and the standalone drafter from the primary cache.

Both small models get the same architecture, initialisation, data, loss and budget, so that
the comparison between ``tandem-speed`` and ``speed`` is fair:

* **Initialisation** (:func:`init_small_model`): ``"primary"`` copies the primary's token
  embeddings (frozen and *shared*: the checkpoint stores them once), its first ``L_S`` decoder
  layers and its final norm; ``"scratch"`` is a Hugging Face style random init.
* **Drafting masks** (:func:`drafting_boundary`): the engine drafts a block of γ tokens from a
  block start ``q0``; the query at position ``i`` of the block reads primary-derived K/V for
  ``p < q0`` and its own for ``q0 <= p <= i`` (1..γ own positions). Training draws γ uniformly
  from ``[1, γ_max]`` and a random block phase per sequence: ``b(i) = q0(i)`` with
  ``q0(i) = floor((i - φ)/γ)·γ + φ`` (``0`` for ``i < φ``).
* **Loss** (:func:`cached_distil_loss`): ``(1 - w)·CE(next token) + w·CE(primary top-k)``, the
  primary's top-k probabilities renormalised (``w = 0.5``: Tandem-Distil / drafter-Distil).
* **Projection init** (:func:`fit_projections`): ``"lstsq"`` fits each ``proj_j`` by ridge
  regression so that ``proj_j(x^(l(j)))`` predicts the secondary's own residual ``y^(j)`` on
  cached windows: primary-derived K/V then start close to the secondary's own and training
  does not first have to undo a random disturbance; ``"random"`` is the importer's init.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem_rt.config import ModelConfig
from tandem_rt.models.llama import LlamaForCausalLM
from tandem_rt.models.tandem import FeatureInput, tandem_secondary_forward
from tandem_rt.train.primary_cache import CacheBatch, PrimaryCache

INITS = ("primary", "scratch")
PROJ_INITS = ("lstsq", "random")


def drafting_boundary(T: int, gamma: int, phase: int = 0, device=None) -> torch.Tensor:
    """Block starts of drafting with block length ``gamma`` and phase ``phase`` -> int64 ``[T]``.

    ``b(i) = floor((i - phase)/gamma)·gamma + phase`` for ``i >= phase``, ``0`` before: the
    query at ``i`` reads ``i - b(i) + 1`` (1..gamma) own positions.
    """
    if gamma < 1 or not 0 <= phase < max(gamma, 1):
        raise ValueError(f"need gamma >= 1 and 0 <= phase < gamma, got gamma={gamma}, phase={phase}")
    i = torch.arange(T, device=device)
    b = torch.div(i - phase, gamma, rounding_mode="floor") * gamma + phase
    return torch.where(i < phase, torch.zeros_like(i), b)


def random_boundaries(plan: torch.Tensor, T: int) -> torch.Tensor:
    """``plan`` int64 ``[B, 3]`` rows ``(window, gamma, phase)`` -> boundaries int64 ``[B, T]``."""
    return torch.stack([drafting_boundary(T, int(g), int(f)) for _, g, f in plan.tolist()])


class CacheWindowSampler:
    """Draws training plans ``[B, 3]`` = ``(window index, γ in [1, γ_max], phase in [0, γ))``.

    Windows are drawn without replacement within an epoch (a fresh permutation per epoch); the
    generator state and epoch position are saved with the run (``state_dict``) so a resumed run
    continues the same stream.
    """

    def __init__(self, num_windows: int, gamma_max: int, seed: int = 0):
        if num_windows < 1:
            raise ValueError(f"num_windows must be >= 1, got {num_windows}")
        if gamma_max < 1:
            raise ValueError(f"gamma_max must be >= 1, got {gamma_max}")
        self.n, self.gamma_max = num_windows, gamma_max
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(self.n, generator=self.gen)
        self.pos = 0

    def sample(self, batch_size: int) -> torch.Tensor:
        idx = []
        while len(idx) < batch_size:
            if self.pos >= self.n:
                self.perm = torch.randperm(self.n, generator=self.gen)
                self.pos = 0
            take = min(batch_size - len(idx), self.n - self.pos)
            idx.extend(self.perm[self.pos:self.pos + take].tolist())
            self.pos += take
        gamma = torch.randint(1, self.gamma_max + 1, (batch_size,), generator=self.gen)
        phase = (torch.rand(batch_size, generator=self.gen) * gamma).long().clamp_max(gamma - 1)
        return torch.stack([torch.tensor(idx), gamma, phase], dim=1)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.perm, self.pos = state["perm"], state["pos"]


def choose_draft_vocab(cache: PrimaryCache, size: int, always=()) -> torch.Tensor:
    """A reduced draft vocabulary: the ``size`` tokens most often the primary's greedy choice or
    the next token in the cached windows (ties: lower id), plus ``always`` (e.g. EOS), filled
    with the lowest unused ids if the cache has fewer distinct tokens. -> sorted int64 ``[size]``."""
    V = cache.meta["vocab_size"]
    if not 1 <= size <= V:
        raise ValueError(f"draft vocabulary size must be in [1, {V}], got {size}")
    counts = np.bincount(np.asarray(cache.topk_ids[..., 0]).ravel(), minlength=V).astype(np.float64)
    counts += np.bincount(np.asarray(cache.tokens).ravel(), minlength=V)
    keep = [int(t) for t in always if t is not None and 0 <= int(t) < V]
    counts[keep] = np.inf
    order = np.lexsort((np.arange(V), -counts))  # by count descending, then id
    return torch.from_numpy(np.sort(order[:size])).to(torch.int64)


def small_model_config(primary: ModelConfig, num_layers: int, init: str,
                       scratch_config: Optional[dict] = None, draft_vocab: Optional[int] = None) -> ModelConfig:
    """The secondary / drafter config: the primary's with ``num_layers`` layers (``init="primary"``)
    or ``scratch_config`` fields over the primary's vocabulary and special ids (``"scratch"``);
    ``draft_vocab``: size of a reduced output vocabulary (None: the full vocabulary)."""
    cfg = _small_model_config(primary, num_layers, init, scratch_config)
    if draft_vocab is not None and draft_vocab < cfg.vocab_size:
        d = cfg.to_dict()
        d["output_vocab_size"] = int(draft_vocab)
        cfg = ModelConfig.from_dict(d)
    return cfg


def _small_model_config(primary: ModelConfig, num_layers: int, init: str,
                        scratch_config: Optional[dict] = None) -> ModelConfig:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    if init == "primary":
        if num_layers > primary.num_hidden_layers:
            raise ValueError(f"num_layers ({num_layers}) exceeds the primary's {primary.num_hidden_layers} layers")
        d = primary.to_dict()
        d["num_hidden_layers"] = num_layers
        return ModelConfig.from_dict(d)
    d = dict(scratch_config or {"hidden_size": 256, "intermediate_size": 704, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "head_dim": 64})
    d["num_hidden_layers"] = num_layers
    for name in ("vocab_size", "bos_token_id", "eos_token_id", "max_position_embeddings", "rope_theta",
                 "rms_norm_eps"):
        d.setdefault(name, getattr(primary, name))
    d.setdefault("tie_word_embeddings", True)
    return ModelConfig.from_dict(d, "scratch secondary config")


def init_layer_indices(layers: Optional[Sequence[int]], num_layers: int, primary_layers: int) -> list:
    """The primary layer each small-model layer copies: ``layers`` checked (``num_layers`` distinct
    indices in ``0..primary_layers-1``, increasing), or ``0..num_layers-1`` when None."""
    if layers is None:
        return list(range(num_layers))
    out = [int(x) for x in layers]
    if len(out) != num_layers:
        raise ValueError(f"init_layers has {len(out)} entries; the small model has {num_layers} layers")
    if any(not 0 <= x < primary_layers for x in out) or any(a >= b for a, b in zip(out, out[1:])):
        raise ValueError(f"init_layers must be increasing primary layer indices in 0..{primary_layers - 1}, got {out}")
    return out


def init_small_model(primary: LlamaForCausalLM, cfg: ModelConfig, init: str, seed: int = 0,
                     vocab_subset: Optional[torch.Tensor] = None,
                     layers: Optional[Sequence[int]] = None) -> LlamaForCausalLM:
    """A float32 small model for ``cfg``.

    ``init="primary"``: the primary's embeddings (a frozen float32 copy; the exported checkpoint
    stores them once, as the primary's), the primary's layers ``layers`` (default: the first
    ``cfg.num_hidden_layers``; layer ``j`` of the small model copies primary layer ``layers[j]``)
    and final norm (trainable copies); an untied LM head is copied and frozen too.
    ``init="scratch"``: normal(0, 0.02) matrices, unit norms.
    """
    from tandem_rt.importing import init_fresh_decoder

    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    if cfg.output_vocab_size is not None:
        if vocab_subset is None or vocab_subset.numel() != cfg.output_vocab_size:
            raise ValueError(f"a reduced vocabulary of {cfg.output_vocab_size} needs vocab_subset with that many ids")
        model.vocab_subset.copy_(vocab_subset)
    if init == "scratch":
        init_fresh_decoder(model, torch.Generator().manual_seed(seed))
        return model
    source_layers = init_layer_indices(layers, cfg.num_hidden_layers, primary.config.num_hidden_layers)
    p_sd = primary.state_dict()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.startswith("model.layers."):
                j, rest = name[len("model.layers."):].split(".", 1)
                t.copy_(p_sd[f"model.layers.{source_layers[int(j)]}.{rest}"].float())
            elif name == "model.norm.weight":
                t.copy_(p_sd[name].float())
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(primary.model.embed_tokens.weight.float())
        if model.lm_head is not None:
            model.lm_head.weight.copy_(primary.lm_head.weight.float())
    model.model.embed_tokens.weight.requires_grad_(False)
    if model.lm_head is not None:
        model.lm_head.weight.requires_grad_(False)
    return model


def frozen_shared(model: LlamaForCausalLM) -> bool:
    """True when the model's embeddings are frozen (shared with the primary)."""
    return not model.model.embed_tokens.weight.requires_grad


def subset_index(vocab_subset: Optional[torch.Tensor], vocab_size: int) -> Optional[torch.Tensor]:
    """Full token id -> index in ``vocab_subset`` (int64 ``[V]``, -1 outside); None without a subset."""
    if vocab_subset is None:
        return None
    index = torch.full((vocab_size,), -1, dtype=torch.int64)
    index[vocab_subset] = torch.arange(vocab_subset.numel())
    return index


def cached_distil_loss(logits: torch.Tensor, batch: CacheBatch, distil_weight: float,
                       index: Optional[torch.Tensor] = None):
    """``(1-w)·CE(next token) + w·KD`` over positions ``0..T-2``.

    Args:
        logits: student logits ``[B, T, N]`` (N = V, or the reduced vocabulary's size).
        batch: the cache batch (tokens ``[B, T]``, primary top-k ids/probs ``[B, T, k]``).
        distil_weight: w in [0, 1].
        index: :func:`subset_index` of a reduced vocabulary: targets outside it are left out of
            the CE, and the primary's top-k is restricted to it before renormalising.
    Returns:
        ``(loss, {"ce": float, "kd": float})``; KD is the cross-entropy to the renormalised top-k.
    """
    s = logits[:, :-1].float()
    lsm = s.log_softmax(-1)
    targets = batch.tokens[:, 1:].to(s.device)
    ids = batch.topk_ids[:, :-1].to(s.device)
    q = batch.topk_probs[:, :-1].to(s.device)
    if index is not None:
        targets, ids = index[targets], index[ids]
        q = q * (ids >= 0)
        ce_mask = (targets >= 0).float()
        targets, ids = targets.clamp_min(0), ids.clamp_min(0)
    else:
        ce_mask = torch.ones_like(targets, dtype=torch.float32)
    ce = -(lsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * ce_mask).sum() / ce_mask.sum().clamp_min(1)
    mass = q.sum(-1, keepdim=True)
    q = q / mass.clamp_min(1e-12)
    kd_mask = (mass.squeeze(-1) > 0).float()
    kd = -((q * lsm.gather(-1, ids)).sum(-1) * kd_mask).sum() / kd_mask.sum().clamp_min(1)
    loss = (1.0 - distil_weight) * ce + distil_weight * kd
    return loss, {"ce": float(ce.detach()), "kd": float(kd.detach())}


class TandemDraft(nn.Module):
    """A Tandem secondary with its projections, without the primary (it comes from the cache).

    ``feature_index``: with the feature input (``TandemConfig.feature_layer``), the index of its
    layer in the layer map (``self.feature``: :class:`FeatureInput`, zero-initialised); None: Eq. (2) only.
    ``feature_at``: ``"input"`` (added to the input embeddings) or ``"output"`` (to the last residual);
    ``feature_hidden``: the feature MLP's hidden width (None: one matrix); ``projection_embed``: token-
    anchored projections (the primary-derived residuals add the token embeddings). ``proj`` /
    ``feature``: existing modules to share instead of new ones (:meth:`from_tandem_model`).
    """

    def __init__(self, secondary: LlamaForCausalLM, d_primary: int, bias: bool = True,
                 feature_index: Optional[int] = None, eps: float = 1e-5, feature_at: str = "input",
                 feature_hidden: Optional[int] = None, projection_embed: bool = False,
                 proj: Optional[nn.ModuleList] = None, feature: Optional[nn.Module] = None):
        super().__init__()
        self.feature_at = feature_at
        self.projection_embed = bool(projection_embed)
        self.own_context = False   # tools/pilot_own_context.py sets it (models.tandem.tandem_secondary_forward)
        self.secondary = secondary
        self.proj = proj if proj is not None else nn.ModuleList(
            nn.Linear(d_primary, secondary.config.hidden_size, bias=bias) for _ in range(secondary.config.num_hidden_layers))
        self.feature_index = feature_index
        if feature is None and feature_index is not None:
            feature = FeatureInput(d_primary, secondary.config.hidden_size, eps, hidden=feature_hidden)
        self.feature = feature

    @classmethod
    def from_tandem_model(cls, model) -> "TandemDraft":
        """The secondary, projections and feature input of a :class:`~tandem_rt.models.TandemModel`
        (e.g. a loaded checkpoint; its modules are shared, not copied). ``.layer_map`` is set to the
        model's, so :func:`tandem_rt.train.draft_eval.evaluate_drafts` reads those residual streams."""
        cfg = model.config
        draft = cls(model.secondary, cfg.primary.hidden_size, bias=cfg.projection_bias,
                    feature_index=model.feature_index, feature_at=cfg.feature_at,
                    projection_embed=cfg.projection_embed, proj=model.tandem.proj, feature=model.feature)
        draft.layer_map = list(cfg.layer_map)
        return draft

    def forward(self, input_ids, primary_hidden, boundary, reduced: bool = False):
        """``input_ids [B, T]``, hidden per layer ``[B, T, d_L]``, boundary ``[B, T]`` -> logits
        ``[B, T, V]`` (``reduced``: ``[B, T, N]`` over the secondary's ``vocab_subset``)."""
        return tandem_secondary_forward(self.secondary, self.proj, input_ids, primary_hidden, boundary,
                                        reduced=reduced, feature=self.feature, feature_index=self.feature_index,
                                        feature_at=self.feature_at, projection_embed=self.projection_embed,
                                        own_context=self.own_context)


class CachedDraftObjective(nn.Module):
    """``forward(plan [B, 3]) -> (loss, metrics)`` for the training loop: reads the windows of the
    plan from the cache; a :class:`TandemDraft` runs Eq. (2) with the plan's drafting masks, a
    standalone :class:`LlamaForCausalLM` drafter runs causally."""

    def __init__(self, model: nn.Module, cache: PrimaryCache, distil_weight: float = 0.5):
        super().__init__()
        if not 0.0 <= distil_weight <= 1.0:
            raise ValueError(f"distil_weight must be in [0, 1], got {distil_weight!r}")
        self.model = model
        self.cache = cache
        self.distil_weight = float(distil_weight)
        small = model.secondary if isinstance(model, TandemDraft) else model
        self.index = subset_index(small.vocab_subset, small.config.vocab_size)

    def forward(self, plan: torch.Tensor):
        plan = plan[plan[:, 0].argsort()]  # the cache returns windows in index order
        batch = self.cache.batch(plan[:, 0])
        if isinstance(self.model, TandemDraft):
            boundary = random_boundaries(plan, batch.tokens.shape[1])
            logits = self.model(batch.tokens, batch.hidden, boundary, reduced=True)
        else:
            logits = self.model(batch.tokens, reduced=True)
        return cached_distil_loss(logits, batch, self.distil_weight, self.index)


@torch.no_grad()
def own_residuals(model: LlamaForCausalLM, input_ids: torch.Tensor) -> list:
    """The residual stream entering each layer ``j`` of ``model`` -> list of ``[B, T, d]``."""
    layers = list(range(model.config.num_hidden_layers))
    _, hidden = model(input_ids, hidden_layers=layers)
    return hidden


@torch.no_grad()
def fit_projections(draft: TandemDraft, cache: PrimaryCache, num_windows: int = 32, ridge: float = 1e-3) -> list:
    """Ridge-regression init of every ``proj_j`` (weight and bias) so that
    ``proj_j(x^(l(j))) ≈ y^(j)`` on ``num_windows`` cached windows (with token-anchored projections,
    ``≈ y^(j) - embed(x)``: the embedding is added by the model). Returns the R² per layer."""
    n = min(num_windows, len(cache))
    batch = cache.batch(np.arange(n))
    ys = own_residuals(draft.secondary, batch.tokens)
    if draft.projection_embed:
        emb = draft.secondary.model.embed_tokens(batch.tokens)
        ys = [y - emb.to(y.dtype) for y in ys]
    r2 = []
    for j, proj in enumerate(draft.proj):
        x = batch.hidden[j].double().flatten(0, 1)            # [N, d_L]
        y = ys[j].double().flatten(0, 1)                      # [N, d_S]
        xm, ym = x.mean(0), y.mean(0)
        xc, yc = x - xm, y - ym
        scale = xc.pow(2).mean()
        a = xc.T @ xc + ridge * scale * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
        w = torch.linalg.solve(a, xc.T @ yc)                   # [d_L, d_S]
        proj.weight.copy_(w.T.to(proj.weight.dtype))
        if proj.bias is not None:
            proj.bias.copy_((ym - xm @ w).to(proj.bias.dtype))
        pred = xc @ w
        r2.append(float(1.0 - (yc - pred).pow(2).sum() / yc.pow(2).sum().clamp_min(1e-30)))
    return r2


def init_projections_identity(draft: TandemDraft) -> None:
    """``proj_j`` = identity, bias zero (needs ``d_S == d_L``). With the secondary's layer ``j``
    copied from primary layer ``l(j)`` and the layer map reading ``x^(l(j))`` (the input of that
    layer), the primary-derived K/V start as exactly the primary's own K/V of layer ``l(j)``."""
    with torch.no_grad():
        for j, proj in enumerate(draft.proj):
            if proj.weight.shape[0] != proj.weight.shape[1]:
                raise ValueError(f"identity projections need the secondary's width to equal the primary's, "
                                 f"got proj[{j}] of shape {tuple(proj.weight.shape)}")
            proj.weight.copy_(torch.eye(proj.weight.shape[0], dtype=proj.weight.dtype))
            if proj.bias is not None:
                proj.bias.zero_()


def init_projections_random(draft: TandemDraft, seed: int = 0) -> None:
    """``proj_j`` weight ~ normal(0, 1/sqrt(d_L)), bias zero (the importer's init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for proj in draft.proj:
            proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) / math.sqrt(proj.weight.shape[1]))
            if proj.bias is not None:
                proj.bias.zero_()
