"""Continuous batching: ``Engine.submit`` from many threads, requests of every mode and γ in one
batch, cancellation (running and queued), overload, failures, a bounded load run with random
cancellations, and ``AsyncEngine``. Every concurrent greedy request must emit exactly its tokens
when served alone (fp32, CPU: the step products and the attention are row-invariant)."""
from __future__ import annotations

import asyncio
import random
import threading

import pytest

from engine_models import agreeing_tandem_model
from tandem_rt.engine import AsyncEngine, Engine, EngineOverloaded, SamplingParams


def all_free(engine):
    engine.page_manager.check_invariants()
    return engine.num_free_pages == engine.page_manager.num_pages


@pytest.fixture(scope="module")
def model():
    return agreeing_tandem_model(seed=21, layer_scale=0.4)


JOBS = [([3, 4, 5], "tandem-speed", 3), ([6, 7], "speed", 2), ([9, 10, 11, 12], "tandem-speed", "auto"),
        ([1, 2, 3], "primary", 1), ([8, 8, 1, 5, 20], "speed", 5), ([13], "tandem", 3),
        ([14, 15, 16], "secondary", 1), ([17, 3], "tandem-speed", 6), ([2, 9, 9], "speed", "auto"),
        # prompts of several 32-row chunks, prefilled inside the steps of the others
        (list(range(2, 60)) + list(range(5, 20)), "tandem-speed", 4), (list(range(60, 1, -1)), "primary", 1)]


def alone(model, prompt, params, mode, gamma):
    e = Engine(model, num_pages=64, page_size=8, max_batch_size=1)
    return e.generate([prompt], params, mode=mode, gamma=gamma)[0].token_ids


