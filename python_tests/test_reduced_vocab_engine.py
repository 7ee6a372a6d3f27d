"""Drafters with a reduced output vocabulary in the engine: greedy ``speed`` / ``tandem-speed``
still emit exactly greedy ``primary``'s tokens, sampling still reproduces the primary's
distribution (the drafter's q is 0 outside its vocabulary), and the checkpoint round-trips the
``vocab_subset`` ids (and refuses malformed ones)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from engine_models import agreeing_tandem_model
from test_engine_greedy import random_prompts, reference_greedy
from test_engine_sampling import PROMPT, exact_t2_t3, tv_bound
from tandem_rt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tandem_rt.engine import Engine, SamplingParams
from tandem_rt.models import TandemModel


def with_reduced_vocab(model: TandemModel, subset: torch.Tensor) -> TandemModel:
    """The same model whose secondary and drafter predict only ``subset``."""
    cfg = model.config
    sec = dataclasses.replace(cfg.secondary, output_vocab_size=subset.numel())
    dra = dataclasses.replace(cfg.drafter, output_vocab_size=subset.numel())
    new = TandemModel(dataclasses.replace(cfg, secondary=sec, drafter=dra))
    state = dict(model.state_dict())
    state["secondary.vocab_subset"] = subset.clone()
    state["drafter.vocab_subset"] = subset.clone()
    new.load_state_dict(state)
    return new.eval()


def test_greedy_with_reduced_draft_vocabulary_equals_primary():
    base = agreeing_tandem_model(seed=1, layer_scale=0.35)
    V = base.config.primary.vocab_size
    subset = torch.sort(torch.randperm(V, generator=torch.Generator().manual_seed(0))[:40]).values
    model = with_reduced_vocab(base, subset)
    engine = Engine(model, num_pages=128, page_size=8, max_batch_size=3)
    prompts = random_prompts(3, V, [1, 9, 23])
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    ref = [reference_greedy(model, p, 20) for p in prompts]
    accepted = 0
    for mode in ("speed", "tandem-speed"):
        for gamma in (1, 3, 6, "auto"):
            out = engine.generate(prompts, params, mode=mode, gamma=gamma)
            assert [o.token_ids for o in out] == ref, (mode, gamma)
            accepted += sum(o.stats["accepted_tokens"] for o in out)
    assert accepted > 0
    # every drafted token of the drafter-alone mode lies in the subset
    out = engine.generate(prompts, params, mode="secondary")
    assert all(t in set(subset.tolist()) for o in out for t in o.token_ids)
    assert engine.num_free_pages == engine.page_manager.num_pages


def test_sampling_with_reduced_draft_vocabulary_matches_primary():
    V, N = 16, 2500
    base = agreeing_tandem_model(seed=7, vocab_size=V, layer_scale=0.5)
    model = with_reduced_vocab(base, torch.tensor([0, 1, 2, 3, 5, 7, 8, 11, 12, 14]))
    engine = Engine(model, num_pages=1200, page_size=8, max_batch_size=1024)
    for i, (mode, gamma) in enumerate([("speed", 3), ("tandem-speed", 2)]):
        params = SamplingParams(max_new_tokens=4, n=N, seed=200 + i, ignore_eos=True, temperature=1.5)
        exact = exact_t2_t3(model, params)
        out = engine.generate([PROMPT], params, mode=mode, gamma=gamma)
        counts = torch.zeros(V, V, dtype=torch.float64)
        for o in out:
            counts[o.token_ids[1], o.token_ids[2]] += 1
        tv = 0.5 * (counts / N - exact).abs().sum().item()
        assert tv < tv_bound(exact, N), f"{mode}: TV {tv:.4f}"
        assert 0 < sum(o.stats["accepted_tokens"] for o in out) < sum(o.stats["drafted_tokens"] for o in out)


def test_vocab_subset_checkpoint_round_trip_and_refusals(tmp_path):
    base = agreeing_tandem_model(seed=2)
    subset = torch.tensor([0, 3, 4, 9, 20, 33, 60])
    model = with_reduced_vocab(base, subset)
    save_checkpoint(model, tmp_path / "ok", dtype=torch.bfloat16)
    loaded = load_checkpoint(tmp_path / "ok")
    assert torch.equal(loaded.secondary.vocab_subset, subset)
    assert loaded.secondary.vocab_subset.dtype == torch.int64
    for bad, match in [(torch.tensor([0, 3, 3, 9, 20, 33, 60]), "increasing"),
                       (torch.tensor([0, 3, 4, 9, 20, 33, 61]), "outside")]:
        m = with_reduced_vocab(base, subset)
        m.drafter.vocab_subset.copy_(bad)
        save_checkpoint(m, tmp_path / "bad", dtype=torch.float32)
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(tmp_path / "bad")
