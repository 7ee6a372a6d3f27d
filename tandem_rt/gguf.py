"""Import GGUF files (llama.cpp's format, ``llama`` architecture).

The file is read through :mod:`tandem_rt.gguf_index` (metadata and tensor infos without decoding
the tokenizer's strings); tensors are dequantised with the ``gguf`` package (F32, F16, BF16, Q8_0,
Q4_0, Q4_1 and every other type it implements) one at a time and copied into our decoder.

llama.cpp's ``convert_hf_to_gguf.py`` permutes the rows of the Q and K projections of
``llama`` models (per head, from rotate-half pairs ``(i, i + D/2)`` to interleaved pairs
``(2i, 2i + 1)``, the GPT-J RoPE layout llama.cpp uses). Our RoPE is rotate-half like Hugging
Face's, so :func:`unpermute_qk` undoes it.

Public API::

    gguf_model_config(path) -> ModelConfig
    load_gguf_model(path, dtype=torch.float32, progress=False) -> LlamaForCausalLM
    read_gguf_tensors(path, names) -> (ModelConfig, {name: float32 tensor})
    gguf_tokenizer_json(path) -> str
    import_gguf(primary_gguf, out_dir, secondary_gguf=None, secondary_config=None, drafter_gguf=None,
                dtype="bfloat16", layer_map=None, seed=0, progress=False) -> Path
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from tandem_rt.config import ModelConfig
from tandem_rt.importing import PathLike, build_tandem, load_named_tensors, meta_model, resolve_dtype, save_imported
from tandem_rt.models.llama import LlamaForCausalLM

SUPPORTED_ARCHITECTURES = ("llama",)

# llama.cpp tensor name -> our (Hugging Face) name; ``{i}`` is the block index
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# tensors some converters write that our model computes itself
_IGNORED = ("rope_freqs.weight",)


class _Tensor:
    """A tensor of a :class:`tandem_rt.gguf_index.GGUFIndex` in ``gguf.ReaderTensor``'s terms:
    ``name``, ``shape`` (ggml order, numpy), ``tensor_type`` (``GGMLQuantizationType``), ``n_bytes``,
    and ``data`` read from the file on access (F32 / F16 / F64 / I8..I64 as their numpy type in
    ``[outer .. inner]`` shape, other types as uint8 rows of their blocks)."""

    _ITEM = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
             "I32": np.int32, "I64": np.int64}

    def __init__(self, info, file: Path, size: int):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            self.tensor_type = GGMLQuantizationType(info.ggml_type)
        except ValueError:
            raise ValueError(f"{file}: tensor {info.name!r} has unknown ggml type {info.ggml_type}") from None
        self.name, self.file, self.offset = info.name, file, info.offset
        self.shape = np.array(info.shape, dtype=np.uint64)
        block, type_size = GGML_QUANT_SIZES[self.tensor_type]
        inner = info.shape[0]
        if inner % block:
            raise ValueError(f"{file}: tensor {info.name!r} has {inner} inputs, not a multiple of its "
                             f"{self.tensor_type.name} block of {block}")
        self.n_elements = int(np.prod(info.shape))
        self.n_bytes = self.n_elements // block * type_size
        if self.offset + self.n_bytes > size:
            raise ValueError(f"{file}: tensor {info.name!r} ({self.n_bytes} bytes at byte {self.offset}) runs past "
                             f"the end of the file ({size} bytes): the file is truncated")
        dims = tuple(reversed(info.shape))
        item = self._ITEM.get(self.tensor_type.name)
        self._dtype, self._dims = (item, dims) if item is not None else (np.uint8, dims[:-1] + (inner // block * type_size,))

    @property
    def data(self) -> np.ndarray:
        return np.memmap(self.file, dtype=self._dtype, mode="r", offset=self.offset, shape=self._dims)


class _IndexReader:
    """``.fields`` ({key: field with ``contents()``}) and ``.tensors`` ([:class:`_Tensor`]) of a GGUF
    file from :func:`tandem_rt.gguf_index.read_index` (no vocabulary strings decoded)."""

    def __init__(self, index):
        size = index.path.stat().st_size
        self.fields = index.fields
        self.tensors = [_Tensor(t, index.path, size) for t in index.tensors]


def _reader(path: PathLike) -> _IndexReader:
    from tandem_rt.gguf_index import read_index

    return _IndexReader(read_index(path))   # ValueError naming the file when it is not readable


def _field(reader, key: str, default=None, required: bool = False):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise ValueError(f"GGUF metadata has no {key!r}")
        return default
    return field.contents()


def gguf_to_hf_name(name: str) -> Optional[str]:
    """llama.cpp tensor name -> Hugging Face Llama name (None for tensors we do not use)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation.

    ``w``: ``[n_head * D, ...]`` (weight ``[n_head*D, d]`` or bias ``[n_head*D]``) in llama.cpp
    row order, where the converter did ``w.reshape(n_head, 2, D/2, ...).swapaxes(1, 2)``.
    Returns the Hugging Face (rotate-half) row order, same shape and dtype.
    """
    rest = w.shape[1:]
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def _config_from_reader(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture", required=True)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    tensors = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ValueError("GGUF file has no token_embd.weight tensor")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        raise ValueError("GGUF metadata has neither tokenizer.ggml.tokens nor a vocab_size")
    hidden = int(_field(reader, f"{arch}.embedding_length", required=True))
    heads = int(_field(reader, f"{arch}.attention.head_count", required=True))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dims = _field(reader, f"{arch}.rope.dimension_count", head_dim)
    if int(rope_dims) != head_dim:
        raise ValueError(f"GGUF {arch}.rope.dimension_count={rope_dims} differs from head_dim={head_dim}: "
                         "partial rotary embeddings are not supported")
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"GGUF {arch}.rope.scaling.type={scaling!r} is not supported (only unscaled RoPE)")
    if int(_field(reader, f"{arch}.expert_count", 0) or 0) > 0:
        raise ValueError("GGUF mixture-of-experts models are not supported")

    def token_id(key):
        value = _field(reader, key)
        return int(value) if value is not None and 0 <= int(value) < vocab else None

    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length", required=True)),
        num_hidden_layers=int(_field(reader, f"{arch}.block_count", required=True)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        bos_token_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id=token_id("tokenizer.ggml.eos_token_id"),
    )


def gguf_model_config(path: PathLike) -> ModelConfig:
    """The :class:`ModelConfig` described by a GGUF file's metadata (vocab size from its token list)."""
    return _config_from_reader(_reader(path))


