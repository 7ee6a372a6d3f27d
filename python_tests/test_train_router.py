"""Router training data (features, TV labels), loss and the threshold proxy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_tandem_model
from tandem_rt.config import RouterConfig
from tandem_rt.models.router import Router
from tandem_rt.train.router import router_batch, router_loss, simulate_threshold, train_router, tv_distance
from tandem_rt.train.tandem import freeze


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_features_and_tv_labels_match_independent_computation():
    tandem = random_tandem_model(seed=4)
    freeze(tandem.primary)
    ids = torch.randint(0, 97, (2, 6))
    k = 3
    feats, tv, agree = router_batch(tandem, ids, top_k=k, block_length=2)
    d = tandem.config.secondary.hidden_size
    assert feats.shape == (12, 1 + k + k * d) and feats.dtype == torch.float32
    assert tv.shape == (12,) and agree.shape == (12,)
    with torch.no_grad():
        out = tandem(ids, block_length=2)
    s = out.secondary_logits.double().numpy().reshape(12, -1)
    p = out.primary_logits.double().numpy().reshape(12, -1)
    emb = tandem.secondary.model.embed_tokens.weight.detach().double().numpy()
    for n in range(12):
        ps = np.exp(s[n] - s[n].max()); ps /= ps.sum()
        pp = np.exp(p[n] - p[n].max()); pp /= pp.sum()
        assert tv[n].item() == pytest.approx(0.5 * np.abs(ps - pp).sum(), abs=1e-5)
        assert feats[n, 0].item() == pytest.approx(-(ps * np.log(ps)).sum(), abs=1e-4)
        order = np.argsort(-ps)[:k]
        np.testing.assert_allclose(feats[n, 1:1 + k].numpy(), ps[order], atol=1e-5)
        np.testing.assert_allclose(feats[n, 1 + k:].numpy(), emb[order].reshape(-1), atol=1e-5)
        assert bool(agree[n]) == (s[n].argmax() == p[n].argmax())


def test_tv_distance_validates_and_bounds():
    a, b = torch.randn(5, 11), torch.randn(5, 11)
    tv = tv_distance(a, b)
    assert ((tv >= 0) & (tv <= 1)).all()
    assert torch.allclose(tv_distance(a, a), torch.zeros(5), atol=1e-6)
    with pytest.raises(ValueError, match="logits_a"):
        tv_distance(a, b[:, :3])


def test_router_learns_soft_labels():
    torch.manual_seed(0)
    cfg = RouterConfig(embed_dim=4, top_k=2, hidden_size=16)
    router = Router(cfg)
    x = torch.randn(2048, cfg.num_features)
    target = torch.sigmoid(2.0 * x[:, 0] - x[:, 1])        # a learnable soft label
    before = router_loss(router, x, target).item()
    train_router(router, x, target, steps=300, batch_size=256, lr=1e-2)
    after = router_loss(router, x, target).item()
    floor = torch.nn.functional.binary_cross_entropy(target, target).item()
    assert after < before and after - floor < 0.3 * (before - floor)


def _brute(pred, agree, thr, cost, G):
    toks, drafts = [], []
    for n in range(pred.shape[0]):
        d = 1
        while d < G and pred[n, d - 1] >= thr:
            d += 1
        a = 0
        while a < d and agree[n, a]:
            a += 1
        toks.append(a + 1)
        drafts.append(d)
    t, dd = np.mean(toks), np.mean(drafts)
    return t, dd, t / (dd * cost + 1)


def test_simulate_threshold_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(50, 6, generator=g)
    agree = torch.rand(50, 6, generator=g) < 0.7
    for thr in (0.0, 0.3, 0.6, 1.01):
        r = simulate_threshold(pred, agree, thr, 0.25, 5)
        t, d, tpc = _brute(pred.numpy(), agree.numpy(), thr, 0.25, 5)
        assert r.tokens_per_block == pytest.approx(t) and r.drafts_per_block == pytest.approx(d)
        assert r.tokens_per_cost == pytest.approx(tpc)
    with pytest.raises(ValueError, match="gamma_max"):
        simulate_threshold(pred, agree, 0.5, 0.25, 7)
