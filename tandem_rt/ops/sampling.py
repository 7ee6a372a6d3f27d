"""Token sampling and speculative verification (``torch.ops.tandem_rt.sample`` / ``verify``).

Both ops work on batches with per-row sampling parameters, draw their random numbers from a
counter-based Philox generator whose state is an int64 ``[2]`` tensor ``(seed, offset)`` on the
op's device, and advance ``offset`` in place on that device (by 1 per call), so that a captured
CUDA graph draws fresh numbers on every replay. CPU and CUDA draw identical random numbers for
the same state.

The *processed distribution* of a row of logits, used by both ops:

* ``temperature == 0``: greedy, one-hot at the argmax (lowest index on ties);
* otherwise ``p = softmax(logits / temperature)`` in fp32, restricted to the ``top_k`` most likely
  tokens (``top_k == 0``: off), then to the smallest set of most likely tokens whose cumulative
  probability (renormalised over the top-k set) reaches ``top_p`` (``top_p == 1``: off), and
  renormalised. "Most likely" orders tokens by logit, ties broken by the lower token index.

The ops validate their arguments themselves (``csrc/ops/sampling.cpp``: dtype, rank, shape,
device, contiguity, raising ``ValueError`` that names the argument); the wrappers below only check
that each argument is a tensor on the first tensor's device (the dispatcher picks the kernel from
every tensor), so a call costs the op's own work. Argument values (temperature, top_k,
top_p, draft_lens, draft token ids) are checked on CPU tensors only: checking a CUDA tensor's
values would synchronise with the host. On CUDA, ``temperature <= 0`` means greedy, out-of-range
``top_k``/``top_p`` switch the filter off, ``draft_lens`` is clamped to ``[0, G]`` and an
out-of-range draft token is rejected.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from tandem_rt._ext import _C  # noqa: F401  (registers torch.ops.tandem_rt.*)
from tandem_rt.ops._checks import check_tensors

FloatArg = Union[float, Sequence[float], torch.Tensor]
IntArg = Union[int, Sequence[int], torch.Tensor]


def _check_values(temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> None:
    bad = ~(torch.isfinite(temperature) & (temperature >= 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"temperature[{i}] = {float(temperature[i])} must be finite and >= 0")
    bad = top_k < 0
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"top_k[{i}] = {int(top_k[i])} must be >= 0")
    bad = ~((top_p > 0) & (top_p <= 1))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"top_p[{i}] = {float(top_p[i])} must be in (0, 1]")


def make_rng_state(seed: int, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """A fresh random state: int64 ``[2]`` tensor ``(seed, offset=0)`` on ``device``.

    ``seed`` is any integer in ``[-2**63, 2**63)``; the ops use its 64 bits as the Philox key.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {type(seed).__name__}")
    if not -(2 ** 63) <= seed < 2 ** 63:
        raise ValueError(f"seed must fit in int64, got {seed}")
    return torch.tensor([seed, 0], dtype=torch.int64, device=device)


