"""Pretraining loop: loss decreases, schedule, resume, objective = shifted CE."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model_config
from tandem_rt.models.llama import LlamaForCausalLM
from tandem_rt.train.data import WindowSampler
from tandem_rt.train.loop import TrainConfig, load_run_state, lr_at, train
from tandem_rt.train.pretrain import CausalLMObjective, count_params, init_weights, preset_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pattern_tokens(n=4000, vocab=29):
    # a deterministic repeating sequence: learnable by a tiny model
    base = np.array([2, 5, 7, 11, 3, 13, 17, 19, 23, 4, 6, 8], dtype=np.uint16) % vocab
    return np.tile(base, n // len(base) + 1)[:n]


def test_objective_is_shifted_cross_entropy():
    model = init_weights(LlamaForCausalLM(tiny_model_config(vocab_size=29, hidden_size=16, layers=1,
                                                              heads=2, kv_heads=1, intermediate_size=24)))
    ids = torch.randint(0, 29, (2, 9))
    loss, _ = CausalLMObjective(model)(ids)
    logits = model(ids)
    ref = -torch.stack([F.log_softmax(logits[b, t], -1)[ids[b, t + 1]] for b in range(2) for t in range(8)]).mean()
    torch.testing.assert_close(loss, ref)


def test_loss_decreases_and_resume(tmp_path):
    torch.manual_seed(0)
    cfg_m = tiny_model_config(vocab_size=29, hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=48)
    model = init_weights(LlamaForCausalLM(cfg_m))
    sampler = WindowSampler(_pattern_tokens(), seq_len=24, seed=0)
    cfg = TrainConfig(total_tokens=60 * 4 * 24, batch_size=4, seq_len=24, lr=3e-3, warmup_steps=5,
                      log_every=5, ckpt_every=10)
    r1 = train(CausalLMObjective(model), sampler.sample, cfg, tmp_path, sampler=sampler, progress=False, max_steps=25)
    assert r1["step"] == 25 and not r1["done"]
    assert load_run_state(tmp_path)["step"] == 25
    # resume in a fresh model: picks up at step 25 and finishes
    model2 = LlamaForCausalLM(cfg_m)
    sampler2 = WindowSampler(_pattern_tokens(), seq_len=24, seed=0)
    r2 = train(CausalLMObjective(model2), sampler2.sample, cfg, tmp_path, sampler=sampler2, progress=False)
    assert r2["done"] and r2["step"] == 60 and r2["tokens"] == 60 * 4 * 24
    log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(5, 61, 5))
    first, last = log[0]["loss"], log[-1]["loss"]
    assert last < 0.5 * first, (first, last)
    assert all(r["tok_per_s"] > 0 for r in log)


def test_lr_schedule():
    cfg = TrainConfig(total_tokens=1, lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(10, 100, cfg) == pytest.approx(1.0)
    mid = 10 + 45
    assert lr_at(mid, 100, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, 100, cfg) == pytest.approx(0.1)


def test_presets_sizes():
    p = LlamaForCausalLM(preset_config("primary"))
    s = LlamaForCausalLM(preset_config("secondary"))
    assert 5e6 < count_params(p) < 8e6 and 1e6 < count_params(s) < 2e6
    assert p.config.head_dim == 32 and s.config.head_dim == 32
    with pytest.raises(ValueError, match="name"):
        preset_config("huge")
