"""Sampling ``speed`` / ``tandem-speed`` (and ``primary``) reproduce the primary's distribution:
the empirical joint distribution of generated tokens 2 and 3 (the first ones that speculative
blocks produce; token 1 comes from the prompt's forward) matches the exact one computed from the
reference primary. TV bound: E[TV] <= 0.5 * sum_i sqrt(p_i (1 - p_i) / N) plus a McDiarmid
deviation sqrt(ln(1/delta) / (2N)) with delta = 1e-6."""
from __future__ import annotations

import math

import pytest
import torch

from engine_models import agreeing_tandem_model
from tandem_rt.engine import Engine, SamplingParams

V = 16
PROMPT = [3, 7, 1, 12, 5]
N = 2500


def processed(logits, temperature, top_k, top_p):
    """Reference processed distribution: softmax(logits / T), then top-k, then top-p (smallest
    prefix of the sorted distribution whose mass reaches top_p), renormalised. logits [..., V]."""
    p = torch.softmax(logits.double() / temperature, -1)
    if top_k:
        kth = p.topk(top_k, -1).values[..., -1:]
        p = torch.where(p >= kth, p, torch.zeros_like(p))
        p = p / p.sum(-1, keepdim=True)
    if top_p < 1.0:
        sp, si = p.sort(-1, descending=True)
        keep_sorted = (sp.cumsum(-1) - sp) < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, si, keep_sorted)
        p = torch.where(keep, p, torch.zeros_like(p))
        p = p / p.sum(-1, keepdim=True)
    return p


@torch.no_grad()
def exact_t2_t3(model, params):
    """Exact P(t2, t3) of the primary sampling chain after PROMPT, marginalising t1: [V, V]."""
    f = lambda ids: processed(model.primary(ids)[:, -1], params.temperature, params.top_k, params.top_p)  # noqa: E731
    base = torch.tensor([PROMPT])
    p1 = f(base)[0]                                                         # [V]
    ids1 = torch.cat([base.expand(V, -1), torch.arange(V)[:, None]], 1)    # [V, P+1]
    p2 = f(ids1)                                                            # [V(t1), V(t2)]
    ids2 = torch.cat([ids1.repeat_interleave(V, 0), torch.arange(V).repeat(V)[:, None]], 1)
    p3 = f(ids2).view(V, V, V)                                              # [t1, t2, t3]
    return (p1[:, None, None] * p2[:, :, None] * p3).sum(0)                # [t2, t3]


def tv_bound(p, n):
    p = p.flatten()
    mean = 0.5 * torch.sqrt(p * (1 - p) / n).sum().item()
    return mean + math.sqrt(math.log(1e6) / (2 * n))


@pytest.fixture(scope="module")
def setup():
    model = agreeing_tandem_model(seed=7, vocab_size=V, layer_scale=0.5)
    engine = Engine(model, num_pages=1200, page_size=8, max_batch_size=1024)
    return model, engine


@pytest.mark.parametrize("cfg", [dict(temperature=1.5), dict(temperature=1.2, top_k=4),
                                 dict(temperature=1.5, top_p=0.7)], ids=["temp", "top_k", "top_p"])
def test_sampled_distribution_matches_primary(setup, cfg):
    model, engine = setup
    exact = None
    runs = [("speed", 2, 4), ("tandem-speed", 3, 3), ("tandem-speed", 2, 4)]
    if "top_k" not in cfg and "top_p" not in cfg:
        runs = [("primary", 1, 3), ("speed", 3, 3)] + runs
    for i, (mode, gamma, max_new) in enumerate(runs):
        params = SamplingParams(max_new_tokens=max_new, n=N, seed=100 + i, ignore_eos=True, **cfg)
        if exact is None:
            exact = exact_t2_t3(model, params)
        out = engine.generate([PROMPT], params, mode=mode, gamma=gamma)
        assert len(out) == N
        counts = torch.zeros(V, V, dtype=torch.float64)
        for o in out:
            counts[o.token_ids[1], o.token_ids[2]] += 1
        tv = 0.5 * (counts / N - exact).abs().sum().item()
        bound = tv_bound(exact, N)
        assert tv < bound, f"{mode} γ={gamma}: TV {tv:.4f} >= bound {bound:.4f}"
        if mode != "primary":
            acc = sum(o.stats["accepted_tokens"] for o in out)
            drafted = sum(o.stats["drafted_tokens"] for o in out)
            assert acc > 0
            if "top_p" not in cfg:              # (top_p=0.7 often leaves a single token: all accepted)
                assert acc < drafted            # rejections were exercised too
    assert engine.num_free_pages == engine.page_manager.num_pages
