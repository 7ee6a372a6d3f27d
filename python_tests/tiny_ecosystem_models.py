"""Tiny random Hugging Face models and hand-written GGUF files for the import tests.

Everything here is built with transformers and the ``gguf`` writer (independent of
tandem_rt's importers), so the tests compare our loaders against the ecosystem.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Large-ish random weights (HF init gives near-uniform logits and zero biases)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
            else:  # biases
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def tiny_hf_model(kind: str = "llama", tie: bool = False, vocab: int = 101, hidden: int = 64, layers: int = 2,
                  heads: int = 4, kv_heads: int = 2, intermediate: int = 96, rope_theta: float = 5000.0,
                  seed: int = 0):
    """A random ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``MistralForCausalLM`` (fp32, eval)."""
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "mistral": ("MistralConfig", "MistralForCausalLM")}
    config_cls, model_cls = (getattr(transformers, n) for n in classes[kind])
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
              max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    if kind == "mistral":
        kw["sliding_window"] = None
    cfg = config_cls(**kw)
    # transformers 5 keeps RoPE settings in rope_parameters, 4.x in rope_theta
    if getattr(cfg, "rope_parameters", None) is not None:
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    else:
        cfg.rope_theta = rope_theta
    torch.manual_seed(seed)
    model = model_cls(cfg)
    randomize_(model, seed)
    if tie:
        model.tie_weights()
    return model.eval()


def save_hf(model, directory: Path, **kw) -> Path:
    directory = Path(directory)
    model.save_pretrained(str(directory), **kw)
    return directory


def hf_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def to_legacy_rope_config(directory: Path) -> dict:
    """Rewrite ``config.json`` in the older form: top-level ``rope_theta``, no ``rope_parameters``."""
    file = Path(directory) / "config.json"
    cfg = json.loads(file.read_text())
    params = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = params.get("rope_theta", cfg.get("rope_theta"))
    cfg["rope_scaling"] = None
    file.write_text(json.dumps(cfg))
    return cfg


# ----------------------------------------------------------------------------- GGUF

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp ``convert_hf_to_gguf.py`` ``LlamaModel.permute`` (rotate-half -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{HF_TO_GGUF[module]}.{kind}"


def write_llama_gguf(model, path: Path, quant: dict | None = None, name: str = "tiny llama") -> Path:
    """Write a transformers ``LlamaForCausalLM`` as a llama.cpp-style GGUF.

    Q/K rows are permuted like llama.cpp's converter. ``quant`` maps GGUF tensor names to a
    ``gguf.GGMLQuantizationType`` (default F32); the file carries a toy token list.
    """
    import gguf

    cfg = model.config
    theta = (cfg.rope_parameters or {}).get("rope_theta") if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    writer.add_token_scores([0.0] * cfg.vocab_size)
    writer.add_token_types([1] * cfg.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    quant = quant or {}
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf_name, w in state.items():
        if ".q_proj." in hf_name:
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif ".k_proj." in hf_name:
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        name_ = gguf_name(hf_name)
        qtype = quant.get(name_, gguf.GGMLQuantizationType.F32)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name_, np.ascontiguousarray(w, dtype=np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name_, np.ascontiguousarray(w, dtype=np.float16))
        else:
            writer.add_tensor(name_, gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype),
                              raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
