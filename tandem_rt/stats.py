"""Sampling error of the comparisons the measuring tools report.

Both comparisons of a Tandem secondary with its drafter are *paired*: the two models draft on the
same units (prompts through the engine, held-out windows teacher-forced), so the per-unit
difference carries the comparison and most of the unit-to-unit variation cancels. A paired
percentile bootstrap resamples units with replacement and recomputes the statistic on each
resample; the 2.5th / 97.5th percentiles bound a 95% interval.

* :func:`paired_ratio_gain`: gain of a ratio of sums, ``(Σ num_b / Σ den_b) / (Σ num_a / Σ den_a) − 1``
  (accepted drafts per block: numerator accepted drafts, denominator blocks of each unit).
* :func:`paired_mean_difference`: difference of means, ``mean(b) − mean(a)`` (a per-unit rate such as
  relative accuracy in a window).
"""
from __future__ import annotations

import numpy as np

__all__ = ["paired_ratio_gain", "paired_mean_difference"]


def _units(name: str, values, n: int | None = None) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one value per unit (1-D), got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} units, expected {n} (the units are paired)")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds a non-finite value")
    return arr


def _resamples(n: int, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, n]`` int64 indices of units drawn with replacement."""
    if n < 2:
        raise ValueError(f"a bootstrap needs at least 2 units, got {n}")
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(estimate: float, draws: np.ndarray, level: float) -> dict:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return {"estimate": float(estimate), "low": float(lo), "high": float(hi), "level": level,
            "resamples": int(draws.shape[0])}


def paired_ratio_gain(num_a, den_a, num_b, den_b, resamples: int = 4000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Relative gain of B's ratio of sums over A's, with a paired bootstrap interval.

    Args:
        num_a, den_a, num_b, den_b: float ``[n]`` per-unit numerators and denominators (e.g. accepted
            drafts and blocks of each prompt) of the two models on the same ``n`` units.
        resamples: bootstrap resamples (>= 100).
        seed: seed of the resampling (the interval is reproducible).
        level: coverage of the interval.
    Returns:
        ``{"estimate", "low", "high", "level", "resamples"}``: the gain on all units and the interval
        (fractions: 0.05 = +5%).
    """
    num_a = _units("num_a", num_a)
    n = num_a.shape[0]
    den_a, num_b, den_b = (_units(k, v, n) for k, v in (("den_a", den_a), ("num_b", num_b), ("den_b", den_b)))
    if (den_a < 0).any() or (den_b < 0).any() or den_a.sum() <= 0 or den_b.sum() <= 0:
        raise ValueError("den_a and den_b must be non-negative with a positive sum")
    if num_a.sum() <= 0:
        raise ValueError("num_a sums to 0: the gain over it is undefined")
    idx = _resamples(n, resamples, seed)
    sa, sda, sb, sdb = (v[idx].sum(1) for v in (num_a, den_a, num_b, den_b))
    with np.errstate(divide="ignore", invalid="ignore"):
        draws = (sb / sdb) / (sa / sda) - 1.0
    draws = draws[np.isfinite(draws)]  # resamples whose A numerator is 0
    estimate = (num_b.sum() / den_b.sum()) / (num_a.sum() / den_a.sum()) - 1.0
    return _interval(estimate, draws, level)


def paired_mean_difference(a, b, resamples: int = 4000, seed: int = 0, level: float = 0.95) -> dict:
    """``mean(b) − mean(a)`` over paired units, with a paired bootstrap interval.

    Args:
        a, b: float ``[n]`` per-unit values of the two models on the same ``n`` units.
    Returns:
        ``{"estimate", "low", "high", "level", "resamples"}`` in the units of ``a`` and ``b``.
    """
    a = _units("a", a)
    b = _units("b", b, a.shape[0])
    d = b - a
    draws = d[_resamples(d.shape[0], resamples, seed)].mean(1)
    return _interval(d.mean(), draws, level)
