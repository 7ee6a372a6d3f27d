"""Per-sequence sampling inside a batch: parameters and random states per row.

Every sequence carries its own :class:`~tandem_rt.engine.params.SamplingParams` and Philox key, so
one batch mixes greedy and sampled sequences of different temperatures, and a sequence's draws
depend only on its own key and the position and purpose of the draw (never on the other rows of
the batch or on ``max_batch_size``).
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

from tandem_rt.engine.paged_model import h2d

# purposes of a draw (the low bits of a per-sequence random offset; see row_rng)
RNG_SAMPLE, RNG_DRAFT, RNG_VERIFY = 0, 1, 2


def sequence_seed(seed: int, sample: int) -> int:
    """The Philox key (int64) of sample ``sample`` (0 .. n-1) of a request seeded ``seed``: a
    bijection of ``seed`` for each sample index, distinct across the samples of one request."""
    x = (seed * 0x9E3779B97F4A7C15 + (sample + 1) * 0xBF58476D1CE4E5B9) & (2 ** 64 - 1)
    return x - 2 ** 64 if x >= 2 ** 63 else x


def row_params(seqs: Sequence, device) -> tuple:
    """Per-row sampling parameters of ``seqs`` (each with ``.params``): (temperature fp32 ``[B]``,
    top_k int32 ``[B]``, top_p fp32 ``[B]``) on ``device``."""
    ps = [s.params for s in seqs]
    return (h2d([p.temperature for p in ps], torch.float32, device),
            h2d([p.top_k for p in ps], torch.int32, device),
            h2d([p.top_p for p in ps], torch.float32, device))


def row_rng(seqs: Sequence, positions: Sequence[int], kind: int, device) -> torch.Tensor:
    """Per-sequence random states int64 ``[B, 2]``: ``(sequence key, 4 * position + kind)``.
    ``kind``: RNG_SAMPLE (a token of the sequence), RNG_DRAFT (a draft token), RNG_VERIFY (the
    verify block whose first draft sits at ``position``): disjoint offsets, so a draft and the test
    that accepts it never share a uniform."""
    return h2d([[s.key, 4 * p + kind] for s, p in zip(seqs, positions)], torch.int64, device)


def all_greedy(seqs: Sequence) -> bool:
    return all(s.params.greedy for s in seqs)


@functools.lru_cache(maxsize=256)
def _greedy_rows(B: int, device) -> tuple:
    return (torch.zeros(B, dtype=torch.float32, device=device), torch.zeros(B, dtype=torch.int32, device=device),
            torch.ones(B, dtype=torch.float32, device=device), torch.zeros(B, 2, dtype=torch.int64, device=device))


def batch_rows(seqs: Sequence, positions: Sequence[int], kind: int, device) -> tuple:
    """(temperature, top_k, top_p, rng) of the sampling ops for ``seqs``: :func:`row_params` and
    :func:`row_rng`, or, when every sequence is greedy, constant tensors cached per batch size
    (greedy rows read neither their parameters beyond the temperature nor random numbers, so the
    per-step host-to-device copies are skipped; the ops advancing the cached random state is
    harmless)."""
    if all_greedy(seqs):
        return _greedy_rows(len(seqs), torch.device(device))
    return row_params(seqs, device) + (row_rng(seqs, positions, kind, device),)


def sample_rows(logits: torch.Tensor, seqs: Sequence, positions: Sequence[int], kind: int,
                want_probs: bool = False) -> tuple:
    """``logits [B, V]`` of ``seqs`` (one row each) for the tokens at ``positions`` ->
    (tokens int64 ``[B]``, probabilities fp32 ``[B, V]`` or None; one-hot rows for greedy
    sequences)."""
    dev = logits.device
    greedy = all_greedy(seqs)
    if greedy and not logits.is_cpu and not want_probs:
        return logits.argmax(-1), None
    # greedy on the CPU too: the op's argmax (lowest index on ties, as the verify op and
    # torch.argmax; processed_dist_cpu.h) is faster than torch.argmax there
    B, V = logits.shape
    probs = torch.empty(B, V, dtype=torch.float32, device=dev) if want_probs else None
    temp, top_k, top_p, rng = batch_rows(seqs, positions, kind, dev)
    # the raw op (the C++ op validates every argument; the wrapper's checks cost ~0.1 ms per call on CPU)
    tok = torch.ops.tandem_rt.sample(logits, temp, top_k, top_p, rng, probs)
    return tok.long(), probs


def sample_undrafted(logits: torch.Tensor, seqs: Sequence, positions: Sequence[int]) -> torch.Tensor:
    """The token after a verify block with no drafts (``logits [B, V]``, one row per sequence,
    the tokens at ``positions``) -> int64 ``[B]``: drawn by the verify op with zero drafts, i.e.
    with the uniform a block of zero drafts uses inside a batch whose other sequences do draft, so
    a seeded sequence draws the same token whichever batch its block falls in."""
    dev = logits.device
    if all_greedy(seqs):
        return sample_rows(logits, seqs, positions, RNG_SAMPLE)[0]
    B, V = logits.shape
    temp, top_k, top_p, rng = batch_rows(seqs, positions, RNG_VERIFY, dev)
    none = torch.empty(B, 0, dtype=torch.int64, device=dev)
    zeros = torch.zeros(B, dtype=torch.int32, device=dev)
    _, emitted = torch.ops.tandem_rt.verify(none, zeros, None, logits.view(B, 1, V), temp, top_k, top_p, rng)
    return emitted[:, 0]

