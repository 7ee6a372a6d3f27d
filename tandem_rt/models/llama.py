"""Llama-family decoder (RMSNorm, rotate-half RoPE, SwiGLU, grouped-query attention).

Parameter names follow Hugging Face ``LlamaForCausalLM`` (``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.q_proj.weight``, ..., ``lm_head.weight``) so that imported
weights load without renaming. Contiguous tensors, no KV cache: this is the reference.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem_rt.config import ModelConfig


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in float32. x: ``[..., d]``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for absolute ``positions`` (int64 ``[...]``) -> two ``[..., head_dim]``.

    Computed in float32 as Hugging Face Llama does, then cast to ``dtype``.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, T, D]`` with ``cos/sin [B or 1, T, D]`` (rotate-half convention)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_size, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.cfg.head_dim).transpose(1, 2)

    def query(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Normed input ``h [B, T, d]`` -> rotated queries ``[B, Hq, T, D]``."""
        return apply_rope(self._heads(self.q_proj(h), self.cfg.num_attention_heads), cos, sin)

    def key_value(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Normed input ``h [B, T, d]`` -> rotated keys and values, each ``[B, Hkv, T, D]``."""
        n = self.cfg.num_key_value_heads
        k = apply_rope(self._heads(self.k_proj(h), n), cos, sin)
        return k, self._heads(self.v_proj(h), n)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Softmax attention. q ``[B, Hq, T, D]``, k/v ``[B, Hkv, S, D]``, mask bool ``[.., T, S]``
        (True = attend) -> output projection applied, ``[B, T, d]``."""
        rep = self.cfg.num_attention_heads // self.cfg.num_key_value_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        B, _, T, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.cfg.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        q = self.self_attn.query(h, cos, sin)
        k, v = self.self_attn.key_value(h, cos, sin)
        x = x + self.self_attn.attend(q, k, v, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def scatter_vocab(sub_logits: torch.Tensor, vocab_subset: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits over a reduced vocabulary ``[..., N]`` with ids ``vocab_subset`` int64 ``[N]`` -> full
    ``[..., vocab_size]`` logits, ``-inf`` outside the subset."""
    full = sub_logits.new_full((*sub_logits.shape[:-1], vocab_size), float("-inf"))
    return full.index_copy_(-1, vocab_subset, sub_logits)


def causal_mask(T: int, device) -> torch.Tensor:
    """bool ``[T, T]``, True where query i may attend key p (p <= i)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM. ``model(input_ids [B, T] int64) -> logits [B, T, V]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaBackbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.output_vocab_size is not None:
            # int64 [N]: sorted distinct token ids the model predicts (a reduced draft vocabulary)
            subset = torch.empty(cfg.output_vocab_size, dtype=torch.int64)
            if subset.device.type != "meta":   # a meta arange first imports torch._decomp (~0.45 s)
                torch.arange(cfg.output_vocab_size, out=subset)
            self.register_buffer("vocab_subset", subset)
        else:
            self.vocab_subset = None

    @property
    def output_weight(self) -> torch.Tensor:
        """``[V, d]``: the LM head (the embedding matrix when tied)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def subset_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head rows of ``vocab_subset``: ``[..., d]`` -> ``[..., N]`` (``[..., V]``
        without a reduced vocabulary)."""
        w = self.output_weight
        if self.vocab_subset is not None:
            w = w.index_select(0, self.vocab_subset)
        return F.linear(self.model.norm(x), w)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: residual ``[..., d]`` -> logits ``[..., V]``; with a reduced
        vocabulary every token outside ``vocab_subset`` gets ``-inf`` (probability 0)."""
        if self.vocab_subset is None:
            return F.linear(self.model.norm(x), self.output_weight)
        return scatter_vocab(self.subset_logits(x), self.vocab_subset, self.config.vocab_size)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        return rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype)

    def forward(self, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None,
                hidden_layers: Optional[Sequence[int]] = None, reduced: bool = False):
        """Causal forward.

        Args:
            input_ids: int64 ``[B, T]``.
            positions: int64 ``[B, T]`` or ``[T]`` absolute positions (default ``0..T-1``).
            hidden_layers: residual streams to return; ``0`` is the embedding output and
                ``L`` the last block's output before the final norm.
            reduced: logits over ``vocab_subset`` only (``[B, T, N]``; training a drafter with a
                reduced vocabulary), not scattered to the full vocabulary.
        Returns:
            logits ``[B, T, V]``, or ``(logits, [x^(l) [B, T, d] for l in hidden_layers])``.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device)
        if positions.dim() == 1:
            positions = positions.unsqueeze(0)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        mask = causal_mask(T, x.device)
        wanted = set(hidden_layers or ())
        saved = {0: x} if 0 in wanted else {}
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask)
            if i + 1 in wanted:
                saved[i + 1] = x
        logits = self.subset_logits(x) if reduced else self.logits(x)
        if hidden_layers is None:
            return logits
        return logits, [saved[l] for l in hidden_layers]
