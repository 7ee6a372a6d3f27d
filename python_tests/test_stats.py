"""Paired bootstrap intervals (tandem_rt.stats) against a plain-loop bootstrap and against their
coverage on simulated data with a known answer."""
import random

import numpy as np
import pytest

from tandem_rt.stats import paired_mean_difference, paired_ratio_gain


def _loop_ratio_gain(num_a, den_a, num_b, den_b, resamples, seed):
    """The same statistic with Python's own RNG and loops (an independent implementation)."""
    rng = random.Random(seed)
    n, draws = len(num_a), []
    for _ in range(resamples):
        pick = [rng.randrange(n) for _ in range(n)]
        ra = sum(num_a[i] for i in pick) / sum(den_a[i] for i in pick)
        rb = sum(num_b[i] for i in pick) / sum(den_b[i] for i in pick)
        draws.append(rb / ra - 1.0)
    draws.sort()
    return draws[int(0.025 * resamples)], draws[int(0.975 * resamples) - 1]


def _prompts(rng, n, gain):
    blocks = rng.integers(10, 30, size=n).astype(float)
    difficulty = rng.uniform(0.2, 1.2, size=n)                # shared by both models: pairing matters
    acc_a = rng.poisson(blocks * difficulty).astype(float)
    acc_b = rng.poisson(blocks * difficulty * (1 + gain)).astype(float)
    return acc_a, blocks, acc_b, blocks


def test_ratio_gain_matches_a_loop_bootstrap():
    rng = np.random.default_rng(1)
    a, da, b, db = _prompts(rng, 24, 0.1)
    got = paired_ratio_gain(a, da, b, db, resamples=4000, seed=0)
    lo, hi = _loop_ratio_gain(list(a), list(da), list(b), list(db), 4000, seed=7)
    assert got["estimate"] == pytest.approx((b.sum() / db.sum()) / (a.sum() / da.sum()) - 1, rel=1e-12)
    width = hi - lo
    assert abs(got["low"] - lo) < 0.1 * width and abs(got["high"] - hi) < 0.1 * width
    assert got["low"] < got["estimate"] < got["high"]


@pytest.mark.parametrize("gain", [0.0, 0.15])
def test_ratio_gain_interval_covers_the_true_gain(gain):
    rng = np.random.default_rng(2)
    covered, trials = 0, 200
    for t in range(trials):
        r = paired_ratio_gain(*_prompts(rng, 40, gain), resamples=400, seed=t)
        covered += r["low"] <= gain <= r["high"]
    assert 0.85 <= covered / trials <= 0.995


def test_pairing_narrows_the_interval():
    rng = np.random.default_rng(3)
    a, da, b, db = _prompts(rng, 30, 0.1)
    paired = paired_ratio_gain(a, da, b, db)
    perm = rng.permutation(30)                                 # break the pairing
    unpaired = paired_ratio_gain(a, da, b[perm], db[perm])
    assert paired["high"] - paired["low"] < unpaired["high"] - unpaired["low"]


def test_proportional_units_give_a_point_interval():
    a = np.array([3.0, 5.0, 1.0, 8.0])
    blocks = np.array([10.0, 12.0, 9.0, 20.0])
    r = paired_ratio_gain(a, blocks, 1.25 * a, blocks)
    assert r["low"] == pytest.approx(0.25) and r["high"] == pytest.approx(0.25)


def test_mean_difference_against_normal_theory():
    rng = np.random.default_rng(4)
    a = rng.normal(0.4, 0.05, size=400)
    b = a + rng.normal(0.01, 0.02, size=400)
    r = paired_mean_difference(a, b)
    d = b - a
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))             # large n: the bootstrap ≈ the t interval
    assert r["estimate"] == pytest.approx(d.mean())
    assert r["low"] == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert r["high"] == pytest.approx(d.mean() + half, abs=0.15 * half)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_a=[1, 2], den_a=[1, 1], num_b=[1], den_b=[1, 1]), "num_b has 1 units"),
    (dict(num_a=[1, float("nan")], den_a=[1, 1], num_b=[1, 1], den_b=[1, 1]), "num_a holds a non-finite"),
    (dict(num_a=[0, 0], den_a=[1, 1], num_b=[1, 1], den_b=[1, 1]), "num_a sums to 0"),
    (dict(num_a=[1, 1], den_a=[0, 0], num_b=[1, 1], den_b=[1, 1]), "den_a and den_b"),
    (dict(num_a=[1], den_a=[1], num_b=[1], den_b=[1]), "at least 2 units"),
    (dict(num_a=[[1, 1]], den_a=[[1, 1]], num_b=[[1, 1]], den_b=[[1, 1]]), "num_a must be one value per unit"),
])
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        paired_ratio_gain(**kwargs)


def test_bad_level_and_resamples():
    with pytest.raises(ValueError, match="level"):
        paired_mean_difference([1, 2, 3], [2, 3, 4], level=1.5)
    with pytest.raises(ValueError, match="resamples"):
        paired_mean_difference([1, 2, 3], [2, 3, 4], resamples=10)
