"""Table 1 metrics (paper): next-token accuracy and cross-entropy against the ground truth,
relative accuracy (argmax agrees with the primary's argmax) and relative total-variation
distance to the primary's next-token distribution.

Tandem secondaries are evaluated with the γ-block forward of Eq. (2) (``block_length``, 2 as
in training) on the hidden states of the shared primary; standalone models causally. All
models see the same non-overlapping windows; positions ``0..T-2`` of each window predict the
next token.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tandem_rt.models.llama import LlamaForCausalLM
from tandem_rt.models.tandem import TandemModel, training_boundary
from tandem_rt.train.data import sequential_windows
from tandem_rt.train.router import tv_distance

METRICS = ("accuracy", "cross_entropy", "relative_accuracy", "relative_tv")


class _Acc:
    def __init__(self):
        self.n = 0
        self.correct = 0
        self.ce = 0.0
        self.agree = 0
        self.tv = 0.0
        self.covered = 0

    def add(self, logits, targets, primary_logits, primary_argmax, tv=None):
        """``tv``: the per-position TV distance to the primary where the caller has it already."""
        logits = logits.float()
        self.n += targets.numel()
        self.correct += int((logits.argmax(-1) == targets).sum())
        ce = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none")
        finite = torch.isfinite(ce)  # a reduced draft vocabulary gives other targets probability 0
        self.ce += float(ce[finite].sum())
        self.covered += int(finite.sum())
        self.agree += int((logits.argmax(-1) == primary_argmax).sum())
        self.tv += float((tv_distance(logits, primary_logits) if tv is None else tv).sum())

    def result(self) -> dict:
        n = max(self.n, 1)
        return {"accuracy": self.correct / n, "cross_entropy": self.ce / max(self.covered, 1),
                "relative_accuracy": self.agree / n, "relative_tv": self.tv / n, "positions": self.n,
                "target_coverage": self.covered / n}


@torch.no_grad()
def evaluate_models(primary: LlamaForCausalLM, tokens: np.ndarray, standalone: Optional[dict] = None,
                    tandems: Optional[dict] = None, seq_len: int = 256, batch_size: int = 8,
                    max_tokens: Optional[int] = None, block_length: int = 2, progress: bool = True,
                    boundary: str = "training") -> dict:
    """Evaluate the primary and several small models on ``tokens``.

    Args:
        primary: the primary ``LlamaForCausalLM``.
        tokens: 1-D token ids (e.g. the test memmap), windows of ``seq_len``.
        standalone: ``{name: LlamaForCausalLM}`` small models evaluated causally.
        tandems: ``{name: TandemModel}``; each one's secondary and projections run on the hidden
            states of ``primary`` (its own ``.primary`` is not used; its layer map is).
        max_tokens: evaluate at most this many tokens.
        block_length: γ of the block forward for the Tandem secondaries.
        boundary: the Tandem secondaries' attention boundaries (docs/DESIGN.md §2.3): "training"
            (:func:`training_boundary`: block ends read the primary's own position) or "drafting"
            (:func:`drafting_boundary`, phase 0: 1..γ own positions per query, as the engine drafts);
            use the one the checkpoint was trained with (``TandemConfig.train_boundary``).
    Returns:
        ``{name: {accuracy, cross_entropy, relative_accuracy, relative_tv, positions}}`` with
        ``"primary"`` included (its relative metrics are 1 and 0 by definition), plus
        ``"_meta": {tokens, seq_len, block_length, boundary, wall_s}``.
    """
    standalone = standalone or {}
    tandems = tandems or {}
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if not isinstance(block_length, int) or block_length < 1:
        raise ValueError(f"block_length must be a positive integer, got {block_length!r}")
    layer_maps = {tuple(t.layer_map) for t in tandems.values()}
    layers = sorted({l for lm in layer_maps for l in lm})
    acc = {"primary": _Acc(), **{n: _Acc() for n in standalone}, **{n: _Acc() for n in tandems}}
    t0 = time.time()
    windows = list(sequential_windows(tokens, seq_len, max_tokens))
    if not windows:
        raise ValueError(f"tokens: fewer than seq_len={seq_len} tokens to evaluate")
    if boundary == "training":
        bounds = training_boundary(seq_len, block_length)
    elif boundary == "drafting":
        from tandem_rt.train.draft_training import drafting_boundary

        bounds = drafting_boundary(seq_len, block_length)
    else:
        raise ValueError(f"boundary must be 'training' or 'drafting', got {boundary!r}")
    for s in tqdm(range(0, len(windows), batch_size), desc="eval", disable=not progress, mininterval=2.0):
        ids = torch.stack(windows[s:s + batch_size])
        targets = ids[:, 1:]
        if layers:
            p_logits, hidden = primary(ids, hidden_layers=layers)
            by_layer = dict(zip(layers, hidden))
        else:
            p_logits = primary(ids)
        p_logits = p_logits.float()
        p_cut = p_logits[:, :-1]
        p_arg = p_cut.argmax(-1)
        acc["primary"].add(p_cut, targets, p_cut, p_arg)
        for name, model in standalone.items():
            acc[name].add(model(ids)[:, :-1], targets, p_cut, p_arg)
        for name, tandem in tandems.items():
            logits = tandem.secondary_forward(ids, [by_layer[l] for l in tandem.layer_map], bounds)
            acc[name].add(logits[:, :-1], targets, p_cut, p_arg)
    out = {name: a.result() for name, a in acc.items()}
    out["_meta"] = {"tokens": len(windows) * seq_len, "seq_len": seq_len, "block_length": block_length,
                    "boundary": boundary,
                    "wall_s": time.time() - t0}
    return out


def format_table(results: dict, order: Optional[list] = None) -> str:
    """Markdown table of ``evaluate_models`` results."""
    names = order or [n for n in results if not n.startswith("_")]
    lines = ["| model | accuracy | cross-entropy | relative accuracy | relative TV |", "|---|---|---|---|---|"]
    for n in names:
        r = results[n]
        lines.append(f"| {n} | {100 * r['accuracy']:.2f}% | {r['cross_entropy']:.3f} | "
                     f"{100 * r['relative_accuracy']:.2f}% | {r['relative_tv']:.3f} |")
    return "\n".join(lines)


@torch.no_grad()
def greedy_generate(model: LlamaForCausalLM, prompt: list, max_new_tokens: int, eos_id: Optional[int] = None) -> list:
    """Greedy continuation with the plain reference forward (no cache): ids list -> new ids list."""
    ids = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(nxt)
        out.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
    return out


@torch.no_grad()
def speculative_greedy(primary: LlamaForCausalLM, prompt: list, max_new_tokens: int, gamma: int,
                       drafter: Optional[LlamaForCausalLM] = None, tandem: Optional[TandemModel] = None) -> dict:
    """Greedy speculative decoding with the reference models (no KV cache; exact, lossless).

    Exactly one of ``drafter`` (standalone, SPEED baseline) or ``tandem`` (its secondary drafts
    with primary-derived K/V for every token the primary has processed, i.e. all committed
    tokens but the last, and its own K/V for the rest — the runtime's schedule) is given.
    Each block: ``gamma`` greedy drafts, one primary pass over ``[context, drafts]``, accept the
    longest agreeing prefix, then the primary's own next token.
    Returns ``{"tokens": new ids, "accepted": [accepted drafts per block], "blocks": n}``; the
    tokens equal ``greedy_generate(primary, ...)``.
    """
    if (drafter is None) == (tandem is None):
        raise ValueError("give exactly one of drafter or tandem")
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    ids = list(prompt)
    accepted = []
    n0 = len(ids)
    while len(ids) - n0 < max_new_tokens:
        drafts = []
        if tandem is not None:
            committed = len(ids) - 1                      # tokens the primary has processed
            _, hidden = primary(torch.tensor([ids[:committed]]), hidden_layers=tandem.layer_map) if committed else (None, None)
        for _ in range(gamma):
            seq = torch.tensor([ids + drafts])
            if drafter is not None:
                logits = drafter(seq)
            else:
                T = seq.shape[1]
                hid = [torch.cat([h, h.new_zeros(1, T - committed, h.shape[-1])], 1) for h in hidden] if committed \
                    else [torch.zeros(1, T, tandem.config.primary.hidden_size) for _ in tandem.layer_map]
                boundary = torch.clamp(torch.arange(T) + 1, max=committed)
                logits = tandem.secondary_forward(seq, hid, boundary)
            drafts.append(int(logits[0, -1].argmax()))
        p = primary(torch.tensor([ids + drafts]))[0, len(ids) - 1:].argmax(-1).tolist()   # gamma + 1 predictions
        a = 0
        while a < gamma and drafts[a] == p[a]:
            a += 1
        accepted.append(a)
        ids += drafts[:a] + [p[a]]
    new = ids[n0:n0 + max_new_tokens]
    return {"tokens": new, "accepted": accepted, "blocks": len(accepted)}
