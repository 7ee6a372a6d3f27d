"""Generation modes as small descriptions (docs/ENGINE.md "Modes").

A mode says which step a sequence takes part in, which model drafts for it (and so which pool
holds its drafting K/V), whether the primary's passes refresh the secondary pool, and whether its
output is the primary's (lossless). The engine never branches on a mode's name: the scheduler
groups running sequences by ``Mode.step`` and each step function reads the other fields.

Steps (``tandem_rt/engine/steps.py``):

* ``"verify"`` — :func:`~tandem_rt.engine.steps.speculative_step`: the drafting model (if any)
  drafts up to the sequence's γ tokens, one primary block verifies them (γ = 0: a plain primary
  decode step). ``primary``, ``speed`` and ``tandem-speed`` sequences of any γ share one block.
* ``"tandem"`` — :func:`~tandem_rt.engine.steps.tandem_step`: the secondary's tokens are
  committed, the primary processes them (not lossless).
* ``"decode"`` — :func:`~tandem_rt.engine.steps.decode_step`: the secondary alone decodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Mode:
    """One generation mode.

    Attributes:
        name: the mode's public name.
        step: the step its sequences take part in: ``"verify"``, ``"tandem"`` or ``"decode"``.
        target: the model whose distribution the committed tokens follow: ``"primary"`` or ``"secondary"``.
        drafter: the model that drafts, ``"secondary"`` (the Tandem secondary, on the secondary
            pool), ``"drafter"`` (the standalone drafter, on its own pool) or None.
        refresh: primary passes write primary-derived K/V into the secondary pool (Tandem modes).
        lossless: the output is exactly the primary's (drafts are verified).
    """

    name: str
    step: str
    target: str
    drafter: Optional[str]
    refresh: bool
    lossless: bool

    @property
    def drafts(self) -> bool:
        """Whether sequences of this mode draft (take a γ)."""
        return self.drafter is not None


MODE_TABLE = {
    m.name: m for m in (
        Mode("primary", step="verify", target="primary", drafter=None, refresh=False, lossless=True),
        Mode("secondary", step="decode", target="secondary", drafter=None, refresh=False, lossless=False),
        Mode("speed", step="verify", target="primary", drafter="drafter", refresh=False, lossless=True),
        Mode("tandem", step="tandem", target="primary", drafter="secondary", refresh=True, lossless=False),
        Mode("tandem-speed", step="verify", target="primary", drafter="secondary", refresh=True, lossless=True),
    )
}
MODES = tuple(MODE_TABLE)
