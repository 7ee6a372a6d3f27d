"""Import Hugging Face Llama / Qwen2 / Mistral / SmolLM directories.

A Hugging Face directory holds ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). Our :class:`~tandem_rt.models.LlamaForCausalLM` uses the
Hugging Face parameter names, so tensors load without renaming; RoPE is rotate-half on both
sides, so no permutation either.

Public API::

    hf_config_to_model_config(config_json: dict) -> ModelConfig
    load_hf_model(path, dtype=torch.float32, progress=False) -> LlamaForCausalLM
    import_hf(primary_dir, out_dir, secondary_dir=None, secondary_config=None, drafter_dir=None,
              dtype="bfloat16", layer_map=None, seed=0, progress=False) -> Path
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from tandem_rt.checkpoint import CheckpointError, read_safetensors_header, weight_files
from tandem_rt.config import ModelConfig
from tandem_rt.importing import (PathLike, build_tandem, load_named_tensors, meta_model, resolve_dtype,
                                 save_imported)
from tandem_rt.models.llama import LlamaForCausalLM

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
# buffers some older exports store, which our model computes instead
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _first_token_id(value, vocab_size: int) -> Optional[int]:
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size:
        return value
    return None


def _rope_theta_and_type(cfg: dict) -> tuple[float, Optional[str]]:
    """Return (rope_theta, rope type or None) from either config.json form."""
    params = cfg.get("rope_parameters")
    theta = cfg.get("rope_theta")
    rope_type = None
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        rope_type = params.get("rope_type", params.get("type"))
    elif params is not None:
        raise ValueError(f"config.json: rope_parameters must be an object, got {params!r}")
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict):
        scaling_type = scaling.get("rope_type", scaling.get("type"))
        if scaling_type not in (None, "default"):
            rope_type = scaling_type
    elif scaling is not None:
        raise ValueError(f"config.json: rope_scaling must be an object or null, got {scaling!r}")
    return (10000.0 if theta is None else float(theta)), rope_type


def hf_config_to_model_config(config_json: dict) -> ModelConfig:
    """Translate a Hugging Face ``config.json`` (as a dict) into a :class:`ModelConfig`.

    Handles Llama (SmolLM is Llama), Qwen2 (always Q/K/V bias, although its config has no
    ``attention_bias`` key) and Mistral; ``rope_theta`` at the top level or inside
    ``rope_parameters`` (transformers 5). Refuses RoPE scaling other than ``default``, biases in
    the MLP, activations other than SiLU, and a sliding window smaller than
    ``max_position_embeddings`` (a window at least that large never masks anything and is
    ignored with a warning).

    Raises:
        ValueError naming the unsupported key.
    """
    if not isinstance(config_json, dict):
        raise ValueError(f"config_json must be a dict, got {type(config_json).__name__}")
    cfg = config_json
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"config.json: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config.json: hidden_act {act!r} is not supported (only silu)")
    if cfg.get("mlp_bias"):
        raise ValueError("config.json: mlp_bias=true is not supported")
    theta, rope_type = _rope_theta_and_type(cfg)
    if rope_type not in (None, "default"):
        raise ValueError(f"config.json: RoPE scaling type {rope_type!r} is not supported "
                         "(only unscaled 'default' RoPE)")
    for key in ("partial_rotary_factor",):
        if cfg.get(key, 1.0) != 1.0:
            raise ValueError(f"config.json: {key}={cfg[key]!r} is not supported (only full rotary)")
    max_pos = int(cfg.get("max_position_embeddings", 2048))
    window = cfg.get("sliding_window")
    if window is not None and cfg.get("use_sliding_window", True):
        if int(window) < max_pos:
            raise ValueError(f"config.json: sliding_window={window} is smaller than max_position_embeddings="
                             f"{max_pos}; sliding-window attention is not supported")
        warnings.warn(f"config.json: sliding_window={window} >= max_position_embeddings={max_pos} never "
                      "masks anything; ignored", stacklevel=2)
    layer_types = cfg.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"config.json: layer_types {sorted(set(layer_types))} are not supported "
                         "(only full_attention)")
    vocab = int(cfg["vocab_size"])
    attention_bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
    if model_type == "qwen2":
        attention_bias = True
    try:
        return ModelConfig(
            vocab_size=vocab,
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=int(cfg["num_attention_heads"]),
            num_key_value_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            head_dim=cfg.get("head_dim"),
            rope_theta=theta,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            max_position_embeddings=max_pos,
            bos_token_id=_first_token_id(cfg.get("bos_token_id"), vocab),
            eos_token_id=_first_token_id(cfg.get("eos_token_id"), vocab),
        )
    except KeyError as exc:
        raise ValueError(f"config.json: missing key {exc.args[0]!r}") from None


def read_hf_config(path: PathLike) -> tuple[ModelConfig, dict]:
    """Read ``<path>/config.json`` -> (ModelConfig, tensor name -> safetensors file).

    The returned config has ``tie_word_embeddings`` set when the config says so or when the
    weights hold no ``lm_head.weight`` (the embedding matrix is then the LM head).
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    file = root / "config.json"
    if not file.is_file():
        raise ValueError(f"{root} has no config.json: not a Hugging Face model directory")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed JSON in {file}: {exc}") from None
    cfg = hf_config_to_model_config(data)
    if not (root / "model.safetensors").is_file() and not (root / "model.safetensors.index.json").is_file():
        if any(root.glob("*.bin")):
            raise ValueError(f"{root} holds PyTorch .bin weights; only safetensors are supported "
                             "(re-save with save_pretrained(safe_serialization=True))")
    files = weight_files(root)
    files = {n: f for n, f in files.items() if not n.endswith(_IGNORED_SUFFIXES)}
    if "lm_head.weight" not in files and not cfg.tie_word_embeddings:
        cfg.tie_word_embeddings = True
    if cfg.tie_word_embeddings:
        files.pop("lm_head.weight", None)  # transformers ties these too, ignoring a stored copy
    return cfg, files