def test_mixed_modes_and_gammas_share_one_batch(model):
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    want = [alone(model, p, params, m, g) for p, m, g in JOBS]
    engine = Engine(model, num_pages=256, page_size=8, max_batch_size=len(JOBS))
    handles = [engine.submit(p, params, mode=m, gamma=g) for p, m, g in JOBS]
    got = [h.result(timeout=60).token_ids for h in handles]
    assert got == want
    # they shared iterations: the primary request alone needs one iteration per token, and all of
    # them together took no more than that plus the steps that carried their prompts (<= 32 rows each)
    prompt_steps = -(-sum(len(p) for p, m, g in JOBS) // 32) + 2
    assert engine.metrics()["iterations"] <= max(len(w) for w in want) + prompt_steps
    assert all_free(engine)


def test_sampled_requests_are_independent_of_what_shares_the_batch(model):
    params = SamplingParams(max_new_tokens=16, temperature=1.5, seed=77, ignore_eos=True)
    want = [alone(model, p, params, m, g) for p, m, g in JOBS]
    for max_batch in (3, len(JOBS)):
        engine = Engine(model, num_pages=256, page_size=8, max_batch_size=max_batch)
        handles = [engine.submit(p, params, mode=m, gamma=g) for p, m, g in JOBS]
        assert [h.result(timeout=60).token_ids for h in handles] == want, max_batch
        assert all_free(engine)


def test_pages_are_free_when_a_request_ends(model, monkeypatch):
    # a caller that sees its final event finds its sequence gone from the batch and its pages free
    # (a server reports capacity from the free pages right after answering), in every mode
    from tandem_rt.engine.requests import RequestHandle

    engine = Engine(model, num_pages=256, page_size=8, max_batch_size=len(JOBS))
    seen = []
    real = RequestHandle._deliver

    def deliver(handle, ev):
        if ev.finished:
            running = engine.scheduler.running
            seen.append((ev.result.finish_reason, [s.finished for s in running],
                         [engine.page_manager.has_sequence(s.sid) for s in running if s.finished]))
        real(handle, ev)

    monkeypatch.setattr(RequestHandle, "_deliver", deliver)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    handles = [engine.submit(p, params, mode=m, gamma=g) for p, m, g in JOBS]
    for h in handles:
        h.result(timeout=60)
    assert len(seen) == len(JOBS)
    assert all(not any(done) and not held for _, done, held in seen), seen
    assert all_free(engine)


def test_submit_from_many_threads(model):
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    want = {i: alone(model, *JOBS[i % len(JOBS)][:1], params, *JOBS[i % len(JOBS)][1:]) for i in range(len(JOBS))}
    engine = Engine(model, num_pages=256, page_size=8, max_batch_size=4)
    got, errors = {}, []

    def client(i):
        try:
            p, m, g = JOBS[i % len(JOBS)]
            got[i] = engine.submit(p, params, mode=m, gamma=g).result(timeout=60).token_ids
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(2 * len(JOBS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(got[i] == want[i % len(JOBS)] for i in got) and len(got) == 2 * len(JOBS)
    assert all_free(engine)


def test_open_stream_never_blocks_the_same_thread(model):
    engine = Engine(model, num_pages=128, page_size=8)
    sp = SamplingParams(max_new_tokens=30, ignore_eos=True)
    done = {}

    def body():
        it = engine.stream([5, 6, 7], sp, mode="tandem-speed", gamma=3)
        next(it)
        done["other"] = engine.generate([[1, 2]], SamplingParams(max_new_tokens=5, ignore_eos=True), mode="primary")
        done["rest"] = list(it)
    t = threading.Thread(target=body)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "generate behind an open stream on the same thread deadlocked"
    assert len(done["other"][0].token_ids) == 5 and done["rest"][-1].finished
    assert all_free(engine)


def test_cancel_running_and_queued_requests(model):
    engine = Engine(model, num_pages=128, page_size=8, max_batch_size=1)
    long = SamplingParams(max_new_tokens=200, ignore_eos=True)
    running = engine.submit([3, 4], long, mode="tandem-speed", gamma=2)
    first = next(iter(running))
    queued = engine.submit([5, 6], SamplingParams(max_new_tokens=8, n=2, ignore_eos=True), mode="speed")
    queued.cancel()
    running.cancel()
    r = running.result(timeout=60)
    assert r.finish_reason == "cancelled" and len(first.token_ids) <= len(r.token_ids) < 200
    q = queued.results(timeout=60)
    assert [x.finish_reason for x in q] == ["cancelled", "cancelled"] and all(not x.token_ids for x in q)
    assert all_free(engine)
    m = engine.metrics()
    assert m["requests_finished"]["cancelled"] == 3 and m["queue_depth"] == 0
    # a stream closed early cancels its request and returns with its pages freed
    it = engine.stream([7, 8, 9], long, mode="tandem-speed", gamma=3)
    next(it)
    it.close()
    assert all_free(engine)
    # the engine serves normally afterwards
    sp = SamplingParams(max_new_tokens=10, ignore_eos=True)
    assert engine.generate([[3, 4]], sp, mode="tandem-speed", gamma=2)[0].token_ids == \
        alone(model, [3, 4], sp, "tandem-speed", 2)


def test_full_queue_is_refused_at_once(model):
    engine = Engine(model, num_pages=128, page_size=8, max_batch_size=1, max_queued_requests=1)
    long = SamplingParams(max_new_tokens=200, ignore_eos=True)
    a = engine.submit([3, 4], long, mode="primary")
    next(iter(a))                                            # running, not queued
    b = engine.submit([5], long, mode="primary")              # queued
    with pytest.raises(EngineOverloaded, match="max_queued_requests"):
        engine.submit([6], long, mode="primary")
    with pytest.raises(ValueError, match="already live"):
        engine.submit([6], long, mode="primary", request_id=a.request_id)
    assert engine.abort(b.request_id) and engine.abort(a.request_id)
    assert not engine.abort("no-such-request")
    assert a.result(timeout=60).finish_reason == "cancelled"
    assert b.result(timeout=60).finish_reason == "cancelled"
    assert all_free(engine)
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit([1], long)


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(model):
    engine = Engine(model, num_pages=128, page_size=8, max_batch_size=4)
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    real = engine.secondary.forward
    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected failure")
        return real(*a, **k)
    engine.secondary.forward = failing
    h_tandem = engine.submit([3, 4, 5], sp, mode="tandem-speed", gamma=3)
    with pytest.raises(RuntimeError, match="injected"):
        h_tandem.result(timeout=60)
    engine.secondary.forward = real
    assert all_free(engine)
    assert engine.metrics()["requests_finished"]["error"] >= 1
    assert engine.generate([[3, 4, 5]], sp, mode="tandem-speed", gamma=3)[0].token_ids == \
        alone(model, [3, 4, 5], sp, "tandem-speed", 3)


def test_bounded_load_with_random_cancellations(model):
    """60 requests from 6 client threads (random modes, γ, lengths, samples; a third cancelled at a
    random point): every request ends finished or cancelled with a reason, greedy finished ones
    equal their lone output, no page leaks, and the engine serves normally afterwards."""
    engine = Engine(model, num_pages=160, page_size=8, max_batch_size=6)
    rng = random.Random(5)
    plans = []
    for i in range(60):
        p, m, g = JOBS[rng.randrange(len(JOBS))]
        plans.append((p, m, g, SamplingParams(max_new_tokens=rng.randint(1, 24), n=rng.choice([1, 1, 2]),
                                              ignore_eos=True), rng.choice(["no", "no", "early", "late"])))
    outcome, errors = {}, []

    def client(k):
        try:
            for i in range(k, len(plans), 6):
                p, m, g, sp, cancel = plans[i]
                h = engine.submit(p, sp, mode=m, gamma=g)
                if cancel == "early":
                    h.cancel()
                elif cancel == "late":
                    for ev in h:
                        h.cancel()
                        break
                outcome[i] = h.results(timeout=120)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(outcome) == len(plans)
    for i, results in outcome.items():
        p, m, g, sp, cancel = plans[i]
        for r in results:
            assert r.finish_reason in ("length", "cancelled")
            if r.finish_reason == "length":
                assert len(r.token_ids) == sp.max_new_tokens
                assert r.token_ids == alone(model, p, SamplingParams(max_new_tokens=sp.max_new_tokens,
                                                                     ignore_eos=True), m, g)
            else:
                assert cancel != "no"
    assert all_free(engine)
    m = engine.metrics()
    assert sum(m["requests_finished"].values()) == sum(sp.n for *_, sp, _ in plans)
    sp = SamplingParams(max_new_tokens=10, ignore_eos=True)
    assert engine.generate([[3, 4, 5]], sp, mode="tandem-speed", gamma=3)[0].token_ids == \
        alone(model, [3, 4, 5], sp, "tandem-speed", 3)


def test_async_engine_streams_cancels_and_aborts(model):
    engine = Engine(model, num_pages=128, page_size=8, max_batch_size=4)
    aeng = AsyncEngine(engine)
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    want = alone(model, [3, 4, 5], sp, "tandem-speed", 3)

    async def main():
        toks = []
        async for ev in aeng.generate([3, 4, 5], sp, mode="tandem-speed", gamma=3):
            toks += ev.token_ids
        assert toks == want
        both = await asyncio.gather(aeng.generate_results([3, 4, 5], sp, mode="tandem-speed", gamma=3),
                                    aeng.generate_results([6, 7], sp, mode="speed", gamma=2))
        assert both[0][0].token_ids == want
        # cancelling the awaiting task cancels the request
        long = SamplingParams(max_new_tokens=200, ignore_eos=True)
        started = asyncio.Event()

        async def consume():
            async for _ in aeng.generate([9, 9], long, mode="primary", request_id="slow"):
                started.set()
        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # abort(request_id) ends a live request with its reason
        results = asyncio.create_task(aeng.generate_results([9, 8], long, mode="primary", request_id="abort-me"))
        await asyncio.sleep(0.01)
        while not aeng.abort("abort-me"):
            await asyncio.sleep(0.01)
        [r] = await results
        assert r.finish_reason == "cancelled"
        with pytest.raises(ValueError, match="mode"):
            async for _ in aeng.generate([1], sp, mode="nope"):
                pass
    asyncio.run(main())
    for _ in range(200):                 # the cancelled task's request leaves at the next iteration
        if all_free(engine):
            break
        threading.Event().wait(0.01)
    assert all_free(engine)


def test_step_cost_model_is_weighted_least_squares():
    import numpy as np

    from tandem_rt.engine.draft_policy import StepCostModel

    rng = np.random.default_rng(0)
    m = StepCostModel(decay=0.8)
    assert m.row_cost() == 0.0 and m.min_accept() == 0.0
    rows = rng.integers(4, 40, 30)
    secs = 0.02 + 0.0015 * rows + rng.normal(0, 0.001, 30)
    toks = rng.integers(4, 12, 30)
    for r, s_, t in zip(rows, secs, toks):
        m.add(int(r), float(s_), int(t))
    w = 0.8 ** np.arange(29, -1, -1)
    slope = np.polyfit(rows, secs, 1, w=np.sqrt(w))[0]
    assert abs(m.row_cost() - slope) < 1e-9
    assert abs(m.rate() - (w * toks).sum() / (w * secs).sum()) < 1e-9
    assert abs(m.min_accept() - slope * m.rate()) < 1e-9
    same = StepCostModel()
    for _ in range(5):
        same.add(8, 0.05, 10)                  # rows never varied: no slope yet
    assert same.row_cost() == 0.0


def test_cost_policy_shortens_drafts_and_stays_exact(model):
    class Expensive:                            # every further row costs more than it can bring
        def min_accept(self):
            return 2.0

        def add(self, *a):
            pass
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompts = [p for p, m, g in JOBS[:4]]
    ref = Engine(model, num_pages=256, page_size=8, max_batch_size=4)
    want = [r.token_ids for r in ref.generate(prompts, params, mode="primary")]
    router = [r for r in ref.generate(prompts, params, mode="tandem-speed", gamma="auto")]
    engine = Engine(model, num_pages=256, page_size=8, max_batch_size=4, draft_policy="cost")
    engine.step_costs = Expensive()
    got = engine.generate(prompts, params, mode="tandem-speed", gamma="auto")
    assert [r.token_ids for r in got] == want == [r.token_ids for r in router]
    for r in got:                               # no draft brings enough: every block is a plain decode step
        assert r.stats["drafted_tokens"] == 0 and r.stats["blocks"] == len(r.token_ids) - 1
    assert sum(r.stats["drafted_tokens"] for r in router) > 0
    with pytest.raises(ValueError, match="draft_policy"):
        Engine(model, num_pages=64, draft_policy="fast")


def test_who_runs_the_loop(model, monkeypatch):
    """generate() runs the iterations on its own thread when no other thread does (the main thread:
    where the CPU kernels' OpenMP threads are cheapest); submit() starts the background thread;
    run_loop() takes the loop over from it and serves other threads' requests until stopped."""
    from tandem_rt.engine import steps

    seen = []
    real = steps.speculative_step

    def spy(*a, **k):
        seen.append(threading.current_thread().name)
        return real(*a, **k)
    monkeypatch.setattr(steps, "speculative_step", spy)
    engine = Engine(model, num_pages=128, page_size=8, max_batch_size=4)
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
    want = engine.generate([[3, 4, 5]], sp, mode="tandem-speed", gamma=2)[0].token_ids
    assert set(seen) == {threading.current_thread().name}
    seen.clear()
    assert engine.submit([3, 4, 5], sp, mode="tandem-speed", gamma=2).result(timeout=60).token_ids == want
    assert set(seen) == {"tandem_rt-engine"}
    # run_loop on this thread: a long request already running in the background is handed over
    seen.clear()
    long = engine.submit([6, 7], SamplingParams(max_new_tokens=150, ignore_eos=True), mode="primary")
    next(iter(long))
    stop = threading.Event()
    got = {}

    def client():
        got["r"] = engine.submit([3, 4, 5], sp, mode="tandem-speed", gamma=2).result(timeout=60).token_ids
        long.wait(timeout=60)
        stop.set()
    t = threading.Thread(target=client)
    t.start()
    engine.run_loop(stop)
    t.join()
    assert got["r"] == want and long.result().finish_reason == "length"
    assert threading.current_thread().name in seen
    assert all_free(engine)
    # close() ends a run_loop waiting on another thread
    runner = threading.Thread(target=engine.run_loop)
    runner.start()
    assert engine.submit([1, 2], sp, mode="primary").result(timeout=60).finish_reason == "length"
    engine.close()
    runner.join(timeout=30)
    assert not runner.is_alive()


def test_attention_options_are_checked_and_reach_every_model(model):
    """Engine(attention_kernel=..., attention_waves=...): bad values raise ValueError naming the option
    before any work; good ones reach every paged model's op options (used by the CUDA op)."""
    with pytest.raises(ValueError, match="kernel must be one of"):
        Engine(model, num_pages=64, attention_kernel="tensor")
    with pytest.raises(ValueError, match="waves must be"):
        Engine(model, num_pages=64, attention_waves=-1)
    engine = Engine(model, num_pages=64, attention_kernel="mma", attention_waves=4)
    for paged in (engine.runner.primary, engine.runner.secondary, engine.runner.drafter):
        assert paged.attention_options == {"kernel": 1, "waves": 4}
