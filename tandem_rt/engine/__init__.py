"""Generation engine: every mode of a Tandem checkpoint on one shared paged KV cache.

``Engine`` (engine.py) validates requests and owns the models and pools; ``Generation``
(generation.py) is the loop of one call; ``PagedLlama`` (paged_model.py) is the one paged
forward per model; ``TandemRefresh`` (refresh.py) writes primary-derived secondary K/V.
"""
from tandem_rt.engine.engine import MODES, Engine
from tandem_rt.engine.params import SamplingParams
from tandem_rt.engine.results import Result, StreamEvent

__all__ = ["Engine", "SamplingParams", "Result", "StreamEvent", "MODES"]
