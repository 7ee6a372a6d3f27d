"""OpenAI-compatible HTTP server over an :class:`~tandem_rt.engine.Engine` (``tandem-rt serve``).

Endpoints (docs/SERVING.md):

* ``POST /v1/completions`` and ``POST /v1/chat/completions`` — OpenAI request and response
  bodies; ``"stream": true`` answers with server-sent events (``data: {chunk}`` ... ``data: [DONE]``).
  Extra request fields: ``mode`` (a tandem_rt mode), ``gamma`` (1..31 or ``"auto"``), ``top_k``,
  ``stop_token_ids``, ``ignore_eos``. Responses carry a ``tandem_rt`` object with the drafting
  figures (drafted / accepted tokens, blocks); a stream with ``stream_options.include_usage``
  ends with a usage chunk that carries them too.
* ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format).

Every request is one ``Engine`` request of the continuous batch (``n`` samples). A client that
disconnects cancels its request. A bad request gets a 400 JSON error naming the field (404 for an
unknown model); a full queue (``max_queued_requests``) gets 503 with ``Retry-After``.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Optional

from tandem_rt.engine import AsyncEngine, Engine, EngineOverloaded, SamplingParams
from tandem_rt.engine.modes import MODES
from tandem_rt.engine.params import DEFAULT_GAMMA

DEFAULT_MAX_TOKENS = 16          # OpenAI's default for /v1/completions
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias", "response_format")


class RequestError(ValueError):
    """A bad request: HTTP ``status`` with an OpenAI-style error naming ``param``."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def _error(message: str, param: Optional[str], status: int, kind: str = "invalid_request_error"):
    from starlette.responses import JSONResponse

    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------- request bodies
def _number(body: dict, name: str, default, lo=None, hi=None, integer: bool = False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'}, got {v!r}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RequestError(f"{name} must be in [{lo}, {hi}], got {v!r}", name)
    return int(v) if integer else float(v)


def parse_sampling(body: dict, default_max_tokens: int) -> tuple:
    """OpenAI sampling fields of ``body`` -> (SamplingParams, stop strings, mode, gamma)."""
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False):
            raise RequestError(f"{name} is not supported by this server", name)
    max_tokens = _number(body, "max_completion_tokens", None, 1, None, integer=True)
    max_tokens = _number(body, "max_tokens", max_tokens or default_max_tokens, 1, None, integer=True)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestError("top_p must be in (0, 1]", "top_p")
    top_k = _number(body, "top_k", 0, 0, None, integer=True)
    n = _number(body, "n", 1, 1, 64, integer=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise RequestError(f"seed must be an integer in [0, 2**63), got {seed!r}", "seed")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = list(stop)
    else:
        raise RequestError("stop must be a string or a list of at most 4 strings", "stop")
    if any(not s for s in stops):
        raise RequestError("stop strings must not be empty", "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in stop_ids):
        raise RequestError("stop_token_ids must be a list of non-negative integers", "stop_token_ids")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RequestError("ignore_eos must be true or false", "ignore_eos")
    mode = body.get("mode", "tandem-speed")
    if mode not in MODES:
        raise RequestError(f"mode must be one of {', '.join(MODES)}, got {mode!r}", "mode")
    gamma = body.get("gamma", DEFAULT_GAMMA)
    if gamma != "auto" and (isinstance(gamma, bool) or not isinstance(gamma, int)):
        raise RequestError(f"gamma must be an integer or 'auto', got {gamma!r}", "gamma")
    try:
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed, stop_token_ids=tuple(stop_ids), n=n, ignore_eos=ignore_eos)
    except ValueError as exc:
        raise RequestError(str(exc), None) from None
    return params, stops, mode, gamma


class StopStrings:
    """Cuts a sample's text at the first stop string; holds back a tail that may start one."""

    def __init__(self, stops: list):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, delta: str, final: bool) -> str:
        """Add ``delta`` -> the text that may be sent now (all of it when ``final`` or stopped)."""
        self.text += delta
        if self.stops and not self.stopped:
            hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
        end = len(self.text) if (final or self.stopped or not self.stops) else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out


