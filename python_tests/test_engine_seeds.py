"""Per-request seeds: a seeded sampled request gives the same tokens whatever other prompts share
its call and whatever ``max_batch_size`` is, in every mode (fp32, CPU); different seeds and the
samples of one request (``n > 1``) draw different streams."""
from __future__ import annotations

import pytest

from engine_models import agreeing_tandem_model
from tandem_rt.engine import Engine, SamplingParams

PROMPT = [3, 7, 1, 12, 5, 9]
OTHERS = [[4, 4, 2], [11, 2, 8, 30, 1, 6, 7, 2], [5]]


@pytest.fixture(scope="module")
def model():
    return agreeing_tandem_model(seed=4, vocab_size=61)


def tokens(engine, prompts, params, mode, gamma):
    return [r.token_ids for r in engine.generate(prompts, params, mode=mode, gamma=gamma)]


@pytest.mark.parametrize("mode, gamma", [("primary", 1), ("secondary", 1), ("speed", 3), ("tandem-speed", 4),
                                         ("tandem-speed", "auto"), ("tandem", 3)])
def test_seeded_request_is_independent_of_its_batch(model, mode, gamma):
    sp = SamplingParams(max_new_tokens=14, temperature=2.0, seed=1234, ignore_eos=True)
    alone = tokens(Engine(model, num_pages=64, page_size=4), [PROMPT], sp, mode, gamma)[0]
    assert len(alone) == 14
    for max_batch in (1, 2, 8):
        engine = Engine(model, num_pages=96, page_size=4, max_batch_size=max_batch)
        got = tokens(engine, [OTHERS[0], PROMPT, *OTHERS[1:]], sp, mode, gamma)
        assert got[1] == alone, (mode, gamma, max_batch)
    # the first sample of n = 4 is the n = 1 request; the samples, and other seeds, draw other streams
    four = tokens(Engine(model, num_pages=128, page_size=4),
                  [PROMPT], SamplingParams(**{**sp.__dict__, "n": 4}), mode, gamma)
    assert four[0] == alone
    assert len({tuple(t) for t in four}) > 1
    seeds = [tokens(Engine(model, num_pages=64, page_size=4), [PROMPT],
                    SamplingParams(**{**sp.__dict__, "seed": 1235 + i}), mode, gamma)[0] for i in range(4)]
    assert len({tuple(t) for t in seeds + [alone]}) > 1
