"""The scheduler: request queue, admission by free pages, the running batch, commits, retirement.

Only the engine's loop thread touches a :class:`Scheduler` (requests reach it through the
engine's inbox). First come, first served: a request is admitted when a batch slot and the pages
of its worst case are free (``reserved`` counts the worst-case pages of every admitted sequence,
so a running sequence never runs out of pages); its prompt is prefilled alone or in fixed chunks
inside the speculative steps (so its K/V, and therefore its output, do not depend on which prompts
arrive with it), then its ``n`` samples are forked from the processed prompt as slots free up. Sequences join and leave the running batch
between iterations; a cancelled request leaves at the next iteration boundary, its pages freed.
"""
from __future__ import annotations

import collections
import time

from tandem_rt.engine.detokenize import IncrementalDetokenizer
from tandem_rt.engine.results import Result, StreamEvent
from tandem_rt.engine.sampler import sequence_seed
from tandem_rt.engine.steps import Commit


def admission_pages(prompt_len: int, max_new_tokens: int, slack: int, page_size: int) -> int:
    """Pages a request needs free to be admitted: its prompt's, plus one sample's worst case
    (prompt + output + ``slack`` positions of a block)."""
    return -(-prompt_len // page_size) + -(-(prompt_len + max_new_tokens + slack) // page_size)


class Request:
    """One submitted prompt with its ``n`` samples (see ``Engine.submit``).

    Attributes:
        request_id: the caller's id (unique among live requests).
        prompt: token ids.
        params: its :class:`SamplingParams`; ``seed`` the resolved seed.
        mode: its :class:`~tandem_rt.engine.modes.Mode`; ``gamma`` drafts per block at most (0 for
            modes that do not draft), ``auto`` whether the router decides, ``free_token``.
        handle: the :class:`~tandem_rt.engine.requests.RequestHandle` that receives its events.
    """

    def __init__(self, request_id, prompt: list, params, mode, gamma: int, auto: bool, free_token: bool,
                 seed: int, stops: set, handle, slack: int):
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.mode = mode
        self.gamma = gamma
        self.auto = auto
        self.free_token = free_token
        self.seed = seed
        self.stops = stops
        self.handle = handle
        self.slack = slack           # positions a block may hold past the output (worst-case pages)
        self.arrival = time.perf_counter()
        self.sid = None              # the processed prompt's sequence until every sample is forked
        self.logits = None           # [V] next-token logits after the prompt
        self.prefilled = 0           # prompt rows the primary has processed inside speculative steps
        self.forked = 0
        self.reserved = 0
        self.seqs: list = []

    @property
    def cancelled(self) -> bool:
        return self.handle.cancel_requested


class Sequence:
    """One sample of a request in the running batch (the state the steps read)."""

    __slots__ = ("sid", "req", "sample", "key", "tokens", "prompt_len", "plen", "dlen", "finished",
                 "finish_reason", "stats", "reserved", "detokenizer", "first_token_time")

    def __init__(self, sid, req: Request, sample: int, reserved: int):
        self.sid = sid
        self.req = req
        self.sample = sample
        self.key = sequence_seed(req.seed, sample)
        self.tokens = list(req.prompt)
        self.prompt_len = len(req.prompt)
        self.plen = 0
        self.dlen = 0
        self.finished = False
        self.finish_reason = None
        self.reserved = reserved
        self.detokenizer = None    # IncrementalDetokenizer of a stream that wants text
        self.first_token_time = None
        self.stats = {"primary_runs": 0, "secondary_runs": 0, "drafted_tokens": 0, "accepted_tokens": 0,
                      "blocks": 0, "accepted_per_block": []}

    # the request's fields the steps read
    params = property(lambda self: self.req.params)
    mode = property(lambda self: self.req.mode)
    gamma = property(lambda self: self.req.gamma)
    auto = property(lambda self: self.req.auto)
    free_token = property(lambda self: self.req.free_token)

    @property
    def n(self) -> int:
        return len(self.tokens)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    def clip(self, new_tokens: list) -> tuple:
        """The prefix of ``new_tokens`` that would be committed -> (tokens, finish reason or None):
        up to and including a stop token, or up to the length limit."""
        out = []
        left = self.params.max_new_tokens - self.generated
        for t in new_tokens:
            out.append(int(t))
            if t in self.req.stops:
                return out, "stop"
            if len(out) >= left:
                return out, "length"
        return out, None


class Scheduler:
    """Queue, admission and the running batch of one engine.

    Args:
        page_manager: the engine's :class:`~tandem_rt.paged.PageManager`.
        max_batch_size: sequences in the running batch at most.
        tokenizer: decodes text deltas for stream events (None: no text).
    """

    def __init__(self, page_manager, max_batch_size: int, tokenizer=None):
        self.pm = page_manager
        self.max_batch_size = max_batch_size
        self.tokenizer = tokenizer
        self.waiting: collections.deque = collections.deque()
        self.prefixes: list = []       # prefilled requests with samples left to fork
        self.running: list = []
        self.reserved = 0
        self._ids = 0

    # ------------------------------------------------------------------ bookkeeping
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefixes or self.running)

    def _pages(self, n_tokens: int) -> int:
        return -(-n_tokens // self.pm.page_size)

    def worst_case_pages(self, req: Request) -> int:
        """Pages one sample of ``req`` can hold at most (prompt + output + one block's slack)."""
        return self._pages(len(req.prompt) + req.params.max_new_tokens + req.slack)

    def new_seq_id(self) -> int:
        self._ids += 1
        return self._ids

    # ------------------------------------------------------------------ admission
    def admit(self) -> list:
        """Requests to prefill now: first come, first served, while a batch slot and the pages of
        the prompt plus one sample's worst case are free. Their prompt sequences are added to the
        page manager and reserved."""
        new = []
        while self.waiting and len(self.running) + len(self.prefixes) + len(new) < self.max_batch_size:
            r = self.waiting[0]
            need = admission_pages(len(r.prompt), r.params.max_new_tokens, r.slack, self.pm.page_size)
            if self.reserved + need > self.pm.num_pages:
                break
            self.waiting.popleft()
            r.sid = self.new_seq_id()
            self.pm.add_sequence(r.sid)
            r.reserved = self._pages(len(r.prompt))
            self.reserved += r.reserved
            new.append(r)
        self.prefixes.extend(new)
        return new

    def prompt_chunks(self, budget: int, chunk: int) -> list:
        """Prompt rows to carry in this iteration's speculative step -> list of (request, start,
        end): first come, first served, each prompt in chunks at fixed boundaries (multiples of
        ``chunk``, so a prompt's rows, and therefore its K/V, never depend on what shares the
        step), at most ``budget`` rows in all (the oldest chunk always goes)."""
        out, rows = [], 0
        for r in self.prefixes:
            if r.mode.step != "verify" or r.logits is not None:
                continue
            start = r.prefilled
            end = min(len(r.prompt), start + chunk)
            if out and rows + end - start > budget:
                break
            out.append((r, start, end))
            rows += end - start
        return out

    def fork(self) -> list:
        """Fork samples of prefilled requests into the running batch while slots and pages allow ->
        list of (request, new sequences, the prompt's next-token logits ``[V]``). The last sample
        takes over the prompt's sequence."""
        out = []
        for r in list(self.prefixes):
            if r.logits is None:          # not prefilled yet
                continue
            w = self.worst_case_pages(r)
            seqs = []
            while r.forked < r.params.n and len(self.running) < self.max_batch_size \
                    and self.reserved + w <= self.pm.num_pages:
                self.reserved += w
                if r.forked == r.params.n - 1:
                    sid = r.sid
                else:
                    sid = self.new_seq_id()
                    self.pm.fork(r.sid, sid)
                s = Sequence(sid, r, r.forked, w)
                r.forked += 1
                s.plen = self.pm.primary_len(sid)
                s.dlen = self.pm.secondary_len(sid)
                s.stats["primary_runs"] = int(r.mode.target == "primary")
                s.stats["secondary_runs"] = int(r.mode.target == "secondary" or r.mode.drafter == "drafter")
                seqs.append(s)
                r.seqs.append(s)
                self.running.append(s)
            if seqs:
                out.append((r, seqs, r.logits))
            if r.forked == r.params.n:
                self.reserved -= r.reserved
                r.reserved = 0
                self.prefixes.remove(r)
                r.sid = None
                r.logits = None
        return out

    # ------------------------------------------------------------------ commits and events
    def commit(self, s: Sequence, c: Commit) -> StreamEvent:
        """Apply a step's :class:`Commit` to ``s`` -> the sequence's :class:`StreamEvent`."""
        new, reason = s.clip(c.tokens)
        st = s.stats
        st["primary_runs"] += c.primary_runs
        st["secondary_runs"] += c.secondary_runs
        st["drafted_tokens"] += c.drafted
        if c.accepted is not None:
            a = c.accepted
            st["blocks"] += 1
            st["accepted_tokens"] += a
            hist = st["accepted_per_block"]
            if len(hist) <= a:
                hist.extend([0] * (a + 1 - len(hist)))
            hist[a] += 1
        s.tokens.extend(new)
        if new and s.first_token_time is None:
            s.first_token_time = time.perf_counter()
        s.plen, s.dlen = c.plen, c.dlen
        if reason is not None:
            s.finished, s.finish_reason = True, reason
        else:
            keep = max(s.plen, s.dlen)
            self.pm.truncate(s.sid, keep)
            self.pm.set_primary_len(s.sid, min(s.plen, keep))
            self.pm.set_secondary_len(s.sid, min(s.dlen, keep))
        return self.event(s, new)

    def event(self, s: Sequence, new: list) -> StreamEvent:
        text = ""
        tok = self.tokenizer
        if tok is not None and s.req.handle.wants_text and (new or s.finished):
            if s.detokenizer is None:
                s.detokenizer = IncrementalDetokenizer(tok, start=s.prompt_len)
            text = s.detokenizer.step(s.tokens)
            if s.finished:
                text += s.detokenizer.finish(s.tokens)
        ev = StreamEvent(index=s.sample, prompt_index=0, sample_index=s.sample, token_ids=new, text=text,
                         finished=s.finished, finish_reason=s.finish_reason)
        if s.finished:
            ev.result = self.result(s)
        return ev

    def result(self, s: Sequence) -> Result:
        now = time.perf_counter()
        wall = now - s.req.arrival
        st = dict(s.stats)
        st["mean_accepted"] = st["accepted_tokens"] / st["blocks"] if st["blocks"] else 0.0
        st["wall_time_s"] = wall
        st["time_to_first_token_s"] = (s.first_token_time - s.req.arrival) if s.first_token_time else None
        st["tokens_per_s"] = s.generated / wall if wall > 0 else 0.0
        ids = s.tokens[s.prompt_len:]
        text = self.tokenizer.decode(ids) if self.tokenizer is not None else ""
        return Result(token_ids=ids, text=text, finish_reason=s.finish_reason, stats=st, prompt_index=0,
                      sample_index=s.sample)

    # ------------------------------------------------------------------ leaving
    def retire(self) -> None:
        """Free the pages of finished sequences; drop them from the batch."""
        keep = []
        for s in self.running:
            if s.finished:
                if self.pm.has_sequence(s.sid):
                    self.pm.free(s.sid)
                self.reserved -= s.reserved
            else:
                keep.append(s)
        self.running = keep

    def end_request(self, r: Request, reason: str) -> list:
        """End every sequence of ``r`` that has not finished (``reason``: ``"cancelled"`` or
        ``"error"``), unqueue it and free its pages -> the final events of its sequences, including
        samples never forked (with no tokens)."""
        events = []
        if r in self.waiting:
            self.waiting.remove(r)
        if r in self.prefixes:
            self.prefixes.remove(r)
            self.reserved -= r.reserved
            r.reserved = 0
            if r.sid is not None and self.pm.has_sequence(r.sid):
                self.pm.free(r.sid)
            r.sid = r.logits = None
        for s in r.seqs:
            if not s.finished:
                s.finished, s.finish_reason = True, reason
                events.append(self.event(s, []))
        self.retire()
        while r.forked < r.params.n:      # samples that never ran
            s = Sequence(None, r, r.forked, 0)
            r.forked += 1
            s.finished, s.finish_reason = True, reason
            r.seqs.append(s)
            events.append(self.event(s, []))
        return events

    def live_requests(self) -> list:
        """Every request with a queued, prefilled or running part (oldest first, no duplicates)."""
        seen, out = set(), []
        for r in list(self.waiting) + self.prefixes + [s.req for s in self.running]:
            if id(r) not in seen:
                seen.add(id(r))
                out.append(r)
        return out
