"""Incremental detokenization: the text delta of each stream event without decoding the whole
sequence every time (the prefix-window scheme of vLLM / TGI).

The decoder is run on a window ``ids[prefix:]`` and on its already-emitted part
``ids[prefix:read]``; the difference is the new text, held back while it ends in an incomplete
UTF-8 character (U+FFFD), and the window then moves up to ``read``. A window keeps the token
before the new ones so that decoders which join tokens (a space between words, a stripped leading
space) produce the same text as a full decode. :meth:`finish` returns whatever the full decode
has beyond the deltas, so the deltas of a stream concatenate to ``tokenizer.decode(ids)``.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas of one growing token list.

    Args:
        tokenizer: an object with ``decode(list[int]) -> str`` (a ``tokenizers.Tokenizer``).
        start: index of the first token of the text in the lists given to :meth:`step` /
            :meth:`finish` (a sequence's prompt length: its text is that of the generated tokens),
            so that callers pass their growing list without copying it.
    """

    __slots__ = ("tokenizer", "start", "prefix", "read", "emitted")

    def __init__(self, tokenizer, start: int = 0):
        self.tokenizer = tokenizer
        self.start = start
        self.prefix = start  # the window's first token
        self.read = start    # tokens whose text has been emitted
        self.emitted = []    # the deltas so far

    def step(self, ids: list) -> str:
        """The new text of ``ids[start:]`` (the token list so far, grown since the last call)."""
        if len(ids) <= self.read:
            return ""
        decode = self.tokenizer.decode
        before = decode(ids[self.prefix:self.read]) if self.read > self.prefix else ""
        now = decode(ids[self.prefix:])
        if len(now) <= len(before) or now.endswith(REPLACEMENT) or not now.startswith(before):
            return ""         # an incomplete character (or a decoder that rewrote the window): wait
        self.prefix, self.read = self.read, len(ids)
        delta = now[len(before):]
        self.emitted.append(delta)
        return delta

    def finish(self, ids: list) -> str:
        """The rest of the text once ``ids`` is complete: ``decode(ids[start:])`` minus the deltas
        emitted (when a decoder rewrote emitted text, which cannot be taken back, the part past
        their length)."""
        full = self.tokenizer.decode(ids[self.start:])
        done = "".join(self.emitted)
        rest = full[len(done):]
        self.emitted.append(rest)
        self.read = self.prefix = len(ids)
        return rest