# ---------------------------------------------------------------------------------------- the app
class TandemServer:
    """The server's state: the engine, the model's name and its chat template.

    Args:
        engine: the :class:`Engine` to serve.
        model_name: the id reported by ``/v1/models`` and accepted in ``model`` fields.
        chat_template: Jinja2 chat template (None: ``/v1/chat/completions`` answers 400).
    """

    def __init__(self, engine: Engine, model_name: str = "tandem", chat_template: Optional[str] = None):
        self.engine = engine
        self.async_engine = AsyncEngine(engine)
        self.model_name = model_name
        self.chat_template = chat_template
        self.created = int(time.time())
        self.http_requests: dict = {}

    # -------------------------------------------------------------- helpers
    def _check_model(self, body: dict) -> None:
        m = body.get("model")
        if m is not None and m != self.model_name:
            raise RequestError(f"model {m!r} is not served here; this server serves {self.model_name!r}", "model", 404)

    def _chat_prompt(self, body: dict) -> str:
        from tandem_rt.chat import check_messages, render_chat

        if self.chat_template is None:
            raise RequestError("this model has no chat template: use /v1/completions", "messages")
        try:
            messages = check_messages(body.get("messages"))
        except ValueError as exc:
            raise RequestError(str(exc), "messages") from None
        tok = self.engine.tokenizer
        cfg = self.engine.model.config.primary
        name = lambda i: tok.id_to_token(i) if (tok is not None and i is not None) else ""  # noqa: E731
        try:
            return render_chat(self.chat_template, messages, name(getattr(cfg, "bos_token_id", None)),
                               name(cfg.eos_token_id))
        except ValueError as exc:
            raise RequestError(str(exc), "messages") from None

    def _prompt_ids(self, prompt) -> list:
        """A prompt's token ids (a string needs the tokenizer: a 400 without one)."""
        if not isinstance(prompt, str):
            return prompt
        if self.engine.tokenizer is None:
            raise RequestError("this model has no tokenizer: send the prompt as token ids", "prompt")
        return self.engine.tokenizer.encode(prompt).ids

    def _completion_prompt(self, body: dict):
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str) and p:
            return p
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return p
        raise RequestError("prompt must be a non-empty string or a list of token ids (one prompt per request)", "prompt")

    # -------------------------------------------------------------- endpoints
    async def completions(self, request):
        return await self._generate(request, chat=False)

    async def chat_completions(self, request):
        return await self._generate(request, chat=True)

    async def _generate(self, request, chat: bool):
        from starlette.responses import JSONResponse, StreamingResponse

        try:
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError):
                raise RequestError("the request body must be a JSON object", None) from None
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object", None)
            self._check_model(body)
            ids = self._prompt_ids(self._chat_prompt(body) if chat else self._completion_prompt(body))
            # chat without max_tokens: what the context and the page pool leave after the prompt
            default = _room_after(self.engine, len(ids)) if chat else DEFAULT_MAX_TOKENS
            params, stops, mode, gamma = parse_sampling(body, default)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise RequestError("stream must be true or false", "stream")
            opts = body.get("stream_options") or {}
            if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
                raise RequestError("stream_options must be an object with a boolean include_usage", "stream_options")
            include_usage = bool(opts.get("include_usage", False))
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            # (the engine validates the request at the generator's first step: ValueError -> 400)
            agen = self.async_engine.generate(ids, params, mode, gamma, True, request_id=rid)
            state = _Collector(params.n, stops, self.engine.tokenizer is not None)
            # the first event (or EngineOverloaded) before the response starts; the whole answer
            # when not streaming; a client that disconnects meanwhile cancels its request
            work = _first(agen) if stream else _drain(None, agen, state)
            done, first = await _unless_disconnected(request, work)
            if not done:
                await agen.aclose()
                return JSONResponse({}, status_code=499)
        except RequestError as exc:
            return _error(str(exc), exc.param, exc.status)
        except EngineOverloaded as exc:
            return _error(str(exc), None, 503, "overloaded_error")
        except ValueError as exc:
            return _error(str(exc), _param_of(str(exc)), 400)
        except Exception as exc:  # the engine failed this request's step
            return _error(f"generation failed: {exc}", None, 500, "server_error")
        n_prompt = len(ids)
        if stream:
            return StreamingResponse(self._sse(rid, chat, first, agen, state, include_usage, n_prompt),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(self._body(rid, chat, state, n_prompt))

    async def _sse(self, rid: str, chat: bool, first, agen, state, include_usage: bool = False, prompt_tokens: int = 0):
        obj = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def chunk(i: int, text: Optional[str], finish: Optional[str], role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": i, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": finish}
            return f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': self.model_name, 'choices': [choice]})}\n\n"

        try:
            if chat:
                for i in range(state.n):
                    yield chunk(i, None, None, role=True)
            ev = first
            while ev is not None:
                text, finish = state.add(ev)
                if text or finish:
                    yield chunk(ev.sample_index, text, finish)
                if state.all_stopped():
                    break
                ev = await anext(agen, None)
            if include_usage:       # OpenAI's final usage chunk (no choices), with the drafting figures
                completion = sum(state.tokens)
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                         "total_tokens": prompt_tokens + completion}
                yield f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': self.model_name, 'choices': [], 'usage': usage, 'tandem_rt': state.stats()})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await agen.aclose()        # cancels the request if it has not finished

    def _body(self, rid: str, chat: bool, state, prompt_tokens: int) -> dict:
        choices = []
        for i in range(state.n):
            text, finish = state.final(i)
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish})
            else:
                choices.append({"index": i, "text": text, "finish_reason": finish, "logprobs": None})
        completion = sum(state.tokens)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion},
                "tandem_rt": state.stats()}

    async def models(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                         "created": self.created, "owned_by": "tandem_rt"}]})

    async def health(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok"})

    async def metrics(self, request):
        from starlette.responses import PlainTextResponse

        return PlainTextResponse(prometheus_text(self.engine.metrics()), media_type="text/plain; version=0.0.4")

    def app(self):
        """The ASGI application (Starlette)."""
        from starlette.applications import Starlette
        from starlette.routing import Route

        return Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ])


