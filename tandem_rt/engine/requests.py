"""``RequestHandle``: a submitted request as seen by its caller, on any thread."""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, Optional

from tandem_rt.engine.results import Result, StreamEvent


class EngineOverloaded(RuntimeError):
    """The engine's queue holds ``max_queued_requests`` requests: try again later (HTTP 503/429)."""


class RequestHandle:
    """One request submitted with ``Engine.submit`` (``n`` samples of one prompt).

    Iterating yields its :class:`StreamEvent` s (one per sample and engine iteration that gave the
    sample tokens, then a final one per sample with ``finished`` set and its ``result``) until
    every sample has finished; it raises the engine's exception if the request failed. Every method
    is thread-safe; events are buffered, so a slow consumer never holds the engine.

    Attributes:
        request_id: the id given to ``submit`` (or generated).
        n: samples of the request.
    """

    def __init__(self, request_id, n: int, wants_text: bool = True,
                 sink: Optional[Callable[[Optional[StreamEvent], Optional[BaseException]], None]] = None):
        self.request_id = request_id
        self.n = n
        self.wants_text = wants_text
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._sink = sink
        self._results: list = [None] * n
        self._left = n
        self._error: Optional[BaseException] = None
        self._done = threading.Event()
        self._cancel = threading.Event()

    # ------------------------------------------------------------------ called by the engine loop
    def _deliver(self, ev: StreamEvent) -> None:
        if ev.finished:
            self._results[ev.sample_index] = ev.result
            self._left -= 1
        if self._sink is not None:
            self._sink(ev, None)
        else:
            self._events.put(ev)
        if ev.finished and self._left == 0:
            self._done.set()

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        if self._sink is not None:
            self._sink(None, exc)
        else:
            self._events.put(exc)
        self._done.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    # ------------------------------------------------------------------ caller API
    def cancel(self) -> None:
        """Cancel the request: it leaves the batch at the next iteration boundary, its pages are
        freed, and its unfinished samples end with ``finish_reason == "cancelled"``. No effect on
        a finished request."""
        if not self._done.is_set():
            self._cancel.set()

    @property
    def done(self) -> bool:
        """Whether every sample has finished (or the request failed)."""
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the request is done; False if ``timeout`` seconds passed first."""
        return self._done.wait(timeout)

    def results(self, timeout: Optional[float] = None) -> list:
        """Every sample's :class:`Result` (``n`` of them, by sample index); cancelled samples carry
        ``finish_reason == "cancelled"`` and the tokens they had. Raises TimeoutError after
        ``timeout`` seconds, or the engine's exception if the request failed."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id!r} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return list(self._results)

    def result(self, timeout: Optional[float] = None) -> Result:
        """The :class:`Result` of a request of one sample (``n == 1``; use :meth:`results`
        otherwise). Raises as :meth:`results`."""
        if self.n != 1:
            raise ValueError(f"request {self.request_id!r} has n={self.n} samples: use results()")
        return self.results(timeout)[0]

    def __iter__(self) -> Iterator[StreamEvent]:
        if self._sink is not None:
            raise RuntimeError("this handle delivers its events to a callback (AsyncEngine), not by iteration")
        left = self.n
        while left:
            item = self._events.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                left -= 1
            yield item
