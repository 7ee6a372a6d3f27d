"""The OpenAI-compatible server, driven with a real HTTP client (httpx) on 127.0.0.1: completions
and chat (plain and server-sent events) equal the engine's own output, stop strings, models,
health and Prometheus metrics, 4xx errors naming the field, 503 on a full queue, and a client
that disconnects cancels its request (its pages freed)."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from engine_models import agreeing_tandem_model  # noqa: E402
from tandem_rt.engine import Engine, SamplingParams  # noqa: E402
from tandem_rt.server import StopStrings, TandemServer, prometheus_text  # noqa: E402

TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w1{% endif %}"


def word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(61)}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


class Served:
    def __init__(self, engine, template=TEMPLATE):
        self.engine = engine
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        app = TandemServer(engine, "tiny", template).app()
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.02)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def close(self):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def served():
    engine = Engine(agreeing_tandem_model(seed=22, layer_scale=0.4), word_tokenizer(), num_pages=128, page_size=8,
                    max_batch_size=4, max_queued_requests=2)
    s = Served(engine)
    yield s
    s.close()


def all_free(engine):
    engine.page_manager.check_invariants()
    return engine.num_free_pages == engine.page_manager.num_pages


def freed_soon(engine, timeout: float = 10.0) -> bool:
    """Whether every page is free within ``timeout`` s: a request cut by a stop string ends by the
    server's cancellation, which the engine loop carries out at its next iteration, after the
    response has gone out."""
    end = time.monotonic() + timeout
    while not all_free(engine):
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def sse(response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            out.append(line[6:])
    return out


def test_health_models_and_metrics(served):
    c = served.client
    assert c.get("/health").json() == {"status": "ok"}
    assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny"]
    c.post("/v1/completions", json={"prompt": "w5 w6", "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    text = c.get("/metrics").text
    for name in ("requests_submitted_total", "generated_tokens_total", "acceptance_ratio", "queue_depth",
                 "pages_in_use", "pages_total"):
        assert f"# TYPE tandem_rt_{name} " in text
    assert 'tandem_rt_requests_finished_total{reason="length"}' in text
    assert prometheus_text(served.engine.metrics()).count("# HELP") >= 12


def test_completion_equals_the_engine(served):
    e = served.engine
    sp = SamplingParams(max_new_tokens=9, ignore_eos=True)
    [want] = e.generate("w5 w6 w7", sp, mode="speed", gamma=2)
    body = {"model": "tiny", "prompt": "w5 w6 w7", "max_tokens": 9, "temperature": 0, "ignore_eos": True,
            "mode": "speed", "gamma": 2}
    r = served.client.post("/v1/completions", json=body).json()
    assert r["object"] == "text_completion" and r["choices"][0]["text"] == want.text
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["usage"] == {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}
    assert r["tandem_rt"]["blocks"] == want.stats["blocks"]
    # token-id prompts, and a stream whose deltas join to the same text
    assert served.client.post("/v1/completions", json={**body, "prompt": [5, 6, 7]}).json()["choices"][0]["text"] \
        == want.text
    with served.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        data = sse(resp)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    with served.client.stream("POST", "/v1/completions",
                              json={**body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        last = json.loads(sse(resp)[-2])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 9
    assert last["tandem_rt"]["accepted_tokens"] == want.stats["accepted_tokens"]
    assert all_free(e)


def test_chat_and_stop_strings(served):
    e = served.engine
    sp = SamplingParams(max_new_tokens=8, ignore_eos=True)
    [want] = e.generate("w5 w6 w1", sp, mode="tandem-speed", gamma=3)
    body = {"messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "gamma": 3}
    r = served.client.post("/v1/chat/completions", json=body).json()
    assert r["object"] == "chat.completion"
    assert r["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    with served.client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
        data = sse(resp)
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == want.text
    # a stop string cuts the text before it, streamed or not
    words = want.text.split()
    stop = " " + words[3]
    cut = want.text[:want.text.find(stop)]
    r = served.client.post("/v1/chat/completions", json={**body, "stop": stop}).json()
    assert r["choices"][0]["message"]["content"] == cut and r["choices"][0]["finish_reason"] == "stop"
    with served.client.stream("POST", "/v1/chat/completions", json={**body, "stop": [stop], "stream": True}) as resp:
        data = sse(resp)
    assert "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1]) == cut
    assert freed_soon(e)


def test_stop_strings_hold_back_a_possible_start():
    s = StopStrings(["abc"])
    assert s.feed("xxa", False) == "x"
    assert s.feed("b", False) == "x"
    assert s.feed("c tail", False) == "" and s.stopped and s.text == "xx"


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", {"prompt": "w5", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "w5", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "w5", "mode": "fast"}, 400, "mode"),
    ("/v1/completions", {"prompt": "w5", "gamma": 99}, 400, "gamma"),
    ("/v1/completions", {"prompt": "w5", "logprobs": 3}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "w5", "model": "gpt-9"}, 404, "model"),
    ("/v1/completions", {"prompt": "w5", "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "w5"}]}, 400, "messages"),
])
def test_bad_requests_name_the_field(served, path, body, status, param):
    r = served.client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
    assert all_free(served.engine)


def test_not_json_is_a_400(served):
    r = served.client.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_full_queue_gets_503_and_disconnect_cancels(served):
    e = served.engine
    long = {"prompt": "w3 w4", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "mode": "primary"}
    real = e.primary.forward
    gate = threading.Event()

    def held(*a, **k):                                 # holds the engine loop inside a forward
        gate.wait()
        time.sleep(0.005)
        return real(*a, **k)
    e.primary.forward = held
    try:
        base = e.metrics()["requests_submitted"]
        post = lambda body: httpx.post(served.url + "/v1/completions", json=body, timeout=60)  # noqa: E731
        threads = [threading.Thread(target=post, args=({**long, "max_tokens": 3},))]
        threads[0].start()
        while e.metrics()["requests_submitted"] == base:   # the first request is in its prefill, held
            time.sleep(0.01)
        for _ in range(2):                                # two more fill the queue (max_queued_requests=2)
            threads.append(threading.Thread(target=post, args=({**long, "max_tokens": 3},)))
            threads[-1].start()
        for _ in range(500):
            if e.metrics()["queue_depth"] == 2:
                break
            time.sleep(0.01)
        assert e.metrics()["queue_depth"] == 2
        r = served.client.post("/v1/completions", json=long)    # so a further request is refused at once
        assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"
        assert r.headers["retry-after"] == "1"
        gate.set()
        for t in threads:
            t.join(timeout=60)
        # a streaming client that disconnects mid-stream cancels its request
        cancelled = e.metrics()["requests_finished"]["cancelled"]
        with served.client.stream("POST", "/v1/completions", json={**long, "stream": True}) as resp:
            lines = resp.iter_lines()
            next(lines)
        for _ in range(500):
            if e.metrics()["requests_finished"]["cancelled"] > cancelled and all_free(e):
                break
            time.sleep(0.02)
        assert e.metrics()["requests_finished"]["cancelled"] == cancelled + 1
        assert all_free(e)
        # so does a client of a non-streamed request that gives up waiting
        gate.clear()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(served.url + "/v1/completions", json=long, timeout=0.5)
        gate.set()
        for _ in range(500):
            if e.metrics()["requests_finished"]["cancelled"] > cancelled + 1 and all_free(e):
                break
            time.sleep(0.02)
        assert e.metrics()["requests_finished"]["cancelled"] == cancelled + 2
        assert all_free(e)
    finally:
        gate.set()
        e.primary.forward = real
    r = served.client.post("/v1/completions", json={"prompt": "w5", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200


def test_serve_cli(tmp_path):
    """``tandem-rt serve`` on a saved checkpoint with a chat template: health, a chat completion,
    then a clean shutdown on SIGINT; a bad port is a one-line error."""
    import os
    import signal
    import subprocess
    import sys

    from tandem_rt.checkpoint import save_checkpoint

    ckpt = save_checkpoint(agreeing_tandem_model(seed=23), tmp_path / "ckpt", tokenizer=word_tokenizer())
    (ckpt / "chat_template.jinja").write_text(TEMPLATE)
    bad = subprocess.run([sys.executable, "-m", "tandem_rt.cli", "serve", "--model", str(ckpt), "--port", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--port" in bad.stderr
    with socket.socket() as busy:                      # a port already taken: a one-line error, exit 2
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = subprocess.run([sys.executable, "-m", "tandem_rt.cli", "serve", "--model", str(ckpt), "--port",
                                str(busy.getsockname()[1]), "--log-level", "critical"],
                               capture_output=True, text=True, timeout=120)
    assert taken.returncode == 2 and "did not start" in taken.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tandem_rt.cli", "serve", "--model", str(ckpt), "--port", str(port),
                             "--served-model-name", "tiny", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 4,
                             "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"][0]["message"]["content"].split()) == 4
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 130), err          # 130: interrupted (uvicorn re-raises SIGINT)
    assert "with a chat template" in err and "Traceback" not in err
