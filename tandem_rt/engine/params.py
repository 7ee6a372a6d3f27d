"""Sampling parameters of one ``Engine.generate`` / ``Engine.stream`` call."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


# below MIN_TEMPERATURE, logits / temperature overflow float32 for ordinary logit gaps (use 0 for
# greedy); above MAX_TEMPERATURE every distribution is uniform to float32 precision
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 1e4

# drafted tokens per block when a request names none: the fastest fixed γ of the default model's
# lossless modes on the CPU (docs/RESULTS.md "CPU end to end": γ = 3 ahead of 5 and 7 in bf16 and fp32)
DEFAULT_GAMMA = 3


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; validated on construction (``ValueError`` naming the field).

    Args:
        max_new_tokens: generated tokens per sequence at most (>= 1).
        temperature: 0 = greedy (argmax); in [1e-3, 1e4] samples from ``softmax(logits / temperature)``.
        top_k: keep the ``top_k`` most probable tokens (0 = all).
        top_p: nucleus sampling, keep the smallest set with mass >= ``top_p`` (1.0 = all).
        seed: the request's seed (``None``: a fresh random seed per call). Each sample's draws are keyed
            by (seed, sample index, position), so the same seed gives the same tokens whatever else
            shares the batch and whatever ``max_batch_size`` is.
        stop_token_ids: generation of a sequence stops after emitting one of these ids (the id is
            included in the result). The model's ``eos_token_id`` is a stop id too unless
            ``ignore_eos``.
        n: samples per prompt (num-samples): the prompt is processed once and its cache forked.
        ignore_eos: do not stop at the model's ``eos_token_id`` (benchmarks of fixed length).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: tuple = field(default=())
    n: int = 1
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                             f"got {self.temperature!r}")
        if not _is_int(self.top_k) or not 0 <= self.top_k < 2 ** 31:
            raise ValueError(f"top_k must be an integer in [0, 2**31) (0 disables it), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2 ** 63):
            raise ValueError(f"seed must be None or an integer in [0, 2**63), got {self.seed!r}")
        try:
            stops = tuple(self.stop_token_ids)
        except TypeError:
            raise ValueError(f"stop_token_ids must be a sequence of token ids, got {self.stop_token_ids!r}") from None
        for t in stops:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must hold non-negative integers, got {t!r}")
        object.__setattr__(self, "stop_token_ids", stops)
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be a positive integer, got {self.n!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
