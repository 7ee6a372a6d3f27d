"""The verification step after a verify block (speculative modes), shared by the eager path and the
CUDA-graph runner (which captures it with the block's forward)."""
from __future__ import annotations

import torch


class VerifyInputs:
    """The verification that follows a verify block (``torch.ops.tandem_rt.verify`` arguments other
    than the drafts, which are the block's rows 1..G, and the target logits, which are its output).

    Attributes:
        lens: int32 ``[B]`` drafts per sequence.
        probs: float32 ``[B, G, V]`` drafter probabilities, or None (greedy drafter).
        temperature, top_k, top_p: per-row parameters ``[B]``.
        rng: int64 ``[B, 2]`` per-sequence random states (see ``Generation._row_rng``), advanced in place.
    """

    def __init__(self, lens, probs, temperature, top_k, top_p, rng):
        self.lens, self.probs, self.rng = lens, probs, rng
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p


def run_verify(drafts, logits, v: VerifyInputs, B: int, q: int):
    """``verify`` of ``drafts`` ``[B, q-1]`` against ``logits`` ``[B * q, V]`` -> (accepted, emitted)."""
    return torch.ops.tandem_rt.verify(drafts, v.lens, v.probs, logits.view(B, q, logits.shape[-1]), v.temperature,
                                      v.top_k, v.top_p, v.rng)