def load_hf_weights(model: LlamaForCausalLM, files: dict, dtype: torch.dtype, prefix: str = "",
                    progress: bool = False, desc: str = "loading") -> None:
    """Copy safetensors tensors into ``model`` (whose parameters are allocated), converting to
    ``dtype`` one tensor at a time; ``files`` maps HF tensor names to safetensors files.

    Raises:
        ValueError naming missing or unexpected tensors and wrong shapes.
    """
    from safetensors import safe_open

    headers = {f: read_safetensors_header(f) for f in sorted(set(files.values()))}
    shapes = {}
    for name, file in files.items():
        info = headers[file].get(name)
        if info is None:
            raise CheckpointError(f"index maps tensor {name!r} to {file.name}, which does not contain it")
        shapes[name] = tuple(info["shape"])

    def source():
        by_file: dict = {}
        for name, file in files.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as fh:
                for name in names:
                    yield name, (lambda fh=fh, name=name: fh.get_tensor(name))

    load_named_tensors(model, shapes, source(), dtype, where=prefix, progress=progress, desc=desc)


def load_hf_model(path: PathLike, dtype: torch.dtype = torch.float32, progress: bool = False) -> LlamaForCausalLM:
    """Load a Hugging Face Llama / Qwen2 / Mistral / SmolLM directory into our decoder.

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` or a sharded index.
        dtype: parameter dtype (float32, float16 or bfloat16); tensors convert one at a time.
        progress: show a tqdm bar while loading.
    Returns:
        :class:`LlamaForCausalLM` in eval mode; ``model(input_ids int64 [B, T])`` -> logits
        ``[B, T, V]`` in ``dtype``.
    Raises:
        ValueError (or CheckpointError) naming the unsupported config key or the missing /
        unexpected tensor.
    """
    dtype = resolve_dtype(dtype)
    cfg, files = read_hf_config(path)
    model = meta_model(cfg, dtype)
    load_hf_weights(model, files, dtype, progress=progress, desc=f"loading {Path(path).name}")
    return model.eval()


def import_hf(primary_dir: PathLike, out_dir: PathLike, secondary_dir: Optional[PathLike] = None,
              secondary_config: Optional[Union[PathLike, dict]] = None, drafter_dir: Optional[PathLike] = None,
              dtype: Union[str, torch.dtype] = "bfloat16", layer_map: Optional[list] = None, seed: int = 0,
              progress: bool = False, quantize: Optional[str] = None) -> Path:
    """Build a tandem_rt checkpoint from Hugging Face directories.

    Args:
        primary_dir: the large model.
        out_dir: checkpoint directory to write.
        secondary_dir: a Hugging Face secondary; or else
        secondary_config: a freshly initialised secondary of this size: a dict of
            :class:`ModelConfig` fields, a JSON file, or an inline JSON object string;
            ``vocab_size``, ``bos_token_id``, ``eos_token_id`` and ``max_position_embeddings``
            default to the primary's.
        drafter_dir: optional standalone drafter (Hugging Face directory).
        dtype: stored dtype (``float32``/``float16``/``bfloat16``).
        layer_map: primary layer read by each secondary layer (default: ``default_layer_map``).
        seed: seed of the fresh projections (``normal(0, 1/sqrt(d_L))`` weights, zero bias)
            and of a fresh secondary.
        progress: show tqdm bars.
        quantize: ``"Q8_0"`` (int8) or ``"Q4_1"`` (int4 with a min): store the primary's matrices
            as GGUF blocks (weight-only; docs/CHECKPOINT.md "Quantized matrices"); None: ``dtype``.
    Returns:
        ``Path(out_dir)``. ``tokenizer.json`` is copied from ``primary_dir`` when present.
    Raises:
        ValueError when vocabulary sizes differ (naming both) or an input is unsupported.
    """
    dtype = resolve_dtype(dtype)
    if (secondary_dir is None) == (secondary_config is None):
        raise ValueError("give exactly one of secondary_dir and secondary_config")
    primary_cfg, primary_files = read_hf_config(primary_dir)
    secondary_files = drafter_files = None
    if secondary_dir is not None:
        secondary_cfg, secondary_files = read_hf_config(secondary_dir)
    else:
        secondary_cfg = secondary_config
    drafter_cfg = None
    if drafter_dir is not None:
        drafter_cfg, drafter_files = read_hf_config(drafter_dir)

    model, cfg = build_tandem(primary_cfg, secondary_cfg, drafter_cfg, dtype, layer_map, seed,
                              fresh_secondary=secondary_dir is None)
    load_hf_weights(model.primary, primary_files, dtype, "primary.", progress, "primary")
    if secondary_files is not None:
        load_hf_weights(model.secondary, secondary_files, dtype, "secondary.", progress, "secondary")
    if drafter_files is not None:
        load_hf_weights(model.drafter, drafter_files, dtype, "drafter.", progress, "drafter")
    tok = Path(primary_dir) / "tokenizer.json"
    return save_imported(model, out_dir, tok if tok.is_file() else None, dtype, quantize)


__all__ = ["hf_config_to_model_config", "load_hf_model", "import_hf", "read_hf_config", "load_hf_weights"]
