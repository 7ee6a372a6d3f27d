"""Shared pieces of the Hugging Face and GGUF importers.

Models are built on the ``meta`` device in the target dtype and then allocated once
(``to_empty``), so importing never holds a second full copy of the weights: each source
tensor is read (or dequantised), converted and copied into place one at a time.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch

from tandem_rt.checkpoint import materialize, save_checkpoint, skip_param_init
from tandem_rt.config import ModelConfig, TandemConfig
from tandem_rt.dtypes import default_dtype, dtype_name, resolve_dtype  # noqa: F401 (re-exported)
from tandem_rt.models.llama import LlamaForCausalLM
from tandem_rt.models.tandem import TandemModel

PathLike = Union[str, os.PathLike]
# secondary / drafter fields that default to the primary's when a fresh config omits them
INHERITED_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "max_position_embeddings")


def meta_model(cfg: ModelConfig, dtype: torch.dtype) -> LlamaForCausalLM:
    """A decoder with allocated but uninitialised ``dtype`` parameters on the CPU."""
    with torch.device("meta"), default_dtype(dtype), skip_param_init():
        model = LlamaForCausalLM(cfg)
    return materialize(model, "cpu")


def _names(names: list, limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_named_tensors(model: torch.nn.Module, shapes: dict, source: Iterable, dtype: torch.dtype,
                       where: str = "", progress: bool = False, desc: str = "loading") -> None:
    """Fill every parameter of ``model`` from ``source``.

    Args:
        model: module with allocated parameters (names as in its ``state_dict``).
        shapes: every source tensor name -> shape (checked against the model before reading).
        source: iterable of ``(name, get)`` where ``get()`` returns the tensor (read lazily).
        dtype: target dtype; each tensor converts on its own.
        where: prefix for error messages (``"primary."``).
    Raises:
        ValueError naming missing or unexpected tensors or a shape mismatch.
    """
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    missing = sorted(n for n in expected if n not in shapes)
    unexpected = sorted(n for n in shapes if n not in expected)
    if missing:
        raise ValueError(f"{desc}: missing tensor(s) {_names([where + n for n in missing])}")
    if unexpected:
        raise ValueError(f"{desc}: unexpected tensor(s) {_names([where + n for n in unexpected])}")
    for name, shape in shapes.items():
        if tuple(shape) != expected[name]:
            raise ValueError(f"{desc}: tensor {where + name} has shape {list(shape)}, expected "
                             f"{list(expected[name])} from the config")
    from tqdm.auto import tqdm

    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, get in tqdm(source, total=len(shapes), desc=desc, unit="tensor", disable=not progress):
            tensor = get()
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{desc}: tensor {where + name} holds shape {list(tensor.shape)}, "
                                 f"expected {list(expected[name])}")
            params[name].copy_(tensor.to(dtype))
            del tensor


def parse_model_config(spec: Union[PathLike, dict, ModelConfig], primary: ModelConfig,
                       what: str = "secondary_config") -> ModelConfig:
    """A fresh model's config from a dict, a JSON file or an inline JSON object string.

    ``vocab_size``, ``bos_token_id``, ``eos_token_id`` and ``max_position_embeddings``
    default to the primary's (the models share one tokenizer).
    """
    if isinstance(spec, ModelConfig):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        text = str(spec).strip() if isinstance(spec, str) else ""
        if text.startswith("{"):
            source = "inline JSON"
        else:
            file = Path(spec)
            if not file.is_file():
                raise ValueError(f"{what}: {file} is neither a JSON file nor an inline JSON object")
            text, source = file.read_text(), str(file)
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what}: malformed JSON in {source}: {exc}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{what}: expected a JSON object of model config fields, got {type(spec).__name__}")
    data = dict(spec)
    for name in INHERITED_FIELDS:
        data.setdefault(name, getattr(primary, name))
    return ModelConfig.from_dict(data, what)


def check_vocab(primary: ModelConfig, other: Optional[ModelConfig], role: str) -> None:
    if other is not None and other.vocab_size != primary.vocab_size:
        raise ValueError(f"vocabulary sizes differ: primary has {primary.vocab_size} tokens, {role} has "
                         f"{other.vocab_size}; a tandem pair must share one tokenizer")


def init_fresh_decoder(model: LlamaForCausalLM, generator: torch.Generator, std: float = 0.02) -> None:
    """Hugging Face style init: normal(0, std) matrices and embeddings, unit norms, zero biases."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            else:
                p.zero_()


def init_projections(model: TandemModel, generator: torch.Generator) -> None:
    """``proj_j``: weight ``[d_S, d_L]`` ~ normal(0, 1/sqrt(d_L)), bias zero."""
    d_L = model.config.primary.hidden_size
    with torch.no_grad():
        for proj in model.tandem.proj:
            proj.weight.copy_(torch.randn(proj.weight.shape, generator=generator) / math.sqrt(d_L))
            if proj.bias is not None:
                proj.bias.zero_()


def build_tandem(primary: ModelConfig, secondary, drafter: Optional[ModelConfig], dtype: torch.dtype,
                 layer_map: Optional[list], seed: int, fresh_secondary: bool) -> tuple:
    """Allocate a :class:`TandemModel` in ``dtype`` with fresh projections (and a fresh secondary
    when ``fresh_secondary``); the primary (and a loaded secondary / drafter) stay uninitialised
    for the caller to fill. Returns ``(model, TandemConfig)``."""
    if not isinstance(secondary, ModelConfig):
        secondary = parse_model_config(secondary, primary)
    check_vocab(primary, secondary, "secondary")
    check_vocab(primary, drafter, "drafter")
    if layer_map is not None:
        layer_map = [int(x) for x in layer_map]
    cfg = TandemConfig(primary=primary, secondary=secondary, layer_map=layer_map, drafter=drafter,
                       torch_dtype=dtype_name(dtype))
    with torch.device("meta"), default_dtype(dtype), skip_param_init():
        model = TandemModel(cfg)
    model = materialize(model, "cpu")
    gen = torch.Generator().manual_seed(seed)
    init_projections(model, gen)
    if fresh_secondary:
        init_fresh_decoder(model.secondary, gen)
    return model, cfg


def save_imported(model: TandemModel, out_dir: PathLike, tokenizer, dtype: torch.dtype,
                  quantize: Optional[str] = None) -> Path:
    """Write the checkpoint (``tokenizer``: a tokenizer.json path, a ``tokenizers.Tokenizer`` or None;
    ``quantize``: ``"Q8_0"`` / ``"Q4_1"`` stores the primary's matrices as GGUF blocks)."""
    return save_checkpoint(model.eval(), out_dir, tokenizer=tokenizer, dtype=dtype, quantize=quantize)
