"""Shared pytest fixtures and helpers for tandem_rt tests."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from tandem_rt.config import ModelConfig, RouterConfig, TandemConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("TANDEM_RT_DATA", REPO_ROOT.parent / "shared" / "data"))

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (runs on the lent GPU machine)")
DEVICES = ["cpu"] + [pytest.param("cuda", marks=pytest.mark.cuda)] if HAS_CUDA else ["cpu"]


def tiny_model_config(vocab_size=97, hidden_size=32, layers=2, heads=4, kv_heads=2, head_dim=None,
                      intermediate_size=48, tie=True, bias=False, rope_theta=10000.0, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=head_dim, rope_theta=rope_theta, tie_word_embeddings=tie, attention_bias=bias,
                       max_position_embeddings=kw.pop("max_position_embeddings", 256),
                       bos_token_id=kw.pop("bos_token_id", 0), eos_token_id=kw.pop("eos_token_id", 1), **kw)


def tiny_tandem_config(vocab_size=97, drafter=True, router=True, dtype="float32", **kw) -> TandemConfig:
    primary = tiny_model_config(vocab_size, hidden_size=48, layers=4, heads=4, kv_heads=2, intermediate_size=96,
                                tie=kw.pop("primary_tie", False), bias=kw.pop("primary_bias", True))
    secondary = tiny_model_config(vocab_size, hidden_size=32, layers=2, heads=4, kv_heads=1, intermediate_size=64)
    drafter_cfg = tiny_model_config(vocab_size, hidden_size=32, layers=2, heads=4, kv_heads=1,
                                    intermediate_size=64) if drafter else None
    router_cfg = RouterConfig(embed_dim=secondary.hidden_size, top_k=3, hidden_size=16) if router else None
    return TandemConfig(primary=primary, secondary=secondary, drafter=drafter_cfg, router=router_cfg,
                        torch_dtype=dtype, **kw)


def random_tandem_model(seed=0, **kw):
    """A TandemModel with random weights (std large enough for non-trivial attention)."""
    from tandem_rt.models import TandemModel
    from tandem_rt.models.random_init import randomize_

    torch.manual_seed(seed)
    model = TandemModel(tiny_tandem_config(**kw))
    randomize_(model, 0.2, norm_range=(0.5, 1.5), vector_std=0.1)
    return model.eval()


@pytest.fixture
def one_torch_thread():
    """Run a test with one intra-op thread (tiny shapes: more threads only add synchronisation)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)
    yield
