"""Page accounting of the engine: nothing leaks after finished, failed or cancelled requests;
forked samples never see each other's writes; exhaustion is a clear error and leaves the engine
(and queued requests) intact."""
from __future__ import annotations

import pytest
import torch

from engine_models import agreeing_tandem_model
from tandem_rt.engine import Engine, SamplingParams


def all_free(engine):
    engine.page_manager.check_invariants()
    return engine.num_free_pages == engine.page_manager.num_pages


@pytest.fixture(scope="module")
def model():
    return agreeing_tandem_model(seed=11, layer_scale=0.45)


def test_no_leak_after_finished_failed_and_cancelled(model):
    engine = Engine(model, num_pages=64, page_size=8, max_batch_size=4)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    good = engine.generate(prompts, params, mode="tandem-speed", gamma=3)
    assert all_free(engine)
    # a failure in the middle of a verify block
    real = engine.primary.forward
    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real(*a, **k)

    engine.primary.forward = failing
    with pytest.raises(RuntimeError, match="injected"):       # in a verify block
        engine.generate(prompts, SamplingParams(max_new_tokens=12, n=3, ignore_eos=True), mode="tandem-speed")
    assert all_free(engine)
    calls["n"] = 2
    with pytest.raises(RuntimeError, match="injected"):       # in the prompt's prefill
        engine.generate(prompts, SamplingParams(max_new_tokens=12, n=3, ignore_eos=True), mode="tandem-speed")
    engine.primary.forward = real
    assert all_free(engine)
    # a stream closed after two events (cancellation)
    it = engine.stream(prompts[1], SamplingParams(max_new_tokens=12, n=2, ignore_eos=True), mode="speed", gamma=2)
    next(it), next(it)
    assert not all_free(engine)
    it.close()
    assert all_free(engine)
    # the engine still produces the same outputs
    again = engine.generate(prompts, params, mode="tandem-speed", gamma=3)
    assert [r.token_ids for r in again] == [r.token_ids for r in good]
    # a stream run to the end yields every token once, and its final result
    events = list(engine.stream(prompts[0], params, mode="tandem-speed", gamma=3))
    assert sum((ev.token_ids for ev in events), []) == good[0].token_ids
    assert events[-1].finished and events[-1].result.token_ids == good[0].token_ids
    assert all_free(engine)


@pytest.mark.parametrize("mode", ["primary", "tandem-speed", "speed"])
def test_forks_do_not_see_each_others_writes(model, mode):
    """n samples of one prompt (its last page shared and partially filled): every sampled token is
    among the reference top-2 of the sample's own prefix, which fails if a fork read K/V that
    another fork wrote."""
    engine = Engine(model, num_pages=64, page_size=8, max_batch_size=8)
    prompt = list(range(3, 14))                     # 11 tokens: the second page is shared and partial
    params = SamplingParams(max_new_tokens=10, temperature=2.0, top_k=2, n=6, seed=3, ignore_eos=True)
    out = engine.generate([prompt], params, mode=mode, gamma=3)
    assert len({tuple(o.token_ids) for o in out}) > 1          # the samples diverged
    with torch.no_grad():
        for o in out:
            toks = prompt + o.token_ids
            logits = model.primary(torch.tensor([toks]))[0]
            top2 = logits.topk(2, -1).indices
            for i, t in enumerate(o.token_ids):
                assert t in top2[len(prompt) - 1 + i].tolist()
    assert all_free(engine)


def test_exhaustion_is_a_clear_error_and_queues_fit(model):
    small = Engine(model, num_pages=8, page_size=8, max_batch_size=4)
    with pytest.raises(ValueError, match="pages"):
        small.generate([list(range(2, 30))], SamplingParams(max_new_tokens=30), mode="tandem-speed")
    assert all_free(small)
    # several requests that do not fit at once are queued and give the same results
    big = Engine(model, num_pages=128, page_size=8, max_batch_size=4)
    prompts = [[2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [17]]
    params = SamplingParams(max_new_tokens=12, n=2, ignore_eos=True)
    want = big.generate(prompts, params, mode="tandem-speed", gamma=2)
    got = small.generate(prompts, params, mode="tandem-speed", gamma=2)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert all_free(small) and all_free(big)