class _Collector:
    """Per-sample text (cut at stop strings), finish reasons and drafting stats of one request."""

    def __init__(self, n: int, stops: list, has_tokenizer: bool):
        self.n = n
        self.cut = [StopStrings(stops) for _ in range(n)]
        self.finish = [None] * n
        self.tokens = [0] * n
        self.results = [None] * n
        self.has_tokenizer = has_tokenizer

    def add(self, ev) -> tuple:
        """An engine event -> (text to send now, finish reason or None) for its sample."""
        i = ev.sample_index
        if self.finish[i] is not None:
            return "", None
        self.tokens[i] += len(ev.token_ids)
        delta = ev.text if self.has_tokenizer else "".join(f" {t}" for t in ev.token_ids)
        text = self.cut[i].feed(delta, ev.finished)
        if self.cut[i].stopped:
            self.finish[i] = "stop"
        elif ev.finished:
            self.finish[i] = "length" if ev.finish_reason == "length" else "stop"
        if ev.finished:
            self.results[i] = ev.result
        return text, self.finish[i]

    def all_stopped(self) -> bool:
        return all(f is not None for f in self.finish)

    def final(self, i: int) -> tuple:
        return self.cut[i].text, self.finish[i]

    def stats(self) -> dict:
        rs = [r for r in self.results if r is not None]
        st = {k: sum(r.stats.get(k, 0) for r in rs) for k in ("drafted_tokens", "accepted_tokens", "blocks")}
        st["mean_accepted"] = st["accepted_tokens"] / st["blocks"] if st["blocks"] else 0.0
        return st


async def _first(agen):
    try:
        return await anext(agen)
    except StopAsyncIteration:
        return None


async def _unless_disconnected(request, coro, poll_s: float = 0.25) -> tuple:
    """Await ``coro`` unless the client disconnects first -> (True, its result) or (False, None)
    (then ``coro`` is cancelled); its exception propagates."""
    task = asyncio.ensure_future(coro)
    while not task.done():
        await asyncio.wait({task}, timeout=poll_s)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return False, None
    return True, task.result()


async def _drain(first, agen, state) -> None:
    """Feed every event of ``agen`` (after ``first``, None = start from the first) to ``state``."""
    try:
        ev = first if first is not None else await anext(agen, None)
        while ev is not None:
            state.add(ev)
            if state.all_stopped():
                break
            ev = await anext(agen, None)
    finally:
        await agen.aclose()


