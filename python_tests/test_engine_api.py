"""Request validation (ValueError naming the problem before any work) and thread safety."""
from __future__ import annotations

import threading

import pytest

from engine_models import agreeing_tandem_model
from tandem_rt.engine import Engine, SamplingParams


@pytest.fixture(scope="module")
def engine():
    return Engine(agreeing_tandem_model(seed=12, layer_scale=0.4, max_position_embeddings=64),
                  num_pages=64, page_size=8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n must"), (dict(seed=-1), "seed"), (dict(stop_token_ids=("a",)), "stop_token_ids"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("call,match", [
    (lambda e: e.generate([], SamplingParams()), "prompts is empty"),
    (lambda e: e.generate([[]], SamplingParams()), r"prompts\[0\] is empty"),
    (lambda e: e.generate([[1, 2, 999]], SamplingParams()), "outside the vocabulary"),
    (lambda e: e.generate([[1, 2, -1]], SamplingParams()), "outside the vocabulary"),
    (lambda e: e.generate("hello", SamplingParams()), "no tokenizer"),
    (lambda e: e.generate([[1] * 40], SamplingParams(max_new_tokens=30)), "context"),
    (lambda e: e.generate([[1, 2]], SamplingParams(), mode="fast"), "unknown mode"),
    (lambda e: e.generate([[1, 2]], SamplingParams(), gamma=0), "gamma"),
    (lambda e: e.generate([[1, 2]], SamplingParams(), gamma="fast"), "gamma"),
    (lambda e: e.generate([[1, 2]], SamplingParams(), mode="primary", gamma="auto"), "auto"),
    (lambda e: e.generate([[1, 2]], "greedy"), "params"),
    (lambda e: e.generate([[1, 2]], SamplingParams(max_new_tokens=8, stop_token_ids=(500,))), "stop_token_ids"),
])
def test_bad_requests_raise_before_work(engine, call, match):
    with pytest.raises(ValueError, match=match):
        call(engine)
    assert engine.num_free_pages == engine.page_manager.num_pages


def test_modes_the_checkpoint_cannot_serve():
    e = Engine(agreeing_tandem_model(seed=13, drafter=False, router=False), num_pages=32, page_size=8)
    with pytest.raises(ValueError, match="drafter"):
        e.generate([[1, 2]], SamplingParams(), mode="speed")
    with pytest.raises(ValueError, match="router"):
        e.generate([[1, 2]], SamplingParams(), mode="tandem-speed", gamma="auto")


def test_concurrent_generate_equals_sequential(engine):
    jobs = [([[3, 4, 5]], SamplingParams(max_new_tokens=10, ignore_eos=True), "tandem-speed", 3),
            ([[6, 7], [8]], SamplingParams(max_new_tokens=8, ignore_eos=True), "speed", 2),
            ([[9, 10, 11, 12]], SamplingParams(max_new_tokens=9, temperature=1.0, seed=5, n=2,
                                               ignore_eos=True), "tandem-speed", "auto"),
            ([[1, 2, 3]], SamplingParams(max_new_tokens=7, ignore_eos=True), "primary", 1)]
    sequential = [[r.token_ids for r in engine.generate(p, s, mode=m, gamma=g)] for p, s, m, g in jobs]
    results = [None] * (2 * len(jobs))
    errors = []

    def work(i):
        try:
            p, s, m, g = jobs[i % len(jobs)]
            results[i] = [r.token_ids for r in engine.generate(p, s, mode=m, gamma=g)]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == sequential + sequential
    assert engine.num_free_pages == engine.page_manager.num_pages


def test_string_prompts_text_and_stream_deltas():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {f"w{i}": i for i in range(61)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")          # joins words with spaces
    e = Engine(agreeing_tandem_model(seed=14, layer_scale=0.4), tok, num_pages=64, page_size=8)
    params = SamplingParams(max_new_tokens=9, ignore_eos=True)
    [r] = e.generate("w5 w6 w7", params, mode="tandem-speed", gamma=3)
    [ref] = e.generate([[5, 6, 7]], params, mode="primary")
    assert r.token_ids == ref.token_ids
    assert r.text == tok.decode(r.token_ids) and r.text.split() == [f"w{t}" for t in r.token_ids]
    events = list(e.stream("w5 w6 w7", params, mode="tandem-speed", gamma=3))
    assert "".join(ev.text for ev in events) == r.text
    assert sum((ev.token_ids for ev in events), []) == r.token_ids


def test_default_gamma_drafts_at_most_default_gamma_per_block(engine):
    """A request that names no γ drafts blocks of DEFAULT_GAMMA (3) tokens: the agreeing model's
    drafts are all accepted, so every full block brings DEFAULT_GAMMA accepted drafts; the CLI and
    the server default to the same value."""
    import inspect

    from tandem_rt.cli import build_parser
    from tandem_rt.engine.params import DEFAULT_GAMMA

    assert DEFAULT_GAMMA == 3
    r = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=13, ignore_eos=True), mode="tandem-speed")[0]
    per_block = r.stats["accepted_per_block"]
    assert len(per_block) == DEFAULT_GAMMA + 1 and per_block[DEFAULT_GAMMA] >= 2   # full blocks of 3 drafts
    for fn in (Engine.generate, Engine.submit, Engine.stream):
        assert inspect.signature(fn).parameters["gamma"].default == DEFAULT_GAMMA
    assert build_parser().parse_args(["generate", "--prompt", "x"]).gamma in (DEFAULT_GAMMA, str(DEFAULT_GAMMA))
