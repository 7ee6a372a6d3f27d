"""Plain-PyTorch / plain-Python references for the sampling op tests (independent of the ops)."""
from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """Philox4x32-10 (Random123) on Python ints: counter 4 x uint32, key 2 x uint32."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK32, p1 & MASK32, ((p0 >> 32) ^ c3 ^ k1) & MASK32, p0 & MASK32
        k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def philox_uniform(seed: int, offset: int, subsequence: int, index: int) -> float:
    """The documented draw: counter (index, subsequence, offset lo, offset hi), key = seed, 24 bits."""
    s, o = seed & ((1 << 64) - 1), offset & ((1 << 64) - 1)
    r = philox4x32_10((index, subsequence, o & MASK32, o >> 32), (s & MASK32, s >> 32))
    return (r[0] >> 8) / float(1 << 24)


def processed_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Processed distribution of one row (float64 [V]): temperature, then top-k, then top-p.

    Order = logit descending, lower index first on ties (stable sort); top-p keeps the shortest
    prefix of the top-k set whose renormalised cumulative probability reaches top_p.
    """
    l = logits.detach().cpu().float().double()
    V = l.numel()
    out = torch.zeros(V, dtype=torch.float64)
    if temperature == 0:
        out[int(torch.argmax(l))] = 1.0
        return out
    probs = torch.softmax(l / temperature, 0)
    order = torch.sort(l, descending=True, stable=True).indices
    K = top_k if 0 < top_k < V else V
    keep = order[:K]
    if top_p < 1:
        cum = torch.cumsum(probs[keep], 0) / probs[keep].sum()
        L = min(int((cum < top_p).sum()) + 1, K)
        keep = keep[:L]
    out[keep] = probs[keep] / probs[keep].sum()
    return out


def top_p_between(logits: torch.Tensor, temperature: float, top_k: int, keep: int) -> float:
    """A top_p that keeps exactly `keep` tokens of the top-k set, half-way between two cumulative
    probabilities (far from any rounding-sensitive boundary)."""
    l = logits.detach().cpu().float().double()
    V = l.numel()
    probs = torch.softmax(l / temperature, 0)
    order = torch.sort(l, descending=True, stable=True).indices
    K = top_k if 0 < top_k < V else V
    cum = torch.cumsum(probs[order[:K]], 0) / probs[order[:K]].sum()
    lo = 0.0 if keep == 1 else float(cum[keep - 2])
    return (lo + float(cum[keep - 1])) / 2


def tv_bound(num_outcomes: int, num_samples: int, delta: float = 1e-6) -> float:
    """Upper bound on the total-variation distance between an empirical distribution of n i.i.d.
    draws and the true distribution over m outcomes, holding with probability >= 1 - delta.

    E[TV] = 1/2 sum_x E|phat_x - p_x| <= 1/2 sum_x sqrt(p_x (1 - p_x) / n) <= 1/2 sqrt(m / n)
    (Jensen, then Cauchy-Schwarz with sum_x p_x = 1). TV is a function of n independent draws that
    changes by at most 1/n when one draw changes, so McDiarmid gives
    P(TV >= E[TV] + t) <= exp(-2 n t^2), i.e. t = sqrt(ln(1/delta) / (2 n)).
    """
    return 0.5 * math.sqrt(num_outcomes / num_samples) + math.sqrt(math.log(1.0 / delta) / (2 * num_samples))


def empirical(values: torch.Tensor, num_outcomes: int) -> torch.Tensor:
    """Empirical distribution (float64 [num_outcomes]) of integer values in [0, num_outcomes)."""
    v = values.detach().cpu().long().reshape(-1)
    assert int(v.min()) >= 0 and int(v.max()) < num_outcomes, "value outside the outcome range"
    return torch.bincount(v, minlength=num_outcomes).double() / v.numel()


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p.double().cpu() - q.double().cpu()).abs().sum())