def _param_of(message: str) -> Optional[str]:
    """The request field an engine ValueError names (its first word), in the HTTP spelling."""
    word = message.split(" ", 1)[0].strip("'\"")
    return {"prompts[0]": "prompt", "max_new_tokens": "max_tokens", "mode": "mode", "gamma": "gamma",
            "stop_token_ids": "stop_token_ids", "unknown": "mode", "gamma='auto'": "gamma"}.get(word)


def _room_after(engine: Engine, prompt_len: int) -> int:
    """New tokens the models' context and the page pool leave after a prompt (>= 1): a chat
    request's default ``max_tokens`` (a pool reservation holds the prompt twice, the output and a
    block of up to 32 positions)."""
    cfg = engine.model.config
    ctx = min(c.max_position_embeddings for c in (cfg.primary, cfg.secondary))
    ps, pages = engine.page_manager.page_size, engine.page_manager.num_pages
    fit = (pages - -(-prompt_len // ps)) * ps - prompt_len - 32
    return max(1, min(ctx - prompt_len, fit))


def prometheus_text(m: dict) -> str:
    """:meth:`Engine.metrics` in the Prometheus text exposition format."""
    lines = []

    def metric(name: str, kind: str, help_: str, samples) -> None:
        lines.append(f"# HELP tandem_rt_{name} {help_}")
        lines.append(f"# TYPE tandem_rt_{name} {kind}")
        for labels, value in samples:
            lab = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
            lines.append(f"tandem_rt_{name}{lab} {value}")

    metric("requests_submitted_total", "counter", "Requests submitted.", [({}, m["requests_submitted"])])
    metric("requests_finished_total", "counter", "Sequences finished, by reason.",
           [({"reason": k}, v) for k, v in m["requests_finished"].items()])
    for key, help_ in (("prompt_tokens", "Prompt tokens submitted."), ("generated_tokens", "Tokens generated."),
                       ("drafted_tokens", "Draft tokens proposed."), ("accepted_tokens", "Draft tokens accepted."),
                       ("blocks", "Verify blocks run."), ("iterations", "Engine loop iterations.")):
        metric(f"{key}_total", "counter", help_, [({}, m[key])])
    acc = m["accepted_tokens"] / m["drafted_tokens"] if m["drafted_tokens"] else 0.0
    metric("acceptance_ratio", "gauge", "Accepted / drafted tokens since start.", [({}, f"{acc:.6f}")])
    metric("mean_accepted_per_block", "gauge", "Accepted drafts per verify block since start.",
           [({}, f"{(m['accepted_tokens'] / m['blocks']) if m['blocks'] else 0.0:.6f}")])
    for key, help_ in (("queue_depth", "Requests waiting for admission."),
                       ("running_sequences", "Sequences in the running batch."),
                       ("pages_in_use", "KV-cache pages in use."), ("pages_total", "KV-cache pages in the pool.")):
        metric(key, "gauge", help_, [({}, m[key])])
    return "\n".join(lines) + "\n"


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "tandem",
          chat_template: Optional[str] = None, log_level: str = "info", sock=None) -> None:
    """Run the server until interrupted: uvicorn in a thread, the engine's loop on the calling
    thread (``Engine.run_loop``: the CPU kernels' torch threads are cheapest on the main thread).
    ``sock``: an already bound socket instead of host / port."""
    import threading

    import uvicorn

    app = TandemServer(engine, model_name, chat_template).app()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off")
    server = uvicorn.Server(config)
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock] if sock is not None else None},
                            name="tandem_rt-http", daemon=True)
    stop = threading.Event()
    http.start()
    watcher = threading.Thread(target=lambda: (http.join(), stop.set()), daemon=True)
    watcher.start()             # the HTTP server ending (e.g. a bind error) ends the loop too
    try:
        engine.run_loop(stop)
    finally:                    # Ctrl-C arrives here, on the main thread
        server.should_exit = True
        http.join(timeout=30)
        engine.close()
    if not server.started:
        raise RuntimeError(f"the HTTP server did not start on {host}:{port} (see the log above)")
