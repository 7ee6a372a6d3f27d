"""What ``Engine.generate`` returns and ``Engine.stream`` yields."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Result:
    """One generated sequence.

    Attributes:
        token_ids: generated token ids only (the stop token included when generation stopped on it).
        text: ``token_ids`` decoded with the checkpoint's tokenizer ("" without a tokenizer).
        finish_reason: ``"stop"`` (a stop / EOS token) or ``"length"`` (``max_new_tokens`` reached).
        stats: ``primary_runs``, ``secondary_runs`` (forward passes this sequence took part in; the
            prompt's prefill counts once), ``drafted_tokens``, ``accepted_tokens``, ``blocks``,
            ``accepted_per_block`` (histogram: entry ``a`` = blocks in which ``a`` drafts were
            accepted), ``mean_accepted`` (accepted drafts per block), ``wall_time_s`` (from the
            start of the call to this sequence's end), ``tokens_per_s``.
        prompt_index: which prompt of the call this sequence continues.
        sample_index: which of the ``n`` samples of that prompt.
    """

    token_ids: list
    text: str
    finish_reason: str
    stats: dict = field(default_factory=dict)
    prompt_index: int = 0
    sample_index: int = 0


@dataclass
class StreamEvent:
    """Tokens a sequence gained in one engine iteration.

    Attributes:
        index: result index (``prompt_index * n + sample_index``).
        token_ids: the new token ids.
        text: the new text (decoded delta; "" without a tokenizer).
        finished: whether the sequence has ended; then ``finish_reason`` and ``result`` are set.
    """

    index: int
    prompt_index: int
    sample_index: int
    token_ids: list
    text: str
    finished: bool = False
    finish_reason: str | None = None
    result: Result | None = None