def sampling_params(batch_size: int, temperature: FloatArg = 1.0, top_k: IntArg = 0, top_p: FloatArg = 1.0,
                    device: Union[str, torch.device] = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row parameter tensors for :func:`sample` / :func:`verify` from Python values.

    Each argument is a scalar (broadcast to every row), a sequence of ``batch_size`` values or a
    tensor of ``batch_size`` values. Returns ``(temperature fp32 [B], top_k int32 [B], top_p fp32 [B])``
    on ``device``. Raises ValueError for ``temperature < 0`` (or not finite), ``top_k < 0`` or
    ``top_p`` outside ``(0, 1]``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}")

    def row_tensor(value, name, dtype):
        if isinstance(value, torch.Tensor):
            t = value.detach().to(device="cpu", dtype=dtype).reshape(-1)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if dtype == torch.int32 and not float(value).is_integer():
                raise ValueError(f"{name} must be an integer, got {value!r}")
            t = torch.full((batch_size,), value, dtype=dtype)
        else:
            try:
                t = torch.tensor(list(value), dtype=dtype)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ValueError(f"{name} must be a number or a sequence of numbers, got {value!r}") from exc
        if t.numel() != batch_size:
            raise ValueError(f"{name} must have {batch_size} values (batch_size), got {t.numel()}")
        return t.contiguous()

    t = row_tensor(temperature, "temperature", torch.float32)
    k = row_tensor(top_k, "top_k", torch.int32)
    p = row_tensor(top_p, "top_p", torch.float32)
    _check_values(t, k, p)
    return t.to(device), k.to(device), p.to(device)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           rng_state: torch.Tensor, probs_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Draw one token per row from the processed distribution of ``logits``.

    Args:
        logits: ``[B, V]`` float32/float16/bfloat16, contiguous.
        temperature: float32 ``[B]``, ``>= 0`` (0: greedy argmax).
        top_k: int32 ``[B]``, ``>= 0`` (0: off).
        top_p: float32 ``[B]`` in ``(0, 1]`` (1: off).
        rng_state: int64 ``[2]`` ``(seed, offset)`` shared by the rows (row ``b`` draws Philox
            subsequence ``b``), or per row ``[B, 2]`` ``(seed_b, offset_b)`` (subsequence 0: a row's
            draws depend on its own state only, not on the other rows or its index); every
            ``offset`` is advanced in place.
        probs_out: optional float32 ``[B, V]``; receives the exact distribution each row was
            sampled from (one-hot for greedy rows), e.g. the drafter's ``q`` for :func:`verify`.

    Returns:
        int64 ``[B]`` token ids. All tensors must be on ``logits``' device.
    """
    check_tensors(logits=logits, temperature=temperature, top_k=top_k, top_p=top_p, rng_state=rng_state,
                  probs_out=probs_out)
    return torch.ops.tandem_rt.sample(logits, temperature, top_k, top_p, rng_state, probs_out)


def verify(draft_tokens: torch.Tensor, draft_lens: torch.Tensor, draft_probs: Optional[torch.Tensor],
           target_logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           rng_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative verification of a batch of drafts (ragged lengths) in one launch.

    Rows with ``temperature == 0`` are greedy: the longest prefix of drafts equal to the target's
    argmax is accepted, then the target's argmax at the first mismatch (or at the bonus position)
    is emitted. Other rows use rejection sampling against the target's processed distribution
    ``p_i``: draft ``x_i`` is accepted with probability ``min(1, p_i(x_i) / q_i(x_i))``; at the first
    rejection a token is drawn from ``normalise(max(0, p_i - q_i))`` (from ``p_i`` if that has no
    mass); if every draft is accepted a bonus token is drawn from ``p_len``. The emitted tokens
    are then distributed exactly as sampling from the target.

    Args:
        draft_tokens: int64 ``[B, G]``; entries past ``draft_lens[b]`` are ignored.
        draft_lens: int32 ``[B]``, each in ``[0, G]``.
        draft_probs: float32 ``[B, G, V]`` (the drafter's ``q``, e.g. ``probs_out`` of
            :func:`sample`), or None for a greedy drafter (``q`` one-hot at the draft token).
        target_logits: ``[B, G + 1, V]`` float32/float16/bfloat16, the target's logits at every
            draft position plus the bonus position.
        temperature, top_k, top_p: per-row parameters as in :func:`sample`, applied to the target.
        rng_state: int64 ``[2]`` or per row ``[B, 2]``, as in :func:`sample`; advanced in place.

    Returns:
        ``(accepted, emitted)``: int32 ``[B]`` number of accepted drafts, and int64 ``[B, G + 1]``
        holding the accepted drafts followed by one correction/bonus token, padded with -1.
    """
    check_tensors(target_logits=target_logits, draft_tokens=draft_tokens, draft_lens=draft_lens,
                  draft_probs=draft_probs, temperature=temperature, top_k=top_k, top_p=top_p, rng_state=rng_state)
    return torch.ops.tandem_rt.verify(draft_tokens, draft_lens, draft_probs, target_logits, temperature, top_k,
                                      top_p, rng_state)


def rng_uniform(rng_state: torch.Tensor, num_subsequences: int, num_draws: int) -> torch.Tensor:
    """The uniform numbers the ops draw from ``rng_state`` (diagnostics and tests).

    Returns float32 ``[num_subsequences, num_draws]`` with ``out[s, d]`` = Philox draw ``d`` of
    subsequence ``s`` (the ops use subsequence = batch row) at the state's current offset.
    ``rng_state`` (int64 ``[2]``) is not advanced.
    """
    check_tensors(rng_state=rng_state)
    for name, n in (("num_subsequences", num_subsequences), ("num_draws", num_draws)):
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 2 ** 32:
            raise ValueError(f"{name} must be an int in [0, 2**32], got {n!r}")
    return torch.ops.tandem_rt.rng_uniform(rng_state, num_subsequences, num_draws)


__all__ = ["make_rng_state", "sampling_params", "sample", "verify", "rng_uniform"]