def _tensor_plan(reader, cfg: ModelConfig) -> tuple[dict, list]:
    """-> (our name -> shape, [(our name, reader tensor)])."""
    shapes, plan, unknown = {}, [], []
    for t in reader.tensors:
        if t.name in _IGNORED:
            continue
        name = gguf_to_hf_name(t.name)
        if name is None:
            unknown.append(t.name)
            continue
        # ggml lists dimensions innermost first; torch wants outermost first
        shapes[name] = tuple(int(x) for x in reversed(t.shape.tolist()))
        plan.append((name, t))
    if unknown:
        raise ValueError(f"GGUF file has tensor(s) with no llama counterpart: {', '.join(unknown[:8])}")
    return shapes, plan


def _dequantised(t, name: str, cfg: ModelConfig) -> torch.Tensor:
    from gguf.quants import dequantize

    try:
        array = dequantize(t.data, t.tensor_type)
    except NotImplementedError as exc:
        raise ValueError(f"tensor {t.name}: {exc}") from None
    tensor = torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy of one tensor
    if ".self_attn.q_proj." in name:
        tensor = unpermute_qk(tensor, cfg.num_attention_heads)
    elif ".self_attn.k_proj." in name:
        tensor = unpermute_qk(tensor, cfg.num_key_value_heads)
    return tensor


def _load_into(model: LlamaForCausalLM, reader, cfg: ModelConfig, dtype: torch.dtype, where: str,
               progress: bool, desc: str) -> None:
    shapes, plan = _tensor_plan(reader, cfg)
    source = ((name, (lambda t=t, name=name: _dequantised(t, name, cfg))) for name, t in plan)
    load_named_tensors(model, shapes, source, dtype, where=where, progress=progress, desc=desc)


def load_gguf_model(path: PathLike, dtype: torch.dtype = torch.float32, progress: bool = False) -> LlamaForCausalLM:
    """Load a ``llama``-architecture GGUF file into our decoder.

    Args:
        path: the ``.gguf`` file.
        dtype: parameter dtype (float32, float16 or bfloat16); each tensor is dequantised to
            float32 by ``gguf`` and then converted.
        progress: show a tqdm bar while dequantising.
    Returns:
        :class:`LlamaForCausalLM` in eval mode; ``model(input_ids int64 [B, T])`` -> logits
        ``[B, T, V]``. Tied embeddings when the file has no ``output.weight``.
    Raises:
        ValueError naming the unsupported metadata, tensor type or missing / unexpected tensor.
    """
    dtype = resolve_dtype(dtype)
    reader = _reader(path)
    cfg = _config_from_reader(reader)
    model = meta_model(cfg, dtype)
    _load_into(model, reader, cfg, dtype, "", progress, f"dequantising {Path(path).name}")
    return model.eval()


