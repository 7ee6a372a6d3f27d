"""Generation engine: every mode of a Tandem checkpoint on one shared paged KV cache.

Where each step of the data flow lives (docs/ENGINE.md):

* ``engine.py`` — ``Engine``: validation, ``submit`` / ``generate`` / ``stream``, the loop thread.
* ``scheduler.py`` — the request queue, admission by free pages, the running batch, commits.
* ``steps.py`` — prefill, draft, verify (speculative step), Tandem step, plain decode.
* ``model_runner.py`` — the models, pools, CUDA graphs and the one step function.
* ``modes.py`` — the modes as descriptions; ``sampler.py`` — per-sequence sampling state.
* ``paged_model.py`` — the paged forward per model; ``refresh.py`` — the Tandem refresh;
  ``verification.py`` — the verify op on a block; ``requests.py`` — ``RequestHandle``;
  ``async_engine.py`` — ``AsyncEngine`` for asyncio services.
"""
from tandem_rt.engine.engine import MODES, Engine
from tandem_rt.engine.async_engine import AsyncEngine
from tandem_rt.engine.params import SamplingParams
from tandem_rt.engine.requests import EngineOverloaded, RequestHandle
from tandem_rt.engine.results import Result, StreamEvent

__all__ = ["Engine", "AsyncEngine", "SamplingParams", "Result", "StreamEvent", "MODES", "RequestHandle", "EngineOverloaded"]
