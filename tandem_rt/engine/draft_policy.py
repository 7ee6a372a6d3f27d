"""When a ``gamma="auto"`` sequence stops drafting: the router alone, or the router and the batch's cost.

``draft_policy="router"`` (the default): a sequence drafts another token while the router's
predicted acceptance ``α = 1 - tv`` of its last draft is at least the checkpoint's threshold (the
threshold is chosen for a lone request, ``tools/choose_router_threshold.py``).

``draft_policy="cost"``: additionally, a draft is kept only while ``p >= c · R``, where ``p`` is
the predicted probability that it and every earlier draft of the block are accepted (the product
of their ``α``: the probability that its verify row brings a token), ``c`` the measured seconds
one more verify row adds to a speculative step and ``R`` the batch's measured tokens per second.
A row pays when its expected extra tokens per added second beat the batch's rate: alone on a
memory-bound CPU a row costs almost nothing and the rule never binds; a large batch makes every
row compute and the rule shortens the drafts, down to none (plain decoding). The first draft is
judged too (after the drafting step that made it, whose cost is the drafter's, not the
primary's).
``c`` and ``R`` come from :class:`StepCostModel`, fitted online to the engine's own steps.

The cost rule makes draft lengths depend on timing and on the other requests, so it is opt-in:
greedy outputs stay exact (lossless), but a seeded *sampled* ``gamma="auto"`` request is then no
longer reproducible token for token across batches (its distribution stays the primary's).
"""
from __future__ import annotations

POLICIES = ("router", "cost")


class StepCostModel:
    """Exponentially weighted least squares of speculative-step seconds on verify rows, and the
    batch's tokens per second, over the recent steps.

    Args:
        decay: weight of the past per new step (0.9: about the last 10 steps).
    """

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.sw = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.tokens = self.seconds = 0.0

    def add(self, rows: int, seconds: float, tokens: int) -> None:
        """One speculative step: ``rows`` verify rows took ``seconds`` and committed ``tokens``."""
        d = self.decay
        self.sw = d * self.sw + 1.0
        self.sx = d * self.sx + rows
        self.sy = d * self.sy + seconds
        self.sxx = d * self.sxx + rows * rows
        self.sxy = d * self.sxy + rows * seconds
        self.tokens = d * self.tokens + tokens
        self.seconds = d * self.seconds + seconds

    def row_cost(self) -> float:
        """Seconds one more verify row adds (>= 0; 0 until the rows have varied)."""
        var = self.sxx * self.sw - self.sx * self.sx
        if self.sw < 2 or var <= 1e-9 * max(self.sw * self.sxx, 1.0):
            return 0.0
        return max(0.0, (self.sxy * self.sw - self.sx * self.sy) / var)

    def rate(self) -> float:
        """The batch's tokens per second."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def min_accept(self) -> float:
        """``c · R``: the smallest expected accepted tokens a further verify row must bring."""
        return self.row_cost() * self.rate()