def read_gguf_tensors(path: PathLike, names) -> tuple:
    """Some of a llama GGUF file's tensors, dequantised to float32 (Q/K rows in the Hugging Face
    order), without reading the others: what a primary served from its blocks still needs dense
    (norms, an embedding other parts share).

    Args:
        path: the GGUF file.
        names: our (Hugging Face) parameter names; ``lm_head.weight`` of a tied model is the
            embedding.
    Returns:
        ``(config, {name: float32 tensor})``: the file's :class:`ModelConfig` (from its metadata) and
        the tensors in torch's ``[outer .. inner]`` shape.
    Raises:
        ValueError naming the file and a name it does not hold.
    """
    reader = _reader(path)
    cfg = _config_from_reader(reader)
    _, plan = _tensor_plan(reader, cfg)
    by_name = dict(plan)
    if cfg.tie_word_embeddings and "model.embed_tokens.weight" in by_name:
        by_name.setdefault("lm_head.weight", by_name["model.embed_tokens.weight"])
    out = {}
    for name in names:
        if name not in by_name:
            raise ValueError(f"{path} has no tensor for parameter {name!r}")
        out[name] = _dequantised(by_name[name], name, cfg)
    return cfg, out


def gguf_tokenizer(path: PathLike):
    """A ``tokenizers.Tokenizer`` built from the GGUF metadata by transformers' GGUF conversion
    (``AutoTokenizer.from_pretrained(dir, gguf_file=name)``; reads only local files)."""
    from transformers import AutoTokenizer

    file = Path(path).resolve()
    if not file.is_file():
        raise ValueError(f"{file} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name, local_files_only=True)
    except Exception as exc:  # transformers raises many kinds for unsupported tokenizers
        raise ValueError(f"could not build a tokenizer from the metadata of {file}: {exc}") from None
    return tok.backend_tokenizer


def gguf_tokenizer_json(path: PathLike) -> str:
    """A Hugging Face ``tokenizer.json`` (as a string) from a GGUF file's tokenizer metadata."""
    return gguf_tokenizer(path).to_str()


def import_gguf(primary_gguf: PathLike, out_dir: PathLike, secondary_gguf: Optional[PathLike] = None,
                secondary_config: Optional[Union[PathLike, dict]] = None, drafter_gguf: Optional[PathLike] = None,
                dtype: Union[str, torch.dtype] = "bfloat16", layer_map: Optional[list] = None, seed: int = 0,
                progress: bool = False, quantize: Optional[str] = None) -> Path:
    """Build a tandem_rt checkpoint from GGUF files (see :func:`tandem_rt.hf.import_hf`).

    Args:
        primary_gguf: the large model's ``.gguf``.
        out_dir: checkpoint directory to write.
        secondary_gguf: a GGUF secondary; or else
        secondary_config: a freshly initialised secondary (dict of :class:`ModelConfig` fields,
            JSON file or inline JSON object; vocab size, bos/eos ids and max positions default
            to the primary's).
        drafter_gguf: optional standalone drafter.
        dtype: stored dtype; layer_map, seed: as in ``import_hf``.
    Returns:
        ``Path(out_dir)``; ``tokenizer.json`` is built from the primary's GGUF metadata when it
        has a tokenizer.
    Raises:
        ValueError when vocabulary sizes differ (naming both) or an input is unsupported.
    """
    dtype = resolve_dtype(dtype)
    if (secondary_gguf is None) == (secondary_config is None):
        raise ValueError("give exactly one of secondary_gguf and secondary_config")
    primary_reader = _reader(primary_gguf)
    primary_cfg = _config_from_reader(primary_reader)
    secondary_reader = drafter_reader = drafter_cfg = None
    secondary_cfg = secondary_config
    if secondary_gguf is not None:
        secondary_reader = _reader(secondary_gguf)
        secondary_cfg = _config_from_reader(secondary_reader)
    if drafter_gguf is not None:
        drafter_reader = _reader(drafter_gguf)
        drafter_cfg = _config_from_reader(drafter_reader)

    model, cfg = build_tandem(primary_cfg, secondary_cfg, drafter_cfg, dtype, layer_map, seed,
                              fresh_secondary=secondary_gguf is None)
    has_tokenizer = "tokenizer.ggml.tokens" in primary_reader.fields
    _load_into(model.primary, primary_reader, primary_cfg, dtype, "primary.", progress, "primary")
    del primary_reader
    if secondary_reader is not None:
        _load_into(model.secondary, secondary_reader, secondary_cfg, dtype, "secondary.", progress, "secondary")
    if drafter_reader is not None:
        _load_into(model.drafter, drafter_reader, drafter_cfg, dtype, "drafter.", progress, "drafter")
    tokenizer = gguf_tokenizer(primary_gguf) if has_tokenizer else None
    return save_imported(model, out_dir, tokenizer, dtype, quantize)


__all__ = ["gguf_model_config", "load_gguf_model", "read_gguf_tensors", "gguf_tokenizer", "gguf_tokenizer_json", "import_gguf",
           "unpermute_qk", "gguf_to_hf_name"]
