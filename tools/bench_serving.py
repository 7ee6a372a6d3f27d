#!/usr/bin/env python
"""Serving benchmark: the same requests served one after another, by N concurrent clients (closed
loop) and with Poisson arrivals, against the engine (``Engine.submit``) and against the HTTP server
(``tandem-rt serve``'s app, in-process, over 127.0.0.1), all in one run.

Prints a table and writes JSON (``--out``): wall time, throughput, speed-up over serial, time to
first token and inter-token latency (gap between successive token deliveries: a speculative block
delivers several tokens at once) p50 / p99, accepted drafts per block, and whether every greedy
output equals its serial output. ``--load N`` adds the bounded load run: N requests from
``--load-clients`` threads through the engine and over HTTP, random modes / γ / lengths /
samples, a ``--cancel-fraction`` share cancelled or disconnected mid-stream; it reports every
request's outcome and checks that no page leaked and that the engine serves normally afterwards.

    python tools/bench_serving.py --clients 8 --requests 16 --max-new-tokens 64 --mode tandem-speed --gamma auto \\
        --threads 1 --dtype float32 [--rate 2.0] [--server] --out docs/benchmarks/DATE-cpu-serving.json
"""
from __future__ import annotations

import argparse
import json
import queue
import random
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import add_model_args, cpu_model, engine_from_args  # noqa: E402


def pct(xs: list, q: float):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


