"""The verification step after a verify block (speculative modes), shared by the eager path and the
CUDA-graph runner (which captures it with the block's forward)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class VerifyInputs:
    """The verification that follows a verify block (``torch.ops.tandem_rt.verify`` arguments other
    than the drafts, which are the block's rows 1..G, and the target logits, which are its output).

    Attributes:
        lens: int32 ``[B]`` drafts per sequence.
        probs: float32 ``[B, G, V]`` drafter probabilities, or None (greedy drafter).
        temperature, top_k, top_p: per-row parameters ``[B]``.
        rng: int64 ``[B, 2]`` per-sequence random states (``sampler.row_rng``), advanced in place.

        layout: the row layout of the verify blocks when the forward carries other rows after them
            (prompt chunks riding in the step): a :class:`BlockLayout`; None = the forward's meta.
    """

    def __init__(self, lens, probs, temperature, top_k, top_p, rng, layout=None):
        self.lens, self.probs, self.rng = lens, probs, rng
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.layout = layout


class BlockLayout(NamedTuple):
    """Row layout of the verify blocks at the front of a forward: ``row_splits`` host offsets of the
    ``num_seqs + 1`` sequences; ``uniform_q_len`` rows per sequence when all equal, else 0."""

    num_seqs: int
    max_q_len: int
    uniform_q_len: int
    row_splits: tuple

    @classmethod
    def of(cls, rows: list) -> "BlockLayout":
        splits = [0]
        for r in rows:
            splits.append(splits[-1] + r)
        return cls(len(rows), max(rows), rows[0] if min(rows) == max(rows) else 0, tuple(splits))


def run_verify(ids: torch.Tensor, logits: torch.Tensor, meta, v: VerifyInputs):
    """``verify`` of a block whose sequence ``b`` has rows ``[tokens[n-1], drafts...]`` (``ids``
    int64 ``[T]``, ``logits [T, V]``, row layout ``meta``) -> (accepted int32 ``[B]``, emitted
    int64 ``[B, G + 1]``), ``G = meta.max_q_len - 1``. A uniform block (every sequence ``G + 1``
    rows) is viewed as ``[B, G + 1]``; a ragged one (sequence ``b`` has ``v.lens[b] + 1`` rows) is
    scattered into that layout first (rows past a sequence's drafts are zeros, never read). With
    ``v.layout`` the blocks are the first rows of ``ids`` / ``logits`` and later rows are ignored."""
    if v.layout is not None:
        meta = v.layout
        T = meta.row_splits[-1]
        ids, logits = ids[:T], logits[:T]
    B, q, V = meta.num_seqs, meta.max_q_len, logits.shape[-1]
    if meta.uniform_q_len:
        drafts = ids.view(B, q)[:, 1:].contiguous()
        block = logits.view(B, q, V)
    else:
        splits = meta.row_splits
        rows = torch.tensor([b * q + j for b in range(B) for j in range(splits[b + 1] - splits[b])],
                            dtype=torch.int64).to(ids.device)
        drafts = ids.new_zeros(B * q).index_copy_(0, rows, ids).view(B, q)[:, 1:].contiguous()
        block = logits.new_zeros(B * q, V).index_copy_(0, rows, logits).view(B, q, V)
    return torch.ops.tandem_rt.verify(drafts, v.lens, v.probs, block, v.temperature, v.top_k, v.top_p, v.rng)
