"""The reference Tandem model implements Eq. (2) with the documented index convention.

The check is an independent per-query loop: for every query position i the secondary's
keys/values are assembled explicitly (primary-derived for p < b(i), own for b(i) <= p <= i)
and attention is computed with plain matrix products in float64.
"""
import math

import pytest
import torch

from tandem_rt.models import TandemModel, training_boundary
from tandem_rt.models.llama import rope_cos_sin
from conftest import random_tandem_model


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rot(x, cos, sin):  # x [H, D], cos/sin [D]
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


def naive_secondary_logits(model: TandemModel, ids: torch.Tensor, gamma: int, own_context: bool = False) -> torch.Tensor:
    """float64 per-query evaluation of Eq. (2) for one sequence ids [T] -> [T, V] (``own_context``:
    every query also reads the secondary's own K/V of the positions before its block)."""
    model = model.double()
    sec, cfg = model.secondary, model.secondary.config
    T = ids.shape[0]
    _, hidden = model.primary(ids[None], hidden_layers=model.layer_map)
    cos, sin = rope_cos_sin(torch.arange(T), cfg.head_dim, cfg.rope_theta, torch.float64)
    Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    y = sec.model.embed_tokens.weight[ids]  # [T, d]
    for j, layer in enumerate(sec.model.layers):
        a = layer.self_attn
        eps = layer.input_layernorm.eps
        w = layer.input_layernorm.weight
        y_hat = model.tandem.proj[j](hidden[j][0])
        if model.config.projection_embed:   # token-anchored: the token's own embedding added
            y_hat = y_hat + sec.model.embed_tokens.weight[ids]
        own_in, pri_in = _rms(y, w, eps), _rms(y_hat, w, eps)

        def kv(h, p):
            k = a.k_proj(h[p]).view(Hkv, D)
            return _rot(k, cos[p], sin[p]), a.v_proj(h[p]).view(Hkv, D)

        out = torch.zeros(T, cfg.hidden_size, dtype=torch.float64)
        for i in range(T):
            b = (i + 1) // gamma * gamma
            q = _rot(a.q_proj(own_in[i]).view(Hq, D), cos[i], sin[i])
            own_from = 0 if own_context else b
            keys, vals = zip(*([kv(pri_in, p) for p in range(b)] + [kv(own_in, p) for p in range(own_from, i + 1)]))
            K, V = torch.stack(keys, 1), torch.stack(vals, 1)  # [Hkv, i+1, D]
            K = K.repeat_interleave(Hq // Hkv, 0)
            V = V.repeat_interleave(Hq // Hkv, 0)
            att = torch.softmax((q[:, None, :] @ K.transpose(1, 2)) / math.sqrt(D), -1)  # [Hq, 1, i+1]
            out[i] = a.o_proj((att @ V).reshape(Hq * D))
        y = y + out
        y = y + layer.mlp(_rms(y, layer.post_attention_layernorm.weight, eps))
    return sec.logits(y)


@pytest.mark.parametrize("projection_embed", [False, True])
@pytest.mark.parametrize("gamma", [1, 2, 3])
def test_tandem_forward_matches_per_query_eq2(gamma, projection_embed):
    model = random_tandem_model(seed=gamma, projection_embed=projection_embed)
    ids = torch.randint(0, 97, (2, 7))
    got = model(ids, block_length=gamma).secondary_logits.double()
    for b in range(2):
        ref = naive_secondary_logits(model, ids[b], gamma)
        torch.testing.assert_close(got[b], ref, rtol=1e-4, atol=1e-4)


def test_training_boundary():
    assert training_boundary(7, 2).tolist() == [0, 2, 2, 4, 4, 6, 6]
    assert training_boundary(5, 1).tolist() == [1, 2, 3, 4, 5]


def test_long_block_equals_standalone_secondary():
    """With T < γ no primary position is ever visible: the secondary runs standalone."""
    model = random_tandem_model(seed=3)
    ids = torch.randint(0, 97, (2, 6))
    out = model(ids, block_length=8)
    torch.testing.assert_close(out.secondary_logits, model.secondary(ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.primary_logits, model.primary(ids), rtol=0, atol=0)


def test_secondary_is_causal_and_reads_primary_blocks():
    model = random_tandem_model(seed=4)
    ids = torch.randint(0, 97, (1, 8))
    base = model(ids, block_length=2).secondary_logits
    changed = ids.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 97
    out = model(changed, block_length=2).secondary_logits
    torch.testing.assert_close(out[0, :5], base[0, :5])  # no position before 5 depends on token 5
    assert (out[0, 5:] - base[0, 5:]).abs().max() > 1e-4


def test_primary_frozen_gets_no_grad_secondary_does():
    model = random_tandem_model(seed=5)
    model.primary.requires_grad_(False)
    ids = torch.randint(0, 97, (1, 6))
    model(ids, block_length=2).secondary_logits.sum().backward()
    assert all(p.grad is None for p in model.primary.parameters())
    assert all(p.grad is not None for p in model.tandem.proj.parameters())


def test_hidden_layers_are_residual_streams():
    model = random_tandem_model(seed=6)
    ids = torch.randint(0, 97, (1, 5))
    logits, hidden = model.primary(ids, hidden_layers=[0, 4])
    torch.testing.assert_close(hidden[0], model.primary.model.embed_tokens(ids))
    torch.testing.assert_close(model.primary.logits(hidden[1]), logits)


def test_latest_feature_matches_a_loop():
    """``latest_feature`` picks row ``b(i) - 1`` per query (zero where ``b(i) = 0``), for a shared
    ``[T]`` and a per-sequence ``[B, T]`` boundary."""
    from tandem_rt.models.tandem import latest_feature
    from tandem_rt.train.draft_training import drafting_boundary

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 5, generator=g, dtype=torch.float64)
    boundaries = [drafting_boundary(11, 3, 1), torch.stack([drafting_boundary(11, g_, f) for g_, f in
                                                            ((1, 0), (4, 2), (2, 1))])]
    for b in boundaries:
        got = latest_feature(hidden, b)
        bb = b.expand(3, 11)
        for s in range(3):
            for i in range(11):
                want = hidden[s, bb[s, i] - 1] if bb[s, i] > 0 else torch.zeros(5, dtype=torch.float64)
                assert torch.equal(got[s, i], want)


def test_token_anchored_projections_start_as_the_own_keys_at_layer_0():
    """With ``projection_embed`` and ``proj_0 = 0`` the primary-derived residual of layer 0 is the
    secondary's own input, so where only layer 0 reads the primary the secondary is standalone."""
    model = random_tandem_model(seed=7, projection_embed=True, layer_map=[4, 4])
    sec = model.secondary
    with torch.no_grad():
        for p in model.tandem.proj[0].parameters():
            p.zero_()
        sec.model.layers[1].self_attn.k_proj.weight.zero_()   # layer 1 reads nothing from its keys...
        sec.model.layers[1].self_attn.v_proj.weight.zero_()   # ...or values: only layer 0 matters
        if sec.model.layers[1].self_attn.v_proj.bias is not None:
            sec.model.layers[1].self_attn.v_proj.bias.zero_()
    ids = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(model(ids, block_length=3).secondary_logits, sec(ids), rtol=1e-5, atol=1e-5)
    model.config.projection_embed = False    # Eq. (2) reads proj_0(x) = 0 instead: other logits
    assert (model(ids, block_length=3).secondary_logits - sec(ids)).abs().max() > 1e-3


@pytest.mark.parametrize("gamma", [2, 3])
def test_own_context_matches_per_query_loop(gamma):
    """``own_context`` (tools/pilot_own_context.py): primary-derived K/V before the block plus the
    secondary's own K/V of every position up to the query, against the float64 loop."""
    from tandem_rt.models.tandem import tandem_secondary_forward

    model = random_tandem_model(seed=10 + gamma)
    ids = torch.randint(0, 97, (2, 8))
    _, hidden = model.primary(ids, hidden_layers=model.layer_map)
    boundary = training_boundary(8, gamma).expand(2, 8)    # per-sequence boundaries, as in training
    got = tandem_secondary_forward(model.secondary, model.tandem.proj, ids, hidden, boundary,
                                   own_context=True).double()
    plain = tandem_secondary_forward(model.secondary, model.tandem.proj, ids, hidden, boundary).double()
    for b in range(2):
        torch.testing.assert_close(got[b], naive_secondary_logits(model, ids[b], gamma, own_context=True),
                                   rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().max() > 1e-3