class Trace:
    """Timing of one request: submit time, token delivery times, tokens, acceptance stats."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.times: list = []
        self.tokens: list = []
        self.end = None
        self.blocks = 0
        self.accepted = 0
        self.count = None

    def got(self, tokens: list) -> None:
        if tokens:
            self.times.append(time.perf_counter())
            self.tokens.extend(tokens)

    @property
    def ttft(self):
        return self.times[0] - self.t0 if self.times else None

    def gaps(self) -> list:
        return [b - a for a, b in zip(self.times, self.times[1:])]


# ----------------------------------------------------------------------------- clients
def engine_request(engine, prompt, params, mode, gamma) -> Trace:
    tr = Trace()
    for ev in engine.submit(prompt, params, mode=mode, gamma=gamma):
        tr.got(ev.token_ids)
        if ev.finished:
            tr.blocks += ev.result.stats["blocks"]
            tr.accepted += ev.result.stats["accepted_tokens"]
    tr.end = time.perf_counter()
    return tr


def http_request(client, prompt, params, mode, gamma) -> Trace:
    body = {"prompt": prompt, "max_tokens": params.max_new_tokens, "temperature": params.temperature,
            "ignore_eos": params.ignore_eos, "mode": mode, "gamma": gamma, "stream": True,
            "stream_options": {"include_usage": True}}
    tr = Trace()
    with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read()[:200]!r}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if not chunk["choices"]:                 # the final usage chunk
                tr.blocks, tr.accepted = chunk["tandem_rt"]["blocks"], chunk["tandem_rt"]["accepted_tokens"]
                continue
            ch = chunk["choices"][0]
            text = ch.get("text", "")
            if text:
                tr.times.append(time.perf_counter())
                tr.tokens.append(text)
    tr.end = time.perf_counter()
    tr.count = params.max_new_tokens       # ignore_eos: every request generates exactly this many
    return tr


def drive_while(engine, threads: list) -> None:
    """Run the engine's loop on this (the main) thread until ``threads`` end: the CPU kernels'
    OpenMP threads are cheapest there (``Engine.run_loop``)."""
    stop = threading.Event()
    waiter = threading.Thread(target=lambda: ([th.join() for th in threads], stop.set()))
    waiter.start()
    engine.run_loop(stop)
    waiter.join()


def run_closed(fn, requests: list, clients: int, engine=None) -> tuple:
    """``clients`` threads, each serving the next queued request when its last one ended (the
    engine's loop on this thread meanwhile)."""
    todo: queue.Queue = queue.Queue()
    for i, r in enumerate(requests):
        todo.put((i, r))
    out = [None] * len(requests)
    errors = []

    def client():
        while True:
            try:
                i, r = todo.get_nowait()
            except queue.Empty:
                return
            try:
                out[i] = fn(*r)
            except Exception as exc:  # reported by the caller
                errors.append(exc)
    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    drive_while(engine, threads)
    if errors:
        raise errors[0]
    return out, time.perf_counter() - t


def run_poisson(fn, requests: list, rate: float, seed: int = 0, engine=None) -> tuple:
    """Each request in its own thread, started at Poisson arrival times of ``rate`` per second."""
    rng = random.Random(seed)
    out = [None] * len(requests)
    errors = []

    def one(i, r):
        try:
            out[i] = fn(*r)
        except Exception as exc:
            errors.append(exc)
    t = time.perf_counter()
    threads = []

    def arrivals():
        at = 0.0
        for i, r in enumerate(requests):
            at += rng.expovariate(rate)
            delay = t + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            th = threading.Thread(target=one, args=(i, r))
            th.start()
            threads.append(th)
        for th in list(threads):
            th.join()
    source = threading.Thread(target=arrivals)
    source.start()
    drive_while(engine, [source])
    if errors:
        raise errors[0]
    return out, time.perf_counter() - t


def summarize(name: str, traces: list, wall: float, serial_wall: float = None, reference: list = None) -> dict:
    tokens = sum(tr.count if tr.count is not None else len(tr.tokens) for tr in traces)
    gaps = [g for tr in traces for g in tr.gaps()]
    ttft = [tr.ttft for tr in traces if tr.ttft is not None]
    blocks = sum(tr.blocks for tr in traces)
    row = {"scenario": name, "requests": len(traces), "tokens": tokens, "wall_s": wall,
           "tokens_per_s": tokens / wall if wall > 0 else 0.0,
           "speedup_vs_serial": (serial_wall / wall) if serial_wall else 1.0,
           "ttft_p50_ms": 1000 * pct(ttft, 50) if ttft else None, "ttft_p99_ms": 1000 * pct(ttft, 99) if ttft else None,
           "itl_p50_ms": 1000 * pct(gaps, 50) if gaps else None, "itl_p99_ms": 1000 * pct(gaps, 99) if gaps else None,
           "mean_accepted_per_block": (sum(tr.accepted for tr in traces) / blocks) if blocks else None}
    if reference is not None:
        row["identical_to_serial"] = all(a.tokens == b.tokens for a, b in zip(traces, reference))
    return row


LOAD_MODES = [("tandem-speed", "auto"), ("tandem-speed", 3), ("speed", "auto"), ("primary", 1), ("tandem", 3)]


def run_load(engine, url, prompts: list, n_requests: int, clients: int, cancel_frac: float, max_new: int,
             seed: int = 0) -> dict:
    """The bounded load run: ``n_requests`` from ``clients`` threads, half through the engine and
    half over HTTP (if ``url``), random modes / γ / lengths / samples; a ``cancel_frac`` share is
    cancelled (engine) or disconnected (HTTP) after a random number of events. Then checks that
    every request ended with a reason, no page leaked and the page manager's invariants hold."""
    import httpx

    from tandem_rt.engine import SamplingParams
    rng = random.Random(seed)
    plans = []
    for i in range(n_requests):
        mode, gamma = LOAD_MODES[rng.randrange(len(LOAD_MODES))]
        plans.append(dict(prompt=prompts[rng.randrange(len(prompts))], mode=mode, gamma=gamma,
                          max_new=rng.randint(1, max_new), n=rng.choice([1, 1, 1, 2]),
                          temperature=rng.choice([0.0, 0.0, 0.8]),
                          cancel_after=rng.randint(0, 4) if rng.random() < cancel_frac else None,
                          http=bool(url) and rng.random() < 0.5))
    reasons: dict = {}
    lock = threading.Lock()
    errors = []

    def note(reason):
        with lock:
            reasons[reason] = reasons.get(reason, 0) + 1

    def one(pl, client):
        sp = SamplingParams(max_new_tokens=pl["max_new"], temperature=pl["temperature"], n=pl["n"], seed=1)
        if not pl["http"]:
            h = engine.submit(pl["prompt"], sp, mode=pl["mode"], gamma=pl["gamma"])
            k = 0
            for _ in h:
                if pl["cancel_after"] is not None and k >= pl["cancel_after"]:
                    h.cancel()
                    break
                k += 1
            for r in h.results(timeout=600):
                note(r.finish_reason)
            return
        body = {"prompt": pl["prompt"], "max_tokens": pl["max_new"], "temperature": pl["temperature"], "n": pl["n"],
                "seed": 1, "mode": pl["mode"], "gamma": pl["gamma"], "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                note(f"http {resp.status_code}")
                return
            k = 0
            for line in resp.iter_lines():
                if pl["cancel_after"] is not None and k >= pl["cancel_after"]:
                    note("disconnected")
                    return                       # leaving the block closes the connection
                if line.startswith("data: {"):
                    k += 1
                    fin = json.loads(line[6:])["choices"][0]["finish_reason"]
                    if fin:
                        note(fin)

    def client_loop(c):
        with httpx.Client(base_url=url or "http://unused", timeout=600) as client:
            for i in range(c, len(plans), clients):
                try:
                    one(plans[i], client)
                except Exception as exc:
                    errors.append(repr(exc))
    t = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for th in threads:
        th.start()
    drive_while(engine, threads)
    wall = time.perf_counter() - t
    for _ in range(1000):                  # disconnected HTTP requests leave at the next iteration
        if engine.metrics()["running_sequences"] == 0 and engine.num_free_pages == engine.page_manager.num_pages:
            break
        time.sleep(0.01)
    engine.page_manager.check_invariants()
    m = engine.metrics()
    return {"requests": n_requests, "clients": clients, "cancel_fraction": cancel_frac, "wall_s": wall,
            "outcomes": reasons, "errors": errors, "pages_free_after": engine.num_free_pages,
            "pages_total": engine.page_manager.num_pages, "running_after": m["running_sequences"],
            "no_page_leaked": engine.num_free_pages == engine.page_manager.num_pages}


def start_server(engine):
    import uvicorn

    from tandem_rt.server import TandemServer
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(TandemServer(engine, "bench").app(), log_level="warning", lifespan="off"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.02)
    return server, th, url


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=None, help="default: 2 per client")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--mode", default="tandem-speed")
    ap.add_argument("--gamma", default="auto")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--rate", type=float, default=None, help="also Poisson arrivals at this many requests/s")
    ap.add_argument("--server", action="store_true", help="also through the HTTP server (closed loop)")
    ap.add_argument("--prompts", default=str(Path(__file__).with_name("serving_prompts.txt")),
                    help="one prompt per line (request i uses line i mod the count)")
    ap.add_argument("--load", type=int, default=0, help="also the bounded load run with this many requests")
    ap.add_argument("--load-clients", type=int, default=12)
    ap.add_argument("--cancel-fraction", type=float, default=0.25)
    ap.add_argument("--draft-policy", default="router", choices=["router", "cost"], help="Engine(draft_policy=...)")
    ap.add_argument("--step-prompt-rows", type=int, default=None, help="Engine(step_prompt_rows=...)")
    ap.add_argument("--out", default=None, help="JSON record to write")
    args = ap.parse_args(argv)
    from tandem_rt.engine import SamplingParams

    gamma = args.gamma if args.gamma == "auto" else int(args.gamma)
    n_req = args.requests or 2 * args.clients
    kw = {"draft_policy": args.draft_policy}
    if args.step_prompt_rows is not None:
        kw["step_prompt_rows"] = args.step_prompt_rows
    _, engine = engine_from_args(args, max_batch_size=args.clients, max_queued_requests=None, **kw)
    prompts = [line.strip() for line in open(args.prompts, encoding="utf-8") if line.strip()]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, ignore_eos=True,
                            seed=0 if args.temperature > 0 else None)
    if engine.tokenizer is not None:
        encode = lambda text: engine.tokenizer.encode(text).ids  # noqa: E731
    else:   # a checkpoint without a tokenizer (--random-checkpoint): one token id per character
        encode = lambda text: [2 + ord(ch) % (engine.vocab_size - 2) for ch in text]  # noqa: E731
    ids = [encode(prompts[i % len(prompts)]) for i in range(n_req)]
    reqs = [(engine, p, params, args.mode, gamma) for p in ids]
    engine_request(*reqs[0])                                                # warm-up
    # (every scenario runs the engine's loop on this main thread while its clients are threads)
    rows = []
    serial, serial_wall = run_closed(engine_request, reqs, 1, engine)
    rows.append(summarize("engine, serial", serial, serial_wall))
    lone_itl = rows[0]["itl_p99_ms"]
    conc, wall = run_closed(engine_request, reqs, args.clients, engine)
    rows.append(summarize(f"engine, {args.clients} clients", conc, wall, serial_wall, serial))
    if args.rate:
        pois, wall = run_poisson(engine_request, reqs, args.rate, engine=engine)
        rows.append(summarize(f"engine, Poisson {args.rate:g}/s", pois, wall, serial_wall, serial))
    if args.server:
        import httpx
        server, th, url = start_server(engine)
        texts = [prompts[i % len(prompts)] if engine.tokenizer is not None else ids[i] for i in range(n_req)]
        with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=args.clients + 4)) as c:
            hreqs = [(c, t, params, args.mode, gamma) for t in texts]
            http_serial, hs_wall = run_closed(http_request, hreqs, 1, engine)
            rows.append(summarize("HTTP, serial", http_serial, hs_wall))
            http_conc, wall = run_closed(http_request, hreqs, args.clients, engine)
            rows.append(summarize(f"HTTP, {args.clients} clients", http_conc, wall, hs_wall))
            rows[-1]["identical_to_serial"] = all("".join(a.tokens) == "".join(b.tokens)
                                                  for a, b in zip(http_conc, http_serial))
        server.should_exit = True
        th.join(timeout=10)
    load = None
    if args.load:
        server, th, url = start_server(engine)
        load = run_load(engine, url, prompts if engine.tokenizer is not None else ids, args.load, args.load_clients, args.cancel_fraction, args.max_new_tokens)
        server.should_exit = True
        th.join(timeout=10)
        # the engine serves normally afterwards: a request equals its serial output
        after = engine_request(*reqs[0])
        load["serves_normally_after"] = after.tokens == serial[0].tokens
        print(f"\nload run: {load['requests']} requests from {load['clients']} clients in {load['wall_s']:.1f} s: "
              f"{load['outcomes']}, errors {len(load['errors'])}, pages free {load['pages_free_after']}/"
              f"{load['pages_total']}, serves normally after: {load['serves_normally_after']}")
    assert engine.num_free_pages == engine.page_manager.num_pages, "pages leaked"
    engine.page_manager.check_invariants()
    head = ("scenario", "requests", "tokens", "wall_s", "tokens_per_s", "speedup_vs_serial", "ttft_p50_ms",
            "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "mean_accepted_per_block", "identical_to_serial")
    print(f"\n{args.mode}, gamma={args.gamma}, draft_policy={args.draft_policy}, {args.max_new_tokens} new tokens, {engine.dtype}, "
          f"{engine.device} ({cpu_model()}), threads={args.threads or 'default'}")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(f"{r.get(k):.3g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in head))
    if lone_itl:
        print(f"p99 inter-token latency, {args.clients} clients / serial: {rows[1]['itl_p99_ms'] / lone_itl:.2f}x")
    record = {"tool": "tools/bench_serving.py", "argv": sys.argv[1:] if argv is None else argv,
              "device": str(engine.device), "cpu": cpu_model(), "dtype": str(engine.dtype).replace("torch.", ""),
              "threads": args.threads, "draft_policy": args.draft_policy, "mode": args.mode, "gamma": args.gamma, "clients": args.clients,
              "max_new_tokens": args.max_new_tokens, "rows": rows,
              "itl_p99_ratio": (rows[1]["itl_p99_ms"] / lone_itl) if lone_itl else None,
              "load_run": load, "date": time.strftime("%Y-%m-%d")}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
