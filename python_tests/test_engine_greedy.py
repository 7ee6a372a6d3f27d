"""Greedy ``speed`` and ``tandem-speed`` emit exactly the tokens of greedy ``primary`` (which
equals a plain reference greedy loop), for ragged batches, several γ and γ = "auto"."""
from __future__ import annotations

import pytest
import torch

from engine_models import agreeing_tandem_model
from tandem_rt.engine import Engine, SamplingParams


def reference_greedy(model, prompt, n, stops=()):
    toks = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            t = int(model.primary(torch.tensor([toks]))[0, -1].argmax())
            toks.append(t)
            if t in stops:
                break
    return toks[len(prompt):]


def random_prompts(seed, V, lens):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("seed,page_size,scale,feature", [(0, 8, 0.25, False), (1, 16, 0.35, False),
                                                          (2, 32, 0.45, False), (1, 8, 0.35, True),
                                                          (2, 16, 0.35, "output"), (3, 16, 0.35, "mlp-output"),
                                                          (4, 8, 0.35, "embed")])
def test_greedy_speculative_equals_primary(seed, page_size, scale, feature):
    """``feature="embed"``: token-anchored projections instead of a feature input."""
    embed = feature == "embed"
    model = agreeing_tandem_model(seed=seed, layer_scale=scale, feature=False if embed else feature,
                                  projection_embed=embed)
    engine = Engine(model, num_pages=128, page_size=page_size, max_batch_size=3)
    prompts = random_prompts(seed, model.config.primary.vocab_size, [1, 7, 19, 40])
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    ref = engine.generate(prompts, params, mode="primary")
    assert [r.token_ids for r in ref] == [reference_greedy(model, p, 20) for p in prompts]
    assert all(r.finish_reason == "length" for r in ref)
    total_blocks, full, partial = 0, 0, 0
    for mode in ("speed", "tandem-speed"):
        for gamma in (1, 2, 3, 5, 8, "auto"):
            out = engine.generate(prompts, params, mode=mode, gamma=gamma)
            for r, o in zip(ref, out):
                assert o.token_ids == r.token_ids, (mode, gamma)
                assert o.finish_reason == "length"
                hist = o.stats["accepted_per_block"]
                total_blocks += sum(hist)
                full += sum(hist[1:])
                partial += hist[0]
    # the models agree often but not always: both accepted and rejected drafts occurred
    assert full > 0 and partial > 0
    assert engine.num_free_pages == engine.page_manager.num_pages
    engine.page_manager.check_invariants()


def test_greedy_stop_tokens():
    model = agreeing_tandem_model(seed=3, layer_scale=0.35)
    engine = Engine(model, num_pages=64, page_size=8)
    prompts = random_prompts(3, model.config.primary.vocab_size, [5, 9])
    free_run = [reference_greedy(model, p, 16) for p in prompts]
    stop = free_run[0][6]      # a token the first sequence emits at step 6 (or earlier)
    params = SamplingParams(max_new_tokens=16, stop_token_ids=(stop,), ignore_eos=True)
    expect = [reference_greedy(model, p, 16, stops=(stop,)) for p in prompts]
    for mode in ("primary", "speed", "tandem-speed"):
        out = engine.generate(prompts, params, mode=mode, gamma=4)
        assert [o.token_ids for o in out] == expect, mode
        assert out[0].finish_reason == "stop" and out[0].token_ids[-1] == stop
    assert engine.num_free_pages == engine.page_manager.num_pages


@pytest.mark.parametrize("dense_prefill, chunk, step_rows", [(False, 7, 32), (True, 32, 1), (True, 32, 200)])
def test_prefill_paths_equal_reference(dense_prefill, chunk, step_rows):
    """Prompts longer than one chunk: prompts prefilled inside the steps (one 32-row chunk a step,
    or several prompts' chunks together) and the drafter's pool prefilled alone (chunked paged or
    dense) all continue exactly like the reference greedy loop."""
    model = agreeing_tandem_model(seed=4, layer_scale=0.35)
    engine = Engine(model, num_pages=128, page_size=8, max_batch_size=3, dense_prefill=dense_prefill,
                    prefill_chunk=chunk, step_prompt_rows=step_rows)
    prompts = random_prompts(4, model.config.primary.vocab_size, [70, 3, 41])
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    for mode in ("primary", "tandem-speed", "speed"):
        out = engine.generate(prompts, params, mode=mode, gamma=3)
        assert [o.token_ids for o in out] == [reference_greedy(model, p, 8) for p in prompts], mode
    assert engine.num_free_pages == engine.page_manager.num_pages


def test_dense_prefill_default_follows_device_and_dtype():
    """dense_prefill=None: chunked prefill on the CPU in bf16 (or with a quantized primary), one
    dense forward in fp32; an explicit value is kept."""
    from tandem_rt.engine.engine import default_dense_prefill

    assert Engine(agreeing_tandem_model(seed=0), num_pages=8, dtype="bfloat16").dense_prefill is False
    assert Engine(agreeing_tandem_model(seed=0), num_pages=8, dtype="float32").dense_prefill is True
    assert Engine(agreeing_tandem_model(seed=0), num_pages=8, dtype="bfloat16", dense_prefill=True).dense_prefill
    assert default_dense_prefill(torch.device("cpu"), torch.float32, quantized=True) is False
    assert default_dense_prefill(torch.device("cuda"), torch.bfloat16, quantized=True) is True


@pytest.mark.parametrize("kwargs, match", [({"dense_prefill": "yes"}, "dense_prefill"),
                                           ({"step_prompt_rows": 0}, "step_prompt_rows")])
def test_prefill_options_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Engine(agreeing_tandem_model(seed=0), num_pages=8, **kwargs)


@pytest.mark.parametrize("mode", ["speed", "tandem-speed", "tandem"])
def test_router_lag_drafts_the_same_blocks(mode):
    """gamma="auto" with the router's decisions read one draft step late (the CUDA default) drafts
    exactly the blocks of the immediate read: same tokens, same drafted / accepted counts; only
    the secondary runs one extra (dropped) step per router stop."""
    model = agreeing_tandem_model(seed=5, layer_scale=0.35)
    model.router.config.threshold = 0.5
    prompts = random_prompts(5, model.config.primary.vocab_size, [3, 17, 9])
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    out = {}
    for lag in (False, True):
        engine = Engine(model, num_pages=128, page_size=8, max_batch_size=3)
        engine.router_lag = lag
        out[lag] = engine.generate(prompts, params, mode=mode, gamma="auto")
        assert engine.num_free_pages == engine.page_manager.num_pages
    gamma_max = model.router.config.gamma_max
    blocks = sum(r.stats["blocks"] for r in out[False]) if mode != "tandem" else None
    for a, b in zip(out[False], out[True]):
        assert a.token_ids == b.token_ids
        for key in ("drafted_tokens", "accepted_tokens", "accepted_per_block", "primary_runs"):
            assert a.stats[key] == b.stats[key], key
        assert a.stats["secondary_runs"] <= b.stats["secondary_runs"]
    # the lagged path really ran (its dropped steps show up as extra secondary runs)
    assert sum(r.stats["secondary_runs"] for r in out[True]) > sum(r.stats["secondary_runs"] for r in out[False])
    if mode != "tandem":
        # the router really cut blocks short (otherwise this test would not exercise it)
        assert sum(r.stats["drafted_tokens"] for r in out[False]) < blocks * gamma_max
        assert [r.token_ids for r in out[False]] == [reference_greedy(model, p, 24) for p in prompts]
