"""``AsyncEngine``: the engine for asyncio services (``async for event in engine.generate(...)``)."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Optional, Union

from tandem_rt.engine.engine import Engine
from tandem_rt.engine.params import DEFAULT_GAMMA, SamplingParams
from tandem_rt.engine.results import Result, StreamEvent


class AsyncEngine:
    """Wraps an :class:`Engine`; its loop thread does the work, the event loop only awaits events.

    Args:
        engine: the engine to serve (shared with synchronous callers if they like).
    """

    def __init__(self, engine: Engine):
        if not isinstance(engine, Engine):
            raise ValueError(f"engine must be an Engine, got {type(engine).__name__}")
        self.engine = engine

    @classmethod
    def from_pretrained(cls, path=None, **kwargs) -> "AsyncEngine":
        """``AsyncEngine(Engine.from_pretrained(path, **kwargs))``."""
        return cls(Engine.from_pretrained(path, **kwargs))

    async def generate(self, prompt, params: Optional[SamplingParams] = None, mode: str = "tandem-speed",
                       gamma: Union[int, str] = DEFAULT_GAMMA, free_token: bool = True,
                       request_id: Optional[str] = None) -> AsyncIterator[StreamEvent]:
        """Submit one request (as :meth:`Engine.submit`) and yield its :class:`StreamEvent` s as the
        engine commits tokens, ending after every sample's final event. Cancelling the awaiting
        task (or closing the generator early) cancels the request and frees its pages.

        Raises:
            ValueError: an invalid request (before anything is queued).
            EngineOverloaded: the engine's queue is full.
            the engine's exception if a step of this request failed.
        """
        e = self.engine
        ids, params = e.check_request(prompt, params, mode, gamma, free_token)
        if len(ids) != 1:
            raise ValueError(f"generate takes one prompt, got {len(ids)}")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        handles: list = []

        def sink(ev, exc) -> None:          # on the engine's loop thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (ev, exc))
            except RuntimeError:            # the event loop is closed: nobody awaits this request
                for h in handles:
                    h.cancel()

        handle = e._submit(ids[0], params, mode, gamma, free_token, request_id, wants_text=True, bounded=True,
                           sink=sink)
        handles.append(handle)
        left = params.n
        try:
            while left:
                ev, exc = await queue.get()
                if exc is not None:
                    raise exc
                if ev.finished:
                    left -= 1
                yield ev
        finally:
            if not handle.done:
                handle.cancel()

    async def generate_results(self, prompt, params: Optional[SamplingParams] = None, mode: str = "tandem-speed",
                               gamma: Union[int, str] = DEFAULT_GAMMA, free_token: bool = True,
                               request_id: Optional[str] = None) -> list:
        """Await every sample's :class:`Result` of one request (``params.n`` of them)."""
        out: list = []
        async for ev in self.generate(prompt, params, mode, gamma, free_token, request_id):
            if ev.finished:
                out.append(ev.result)
        return sorted(out, key=lambda r: r.sample_index)

    def abort(self, request_id) -> bool:
        """Cancel the live request ``request_id``; False when no such request is live."""
        return self.engine.abort(request_id)

    def metrics(self) -> dict:
        """:meth:`Engine.metrics`."""
        return self.engine.metrics()

    @property
    def tokenizer(self):
        return self.engine.tokenizer
