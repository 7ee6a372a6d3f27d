"""tandem_rt: fast LLM decoding with Tandem Transformers on a paged KV cache.

Public API::

    tandem_rt.load_checkpoint(path, device="cpu", dtype=None) -> TandemModel
    tandem_rt.save_checkpoint(model, path, tokenizer=None)
    tandem_rt.build_info() -> dict
"""
from tandem_rt.version import __version__
from tandem_rt._ext import _C
from tandem_rt.config import ConfigError, ModelConfig, RouterConfig, TandemConfig
from tandem_rt.models import LlamaForCausalLM, TandemModel, TandemOutput
from tandem_rt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tandem_rt.engine import AsyncEngine, Engine, SamplingParams


_LAZY_SUBMODULES = ("hf", "gguf")  # import paths: loaded on first access (``tandem_rt.hf.load_hf_model``)


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"tandem_rt.{name}")
    raise AttributeError(f"module 'tandem_rt' has no attribute {name!r}")


def build_info() -> dict:
    """Build information of the native extension (see ``tandem_rt._C.build_info``)."""
    return _C.build_info()


__all__ = ["__version__", "build_info", "ConfigError", "ModelConfig", "RouterConfig", "TandemConfig",
           "LlamaForCausalLM", "TandemModel", "TandemOutput", "CheckpointError", "load_checkpoint",
           "save_checkpoint", "Engine", "AsyncEngine", "SamplingParams"]
