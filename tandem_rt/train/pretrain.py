"""Standalone causal-LM pretraining: model presets, initialisation and the CE objective."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem_rt.config import ModelConfig
from tandem_rt.models.llama import LlamaForCausalLM
from tandem_rt.train.tokenizer import EOS_ID, PAD_ID


def preset_config(name: str, vocab_size: int = 8192, max_positions: int = 2048) -> ModelConfig:
    """Model presets: ``primary`` (~6.3 M params with vocab 8192), ``secondary`` (~1.4 M).

    Both use head_dim 32 (a size the CUDA kernels support) and tied embeddings.
    """
    common = dict(vocab_size=vocab_size, head_dim=32, tie_word_embeddings=True, rope_theta=10000.0,
                  max_position_embeddings=max_positions, bos_token_id=PAD_ID, eos_token_id=EOS_ID)
    if name == "primary":
        return ModelConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=6,
                           num_attention_heads=8, num_key_value_heads=2, **common)
    if name == "secondary":
        return ModelConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, **common)
    raise ValueError(f"name must be 'primary' or 'secondary', got {name!r}")


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def init_weights(model: LlamaForCausalLM, std: float = 0.02) -> LlamaForCausalLM:
    """GPT-2 style init: N(0, std) for embeddings and linears, output projections of each block
    (``o_proj``, ``down_proj``) scaled by ``1/sqrt(2 L)``, norms at 1, biases at 0."""
    L = model.config.num_hidden_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                p.normal_(0.0, std / math.sqrt(2 * L))
            else:
                p.normal_(0.0, std)
    return model


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean CE of ``logits [B, T, V]`` predicting ``input_ids [B, T]`` shifted by one (float32)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


class CausalLMObjective(nn.Module):
    """``forward(input_ids [B, T]) -> (next-token CE, {})`` for a standalone model."""

    def __init__(self, model: LlamaForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        return next_token_ce(self.model(input_ids), input_ids), {}


def load_lm(run_dir) -> LlamaForCausalLM:
    """The standalone model of a ``tools/pretrain.py`` (or drafter-distillation) run directory.

    Reads ``ckpt.pt`` (``extra.model_config`` and the objective's weights under ``model.`` or
    ``student.``) -> float32 ``LlamaForCausalLM`` in eval mode.
    """
    from tandem_rt.train.loop import load_run_state

    state = load_run_state(run_dir)
    cfg = ModelConfig.from_dict(state["extra"]["model_config"])
    model = LlamaForCausalLM(cfg)
    prefix = state["extra"].get("prefix", "model.")
    weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    model.load_state_dict(weights)
    return model.eval()
