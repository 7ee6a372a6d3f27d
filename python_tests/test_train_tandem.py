"""Tandem training: Eq. (2) masking in the training forward, distillation targets from the frozen
primary, frozen weights unchanged, and the secondary-Distil baseline objective."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import random_tandem_model, tiny_model_config
from tandem_rt.models.llama import LlamaForCausalLM
from tandem_rt.train.data import WindowSampler
from tandem_rt.train.loop import TrainConfig, train
from tandem_rt.train.pretrain import init_weights
from tandem_rt.train.tandem import DistilObjective, TandemObjective, build_tandem, freeze


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rope(x, theta):
    # x [B, H, T, D]; rotate-half convention, written out independently
    B, H, T, D = x.shape
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cos(ang).float(), torch.sin(ang).float()
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference_secondary_logits(tandem, ids, gamma, hidden=None):
    """Eq. (2) with an explicit per-query key list: primary-derived K/V for p < b(i), own for b(i)..i."""
    sec = tandem.secondary
    cfg = sec.config
    if hidden is None:
        _, hidden = tandem.primary(ids, hidden_layers=tandem.layer_map)
    B, T = ids.shape
    Hq, Hk, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    heads = lambda t, n: t.view(B, T, n, D).transpose(1, 2)
    y = sec.model.embed_tokens(ids)
    for j, layer in enumerate(sec.model.layers):
        a = layer.self_attn
        h = layer.input_layernorm(y)
        hp = layer.input_layernorm(tandem.tandem.proj[j](hidden[j]))
        q = _rope(heads(a.q_proj(h), Hq), cfg.rope_theta)
        ko, vo = _rope(heads(a.k_proj(h), Hk), cfg.rope_theta), heads(a.v_proj(h), Hk)
        kp, vp = _rope(heads(a.k_proj(hp), Hk), cfg.rope_theta), heads(a.v_proj(hp), Hk)
        out = torch.zeros(B, Hq, T, D)
        for i in range(T):
            b = ((i + 1) // gamma) * gamma
            k = torch.cat([kp[:, :, :b], ko[:, :, b:i + 1]], dim=2).repeat_interleave(Hq // Hk, 1)
            v = torch.cat([vp[:, :, :b], vo[:, :, b:i + 1]], dim=2).repeat_interleave(Hq // Hk, 1)
            w = torch.softmax(torch.einsum("bhd,bhsd->bhs", q[:, :, i], k) / math.sqrt(D), dim=-1)
            out[:, :, i] = torch.einsum("bhs,bhsd->bhd", w, v)
        y = y + a.o_proj(out.transpose(1, 2).reshape(B, T, Hq * D))
        y = y + layer.mlp(layer.post_attention_layernorm(y))
    return sec.logits(y)


def _frozen_tandem(seed=0):
    m = random_tandem_model(seed=seed)
    freeze(m.primary)
    return m


def test_training_forward_uses_eq2_mask():
    tandem = _frozen_tandem()
    ids = torch.randint(0, 97, (2, 9))
    obj = TandemObjective(tandem, block_length=2)
    sec_logits, pri_logits = obj.logits(ids)
    with torch.no_grad():
        ref = reference_secondary_logits(tandem, ids, 2)
        torch.testing.assert_close(sec_logits, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pri_logits, tandem.primary(ids))
        # the reference discriminates: another block length gives different logits
        assert (reference_secondary_logits(tandem, ids, 3) - ref).abs().max() > 1e-3


def test_secondary_reads_earlier_blocks_of_primary_and_never_the_future():
    tandem = _frozen_tandem(1)
    obj = TandemObjective(tandem, block_length=2)
    ids = torch.randint(0, 97, (1, 10))
    layer = tandem.layer_map[0]
    p = 3  # perturb the primary's residual stream x^(layer) at position 3 (block [2, 3])
    base, _ = obj.logits(ids)

    def hook(_mod, _inp, out):
        out = out.clone()
        out[:, p] += 5.0
        return out

    h = tandem.primary.model.layers[layer - 1].register_forward_hook(hook)
    try:
        pert, _ = obj.logits(ids)
    finally:
        h.remove()
    diff = (pert - base).abs().amax(-1)[0]
    b = [((i + 1) // 2) * 2 for i in range(10)]
    for i in range(10):
        if b[i] > p:     # query i reads primary-derived K/V of position p
            assert diff[i] > 1e-4, i
        else:            # position p is not visible to query i through the primary
            assert diff[i] < 1e-6, i
    # future tokens never matter
    ids2 = ids.clone()
    ids2[0, 6:] = (ids2[0, 6:] + 1) % 97
    fut, _ = obj.logits(ids2)
    torch.testing.assert_close(fut[:, :6], base[:, :6])
    assert (fut[:, 6:] - base[:, 6:]).abs().max() > 1e-4


def test_distillation_targets_come_from_the_frozen_primary():
    tandem = _frozen_tandem(2)
    ids = torch.randint(0, 97, (2, 8))
    loss, metrics = TandemObjective(tandem, distil_weight=0.5, block_length=2)(ids)
    with torch.no_grad():
        teacher = tandem.primary(ids)[:, :-1]           # an independent primary forward
        student = reference_secondary_logits(tandem, ids, 2)[:, :-1]
        logq = F.log_softmax(student, -1)
        ce = -logq.gather(-1, ids[:, 1:, None]).mean()
        kd = -(F.softmax(teacher, -1) * logq).sum(-1).mean()
    torch.testing.assert_close(loss, 0.5 * ce + 0.5 * kd, rtol=1e-4, atol=1e-4)
    assert metrics["ce"] == pytest.approx(float(ce), rel=1e-4)
    assert metrics["kd"] == pytest.approx(float(kd), rel=1e-4)
    loss.backward()
    assert all(p.grad is None for p in tandem.primary.parameters())
    assert tandem.tandem.proj[0].weight.grad is not None and tandem.secondary.model.embed_tokens.weight.grad is not None


def _pattern(n=3000, vocab=97):
    base = np.array([5, 9, 14, 2, 77, 31, 8, 60, 3, 41], dtype=np.uint16)
    return np.tile(base, n // len(base) + 1)[:n]


@pytest.mark.parametrize("w", [0.0, 0.5])
def test_tandem_training_keeps_primary_frozen_and_learns(tmp_path, w):
    tandem = _frozen_tandem(3)
    primary_before = copy.deepcopy(tandem.primary.state_dict())
    proj_before = tandem.tandem.proj[1].weight.detach().clone()
    sampler = WindowSampler(_pattern(), seq_len=16, seed=0)
    cfg = TrainConfig(total_tokens=30 * 4 * 16, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=3, log_every=5,
                      ckpt_every=100)
    obj = TandemObjective(tandem, distil_weight=w, block_length=2)
    with torch.no_grad():
        ids = sampler.sample(4)
        before = obj(ids)[0].item()
    train(obj, sampler.sample, cfg, tmp_path, progress=False)
    with torch.no_grad():
        after = obj(ids)[0].item()
    for name, t in tandem.primary.state_dict().items():
        assert torch.equal(t, primary_before[name]), name
    assert not torch.equal(tandem.tandem.proj[1].weight, proj_before)
    assert after < before


def test_distil_objective_and_frozen_teacher(tmp_path):
    torch.manual_seed(0)
    teacher = freeze(init_weights(LlamaForCausalLM(tiny_model_config(vocab_size=97, hidden_size=48, layers=2,
                                                                      intermediate_size=64))))
    student = init_weights(LlamaForCausalLM(tiny_model_config(vocab_size=97)))
    ids = torch.randint(0, 97, (2, 7))
    obj = DistilObjective(student, teacher, 0.5)
    loss, _ = obj(ids)
    with torch.no_grad():
        t, s = teacher(ids)[:, :-1], F.log_softmax(student(ids)[:, :-1], -1)
        ref = 0.5 * -s.gather(-1, ids[:, 1:, None]).mean() + 0.5 * -(F.softmax(t, -1) * s).sum(-1).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    teacher_before = copy.deepcopy(teacher.state_dict())
    sampler = WindowSampler(_pattern(), seq_len=16, seed=1)
    train(obj, sampler.sample, TrainConfig(total_tokens=8 * 2 * 16, batch_size=2, seq_len=16, lr=3e-3,
                                           warmup_steps=1), tmp_path, progress=False)
    for name, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[name])
    with pytest.raises(ValueError, match="teacher"):
        DistilObjective(student, init_weights(LlamaForCausalLM(tiny_model_config(vocab_size=97))))


def test_build_tandem_copies_and_freezes():
    torch.manual_seed(0)
    pri = init_weights(LlamaForCausalLM(tiny_model_config(vocab_size=97, hidden_size=48, layers=4,
                                                           intermediate_size=64)))
    sec = init_weights(LlamaForCausalLM(tiny_model_config(vocab_size=97)))
    t = build_tandem(pri, sec)
    assert t.layer_map == [2, 4]
    assert all(not p.requires_grad for p in t.primary.parameters())
    assert all(p.requires_grad for p in t.secondary.parameters())
    for k, v in sec.state_dict().items():
        assert torch.equal(t.secondary.state_dict()[k], v)
    unfrozen = random_tandem_model()
    with pytest.raises(ValueError, match="frozen"):
        TandemObjective(unfrozen)
    with pytest.raises(ValueError, match="distil_weight"):
        TandemObjective(t, distil_weight=1.5)(torch.randint(0, 97, (1, 4)))
