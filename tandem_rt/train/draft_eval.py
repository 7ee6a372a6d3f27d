"""Held-out evaluation of drafters against a live primary: the paper's Table 1 columns and the
greedy accepted drafts per block, teacher-forced with the drafting masks the engine uses.

For each held-out window the primary runs once (logits and the layer-map residual streams);
every small model is then evaluated on the same positions:

* ``accuracy`` / ``cross_entropy`` against the next ground-truth token (with a reduced draft
  vocabulary the cross-entropy covers the targets inside it, ``target_coverage`` of them),
  ``relative_accuracy``
  (argmax equals the primary's argmax) and ``relative_tv`` (total-variation distance between
  the two next-token distributions), with the drafting mask of block length ``table_gamma``;
* ``relative_accuracy_by_offset``: the relative accuracy at each offset ``0..table_gamma-1``
  of a drafting block (offset 0 reads primary-derived K/V up to the position just before it);
* ``accepted_g{γ}``: blocks start at every multiple of γ; the accepted drafts of a block are
  the leading positions whose argmax equals the primary's (greedy SPEED), mean over blocks;
* ``per_window``: the same sums per held-out window, the units of :func:`paired_comparison`'s
  bootstrap intervals (two models evaluated on the same windows are paired).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from tandem_rt.stats import paired_mean_difference, paired_ratio_gain
from tandem_rt.train.draft_training import TandemDraft, drafting_boundary
from tandem_rt.train.router import tv_distance


def _logits(model, ids, hidden, gamma, layer_map):
    if isinstance(model, TandemDraft):
        own = getattr(model, "layer_map", None)  # a model with its own layer map reads a subset
        if own is not None:
            hidden = [hidden[layer_map.index(l)] for l in own]
        b = drafting_boundary(ids.shape[1], gamma).expand(ids.shape[0], -1)
        return model(ids, hidden, b).float()
    return model(ids).float()


def accepted_per_block(agree: torch.Tensor, gamma: int) -> torch.Tensor:
    """``agree`` bool ``[B, T]`` (draft at position i agrees with the primary) -> accepted drafts
    per block float ``[B, n_blocks]`` for blocks ``[q0, q0 + γ)``, ``q0 = γ, 2γ, ...``."""
    B, T = agree.shape
    starts = list(range(gamma, T - gamma, gamma))
    if not starts:
        raise ValueError(f"windows of {T} tokens hold no full block of {gamma} drafts")
    blocks = torch.stack([agree[:, q:q + gamma] for q in starts], dim=1).long()  # [B, n, γ]
    return blocks.cumprod(-1).sum(-1).float()


def offset_agreement(agree: torch.Tensor, gamma: int) -> torch.Tensor:
    """``agree`` bool ``[B, T]`` -> float64 ``[2, γ]``: per block offset ``k = i - q0`` (blocks start at
    ``q0 = γ, 2γ, ...``; the first block, with no primary-derived K/V, is left out) the number of
    positions whose draft agrees with the primary (row 0) and of positions (row 1)."""
    B, T = agree.shape
    i = torch.arange(gamma, T)
    k = i % gamma
    out = torch.zeros(2, gamma, dtype=torch.float64)
    out[0].index_add_(0, k, agree[:, gamma:].sum(0).double())
    out[1].index_add_(0, k, torch.full((len(i),), float(B), dtype=torch.float64))
    return out


@torch.no_grad()
def evaluate_drafts(primary, windows: np.ndarray, models: dict, layer_map: list, gammas=(3, 5, 7),
                    table_gamma: int = 5, batch_size: int = 8, autocast: bool = False,
                    progress: bool = False) -> dict:
    """Evaluate ``models`` (``{name: TandemDraft | LlamaForCausalLM}``) and the primary itself.

    Args:
        primary: the primary ``LlamaForCausalLM``.
        windows: int ``[W, T]`` held-out token windows.
        layer_map: the primary layers computed for the Tandem secondaries; a secondary with a
            ``layer_map`` attribute of its own reads those entries of it.
    Returns:
        ``{name: {accuracy, cross_entropy, relative_accuracy, relative_tv, accepted_g{γ}..., positions,
        per_window}}`` plus ``"primary"`` with its own accuracy and cross-entropy. ``per_window`` holds
        lists of length ``W``: ``positions``, ``agree`` (argmax equal to the primary's) and ``tv`` (summed
        total variation) at ``table_gamma``, ``blocks_g{γ}`` and ``accepted_g{γ}`` (summed accepted drafts).
    """
    from tqdm import tqdm

    from tandem_rt.train.evaluate import _Acc  # the Table 1 accumulator shared with evaluate_models

    table = {name: _Acc() for name in ["primary", *models]}
    blocks = {name: {g: [] for g in gammas} for name in models}
    per_window = {name: {"positions": [], "agree": [], "tv": []} for name in models}
    by_offset = {name: torch.zeros(2, table_gamma, dtype=torch.float64) for name in models}
    for s in tqdm(range(0, len(windows), batch_size), desc="evaluate", disable=not progress):
        ids = torch.from_numpy(np.asarray(windows[s:s + batch_size], dtype=np.int64))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            p_logits, hidden = primary(ids, hidden_layers=list(layer_map))
        p_logits = p_logits.float()
        tgt, p_arg = ids[:, 1:], p_logits.argmax(-1)
        table["primary"].add(p_logits[:, :-1], tgt, p_logits[:, :-1], p_arg[:, :-1])
        for name, model in models.items():
            for g in sorted(set(gammas) | {table_gamma}):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    lg = _logits(model, ids, hidden, g, list(layer_map))
                if g in gammas:
                    blocks[name][g].append(accepted_per_block(lg.argmax(-1) == p_arg, g))
                if g == table_gamma:
                    tv = tv_distance(lg[:, :-1], p_logits[:, :-1])  # [B, T-1]
                    table[name].add(lg[:, :-1], tgt, p_logits[:, :-1], p_arg[:, :-1], tv=tv)
                    by_offset[name] += offset_agreement(lg.argmax(-1) == p_arg, g)
                    w = per_window[name]
                    w["positions"] += [tgt.shape[1]] * tgt.shape[0]
                    w["agree"] += (lg[:, :-1].argmax(-1) == p_arg[:, :-1]).sum(1).tolist()
                    w["tv"] += tv.sum(1).tolist()
    out = {"primary": table["primary"].result()}
    for name in models:
        agree, count = by_offset[name]
        acc = {g: torch.cat(blocks[name][g]) for g in gammas}  # [W, n_blocks]
        for g in gammas:
            per_window[name][f"blocks_g{g}"] = [acc[g].shape[1]] * acc[g].shape[0]
            per_window[name][f"accepted_g{g}"] = acc[g].sum(1).tolist()
        out[name] = {**table[name].result(), "table_gamma": table_gamma,
                     "relative_accuracy_by_offset": (agree / count.clamp_min(1)).tolist(),
                     **{f"accepted_g{g}": float(acc[g].mean()) for g in gammas},
                     "per_window": per_window[name]}
    return out


def paired_comparison(results: dict, base: str, other: str, resamples: int = 4000) -> dict:
    """How ``other`` differs from ``base`` in :func:`evaluate_drafts` ``results``, each with a 95%
    paired bootstrap interval over the held-out windows (tandem_rt.stats).

    Returns:
        ``{"relative_accuracy_points": ..., "relative_tv_change": ..., "accepted_g{γ}_gain": ...}``, each
        ``{"estimate", "low", "high", ...}``: the difference in percentage points of relative accuracy,
        the relative change of relative TV and of accepted drafts per block (fractions: −0.03 = −3%);
        ``None`` where ``base``'s figure is 0 (a relative change from 0 is undefined).
    """
    a, b = results[base]["per_window"], results[other]["per_window"]
    rate = lambda w: np.asarray(w["agree"], dtype=np.float64) / np.asarray(w["positions"])  # noqa: E731

    def change(num: str, den: str):
        return paired_ratio_gain(a[num], a[den], b[num], b[den], resamples) if sum(a[num]) > 0 else None

    out = {"relative_accuracy_points": paired_mean_difference(100 * rate(a), 100 * rate(b), resamples),
           "relative_tv_change": change("tv", "positions")}
    for key in sorted(k for k in a if k.startswith("accepted_g")):
        out[f"{key}_gain"] = change(key, f"blocks_g{key[len('accepted_g'):]}")
    return out


def format_comparison(comparison: dict) -> str:
    """One line per statistic of :func:`paired_comparison`: estimate and 95% interval."""
    lines = []
    for key, r in comparison.items():
        if r is None:
            lines.append(f"  {key}: undefined (the base's figure is 0)")
            continue
        scale, unit = (1.0, " points") if key.endswith("points") else (100.0, "%")
        lines.append(f"  {key}: {scale * r['estimate']:+.2f}{unit} "
                     f"[{scale * r['low']:+.2f}, {scale * r['high']:+.2f}]")
    return "\n".join(lines)


def format_eval_table(results: dict, order: Optional[list] = None) -> str:
    """Markdown table of :func:`evaluate_drafts` results."""
    names = order or [n for n in results if n != "primary" and not n.startswith("_")]
    gammas = sorted(int(k[len("accepted_g"):]) for k in results[names[0]] if k.startswith("accepted_g")) if names else []
    head = "| model | accuracy % | CE | rel. accuracy % | rel. TV | " + " | ".join(f"accepted/block γ={g}" for g in gammas) + " |"
    lines = [head, "|" + "---|" * (5 + len(gammas))]
    for n in names:
        r = results[n]
        lines.append(f"| {n} | {100 * r['accuracy']:.2f} | {r['cross_entropy']:.3f} | {100 * r['relative_accuracy']:.2f} | "
                     f"{r['relative_tv']:.3f} | " + " | ".join(f"{r[f'accepted_g{g}']:.3f}" for g in gammas) + " |")
    p = results["primary"]
    lines.append(f"| primary | {100 * p['accuracy']:.2f} | {p['cross_entropy']:.3f} | 100 | 0 | " + " | ".join("—" for _ in gammas) + " |")
    return "\n".join(lines)
