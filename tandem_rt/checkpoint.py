"""Checkpoint I/O: ``tandem_config.json`` + safetensors (single file or shards) + ``tokenizer.json``.

Loading is lazy (``safe_open``), converts dtype tensor by tensor (never two full copies of
the weights) and validates everything, raising :class:`CheckpointError` naming the problem.
Saving writes each file under a temporary name first, so an interrupted save never leaves a
half-written file under a final name.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tandem_rt.config import ConfigError, TandemConfig
from tandem_rt.dtypes import default_dtype, dtype_name, resolve_dtype
from tandem_rt.models.tandem import TandemModel

CONFIG_NAME = "tandem_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """The checkpoint is missing, malformed or does not match its config."""


# ----------------------------------------------------------------------------- reading

def read_config(path: PathLike) -> TandemConfig:
    """Parse and validate ``<path>/tandem_config.json``."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{file} does not exist: not a tandem_rt checkpoint directory")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"malformed JSON in {file}: {exc}") from None
    try:
        return TandemConfig.from_dict(data)
    except ConfigError as exc:
        raise CheckpointError(f"invalid {file}: {exc}") from None


def read_safetensors_header(file: Path) -> dict:
    """Validate a safetensors file's framing and return ``{name: {dtype, shape, data_offsets}}``."""
    size = file.stat().st_size
    if size < 8:
        raise CheckpointError(f"{file} is truncated ({size} bytes; a safetensors file starts with an 8-byte header size)")
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > size - 8:
            raise CheckpointError(f"{file}: header size {n} is larger than the file ({size} bytes): truncated or corrupt")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: corrupt header entry for tensor {name!r}") from None
        if not (isinstance(dtype, str) and isinstance(shape, list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
                and all(isinstance(o, int) and not isinstance(o, bool) for o in (start, end)) and 0 <= start <= end):
            raise CheckpointError(f"{file}: corrupt header entry for tensor {name!r} (dtype {dtype!r}, shape {shape!r}, "
                                  f"data_offsets {info['data_offsets']!r})")
        if end > data_size:
            raise CheckpointError(f"{file}: tensor {name!r} ends at byte {end} of the data section, which has only "
                                  f"{data_size} bytes: the file is truncated")
        if dtype in _ST_ITEMSIZE and end - start != math.prod(shape) * _ST_ITEMSIZE[dtype]:
            raise CheckpointError(f"{file}: tensor {name!r} has {end - start} bytes but shape {shape} of {dtype} "
                                  f"needs {math.prod(shape) * _ST_ITEMSIZE[dtype]}: corrupt")
    return header


def weight_files(path: PathLike) -> dict:
    """Map every tensor name to the safetensors file holding it (single file or index + shards)."""
    root = Path(path)
    index = root / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"malformed {index}: {exc!r}") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"malformed {index}: weight_map must be an object of tensor name -> shard file, "
                                  f"got {type(weight_map).__name__}")
        inside = root.resolve()
        files = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard:
                raise CheckpointError(f"malformed {index}: tensor {name!r} maps to {shard!r}, not a file name")
            file = root / shard
            try:
                resolved = file.resolve()
            except OSError as exc:  # e.g. a name longer than the file system allows
                raise CheckpointError(f"{index} maps tensor {name!r} to an unusable shard path {shard[:80]!r}: "
                                      f"{exc.strerror}") from None
            if Path(shard).is_absolute() or inside not in resolved.parents:
                raise CheckpointError(f"{index} maps tensor {name!r} to {shard!r}, which is outside the checkpoint "
                                      f"directory {root}: refused")
            files[name] = file
        for shard in sorted(set(files.values())):
            try:
                exists = shard.is_file()
            except OSError as exc:
                raise CheckpointError(f"{index} names shard {shard.name[:80]!r}, which cannot be opened: "
                                      f"{exc.strerror}") from None
            if not exists:
                raise CheckpointError(f"{index} names shard {shard.name}, which does not exist")
        return files
    single = root / WEIGHTS_NAME
    if not single.is_file():
        raise CheckpointError(f"{root} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    return {name: single for name in read_safetensors_header(single)}


def not_stored(cfg: TandemConfig, names) -> set:
    """Which of a model's tensor ``names`` a checkpoint with ``cfg`` does not store: the primary's
    when it is referenced by source, and the token embeddings of parts that share the primary's."""
    skip = {n for n in names if cfg.primary_source is not None and n.startswith("primary.")}
    skip |= {f"{part}.model.embed_tokens.weight" for part in cfg.shared_embeddings}
    return skip


_PARAM_INITS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                "xavier_normal_", "trunc_normal_", "zeros_", "ones_", "constant_")


@contextlib.contextmanager
def skip_param_init():
    """``torch.nn.init``'s initialisers as no-ops while a model whose weights come from a checkpoint
    is built on the meta device (``normal_`` on a meta tensor imports ``torch._dynamo``, 1–2 s of a
    cold start). Not for concurrent use with code that initialises parameters in another thread."""
    saved = {name: getattr(torch.nn.init, name) for name in _PARAM_INITS}
    try:
        for name in _PARAM_INITS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def materialize(module: torch.nn.Module, device: Union[str, torch.device]) -> torch.nn.Module:
    """``module.to_empty(device=device)`` for a module built on the meta device: every parameter and
    buffer allocated, uninitialised, with its shape and dtype. ``torch.empty`` instead of
    ``to_empty``'s ``empty_like``, whose Python reference on a meta tensor imports sympy (~0.45 s
    of a cold start)."""
    return module._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu",
                    dtype: Optional[Union[str, torch.dtype]] = None,
                    derived_cache: Optional[PathLike] = None, skip_values: Optional[set] = None) -> TandemModel:
    """Load a tandem_rt checkpoint directory into a :class:`TandemModel` (eval mode).

    Args:
        path: checkpoint directory.
        device: where the weights go.
        dtype: float32/float16/bfloat16 (torch dtype or name); default: the config's ``torch_dtype``.
        derived_cache: directory for weights derived from a referenced primary source (its
            dequantised tensors, keyed by the source's sha256); default
            :func:`tandem_rt.primary_source.default_derived_cache`.
        skip_values: parameter names (``primary.…``) whose values are not read: the tensors are
            allocated and checked like the others but left uninitialised (their memory is not
            touched), for weights a caller serves otherwise (the quantized engine's blocks).
    Raises:
        CheckpointError naming the missing, unexpected or malformed file or tensor, or a
        referenced primary source that is missing or whose sha256 does not match.
    """
    cfg = read_config(path)
    dtype = cfg.dtype if dtype is None else resolve_dtype(dtype)
    device = torch.device(device)
    files = weight_files(path)
    headers = {f: read_safetensors_header(f) for f in sorted(set(files.values()))}

    with torch.device("meta"), default_dtype(dtype), skip_param_init():
        model = TandemModel(cfg)
    state = model.state_dict()
    skip = not_stored(cfg, state)
    expected = {n: t for n, t in state.items() if n not in skip}
    for name, qtype in cfg.quantized.items():     # stored as GGUF blocks under <name>.qblocks
        if name not in expected:
            raise CheckpointError(f"{CONFIG_NAME}: quantized names {name!r}, which is not a stored parameter")
        t = expected.pop(name)
        if t.dim() != 2 or t.shape[1] % 32:
            raise CheckpointError(f"{CONFIG_NAME}: quantized names {name!r} of shape {list(t.shape)}; "
                                  "only matrices with a multiple of 32 inputs are stored as blocks")
        expected[name + QBLOCKS] = torch.empty(t.shape[0], t.shape[1] // 32 * QUANT_BLOCK_BYTES[qtype],
                                               dtype=torch.uint8, device="meta")
    missing = [n for n in expected if n not in files]
    unexpected = [n for n in files if n not in expected]
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing tensor(s) {missing[:8]}"
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    if unexpected:
        raise CheckpointError(f"checkpoint {path} has unexpected tensor(s) {unexpected[:8]}"
                              + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))
    for name, file in files.items():
        info = headers[file].get(name)
        if info is None:
            raise CheckpointError(f"index maps tensor {name!r} to {file.name}, which does not contain it")
        if name.endswith(".vocab_subset"):
            if info["dtype"] != "I64":
                raise CheckpointError(f"tensor {name!r} in {file.name} has dtype {info['dtype']}; expected I64 token ids")
        elif name.endswith(QBLOCKS):
            if info["dtype"] != "U8":
                raise CheckpointError(f"tensor {name!r} in {file.name} has dtype {info['dtype']}; expected U8 "
                                      f"{cfg.quantized[name[:-len(QBLOCKS)]]} blocks")
        elif info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {file.name} has dtype {info['dtype']}; expected a float dtype")
        if list(info["shape"]) != list(expected[name].shape):
            raise CheckpointError(f"tensor {name!r} in {file.name} has shape {info['shape']}, "
                                  f"expected {list(expected[name].shape)} from {CONFIG_NAME}")

    model = materialize(model, device)
    params = dict(model.named_parameters())
    params.update({n: b for n, b in model.named_buffers() if n.endswith(".vocab_subset")})
    by_file: dict = {}
    skip_values = set(skip_values or ())
    for name, file in files.items():
        if name in skip_values or (name.endswith(QBLOCKS) and name[:-len(QBLOCKS)] in skip_values):
            continue
        by_file.setdefault(file, []).append(name)
    with torch.no_grad():
        for file, names in by_file.items():
            try:
                with safe_open(str(file), framework="pt", device="cpu") as fh:
                    for name in names:
                        t = fh.get_tensor(name)
                        if name.endswith(".vocab_subset"):
                            _check_vocab_subset(t, name, file, cfg)
                            params[name].copy_(t)
                        elif name.endswith(QBLOCKS):
                            params[name[:-len(QBLOCKS)]].copy_(_dequantize_blocks(t, name, file, cfg, dtype))
                        else:
                            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                                bad = int((~torch.isfinite(t)).sum())
                                raise CheckpointError(f"tensor {name!r} in {file.name} holds {bad} NaN or infinite "
                                                      "value(s): refusing a model that would emit garbage")
                            params[name].copy_(t.to(dtype))
            except CheckpointError:
                raise
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"could not read {file}: {exc}") from None
        if cfg.primary_source is not None:
            from tandem_rt.primary_source import load_referenced_primary

            load_referenced_primary(model.primary, cfg.primary_source, Path(path), dtype, derived_cache,
                                    skip={n[len("primary."):] for n in skip_values if n.startswith("primary.")})
        for part in cfg.shared_embeddings:
            getattr(model, part).model.embed_tokens.weight.copy_(model.primary.model.embed_tokens.weight)
    return model.eval()


QBLOCKS = ".qblocks"       # suffix of a matrix stored as GGUF blocks (cfg.quantized)
QUANT_BLOCK_BYTES = {"Q8_0": 34, "Q4_1": 20}


def _dequantize_blocks(blocks: torch.Tensor, name: str, file: Path, cfg: TandemConfig, dtype) -> torch.Tensor:
    """The dense weight of stored blocks (refusing non-finite block scales)."""
    from tandem_rt.quantized import dequantize, make_quant_matrix

    qtype = cfg.quantized[name[:-len(QBLOCKS)]]
    w = dequantize(make_quant_matrix(blocks, qtype, blocks.shape[1] // QUANT_BLOCK_BYTES[qtype] * 32))
    if not bool(torch.isfinite(w).all()):
        raise CheckpointError(f"tensor {name!r} in {file.name} holds {qtype} blocks with NaN or infinite scales")
    return w.to(dtype)


def quantized_matrices(path: PathLike) -> dict:
    """The primary matrices a checkpoint stores as GGUF blocks, as ``{name: QuantMatrix}`` keyed by
    the primary's parameter names (``model.layers.0.self_attn.q_proj.weight``, ...), for
    ``Engine(quantized_primary=...)``; empty when it stores none. Checked as ``load_checkpoint`` does."""
    from tandem_rt.quantized import make_quant_matrix

    cfg = read_config(path)
    if not cfg.quantized:
        return {}
    files = weight_files(path)
    by_file: dict = {}
    for name in cfg.quantized:
        key = name + QBLOCKS
        if key not in files:
            raise CheckpointError(f"checkpoint {path} is missing tensor {key!r}")
        by_file.setdefault(files[key], []).append(name)
    out = {}
    for file, names in by_file.items():           # each file opened once
        try:
            with safe_open(str(file), framework="pt", device="cpu") as fh:
                blocks = {n: fh.get_tensor(n + QBLOCKS) for n in names}
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"could not read {file}: {exc}") from None
        for name, b in blocks.items():
            qtype = cfg.quantized[name]
            K = b.shape[1] // QUANT_BLOCK_BYTES[qtype] * 32 if b.dim() == 2 else 0
            try:
                out[name[len("primary."):]] = make_quant_matrix(b, qtype, K)
            except ValueError as exc:
                raise CheckpointError(f"tensor {name + QBLOCKS!r} in {file.name}: {exc}") from None
    return out


def _check_vocab_subset(ids: torch.Tensor, name: str, file: Path, cfg: TandemConfig) -> None:
    """A reduced output vocabulary must hold sorted, distinct ids inside the primary's vocabulary."""
    V = cfg.primary.vocab_size
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise CheckpointError(f"tensor {name!r} in {file.name} holds token ids outside [0, {V})")
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise CheckpointError(f"tensor {name!r} in {file.name} must hold strictly increasing token ids")


# ----------------------------------------------------------------------------- writing

def _publish(tmp: Path, file: Path) -> None:
    """Give a finished temporary file normal permissions and move it to its final name."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, file)


def atomic_write_text(file: Path, text: str) -> None:
    """Write ``text`` to ``file`` through a temporary file (never a half-written file under the name)."""
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(text)
    _publish(tmp, file)


def quantize_blocks(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """``w [N, K]`` (K a multiple of 32) -> uint8 GGUF blocks ``[N, K/32 * bytes]`` by the ``gguf``
    package's reference quantizer (bit-exact with ggml's)."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    q = quants.quantize(w.detach().float().cpu().numpy().astype(np.float32), getattr(GGMLQuantizationType, qtype))
    return torch.from_numpy(np.ascontiguousarray(q)).view(torch.uint8).reshape(w.shape[0], -1)


def save_checkpoint(model: TandemModel, path: PathLike, tokenizer=None,
                    dtype: Optional[torch.dtype] = None, max_shard_bytes: int = 4 << 30,
                    primary_source: Optional[dict] = None, shared_embeddings=None,
                    quantize: Optional[str] = None) -> Path:
    """Write ``model`` as a checkpoint directory.

    Args:
        model: the :class:`TandemModel` to save.
        path: target directory (created if needed; existing checkpoint files are replaced).
        tokenizer: a ``tokenizers.Tokenizer``, or a path to a ``tokenizer.json`` to copy, or None.
        dtype: dtype of the stored tensors (default: the model's parameter dtype).
        max_shard_bytes: above this total size, tensors are split into shards with an index.
        primary_source: reference the primary instead of storing it: ``{"kind", "sha256"}`` and
            ``"path"`` or ``"package"`` + ``"file"`` (docs/CHECKPOINT.md); None stores it.
        shared_embeddings: parts (``"secondary"``, ``"drafter"``) whose token embeddings equal
            the primary's and are stored once (ValueError if they differ).
        quantize: ``"Q8_0"`` or ``"Q4_1"``: store the primary's matrices (every 2-D weight with a
            multiple of 32 inputs: attention, MLP, embedding / LM head) as GGUF blocks quantized
            by the ``gguf`` package (weight-only; ``Engine.from_pretrained(quantized=True)`` then
            serves them as blocks). None stores them in ``dtype``.
    Returns:
        the checkpoint directory.
    """
    import dataclasses

    if not isinstance(model, TandemModel):
        raise TypeError(f"model must be a TandemModel, got {type(model).__name__}")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if dtype is None:
        dtype = next(iter(state.values())).dtype
    cfg = model.config
    if primary_source is not None or shared_embeddings:
        try:
            cfg = dataclasses.replace(cfg, primary_source=primary_source or cfg.primary_source,
                                      shared_embeddings=list(shared_embeddings or cfg.shared_embeddings))
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
    for part in cfg.shared_embeddings:
        own = state[f"{part}.model.embed_tokens.weight"].to(dtype)
        if not torch.equal(own, state["primary.model.embed_tokens.weight"].to(dtype)):
            raise ValueError(f"shared_embeddings names {part!r}, whose token embeddings differ from the primary's")
    skip = not_stored(cfg, state)
    qnames = {}
    if quantize is not None:
        if quantize not in QUANT_BLOCK_BYTES:
            raise ValueError(f"quantize must be one of {sorted(QUANT_BLOCK_BYTES)}, got {quantize!r}")
        if cfg.primary_source is not None:
            raise ValueError("quantize needs the primary stored, but primary_source references it")
        qnames = {n: quantize for n, t in state.items() if n.startswith("primary.") and n.endswith(".weight")
                  and n not in skip and t.dim() == 2 and t.shape[1] % 32 == 0}
        cfg = dataclasses.replace(cfg, quantized=qnames)
    cfg_dict = cfg.to_dict()
    cfg_dict["torch_dtype"] = dtype_name(dtype)

    tensors = {name: t.detach().to("cpu", t.dtype if name.endswith(".vocab_subset") else dtype).contiguous()
               for name, t in state.items() if name not in skip and name not in qnames}
    for name, qtype in qnames.items():
        tensors[name + QBLOCKS] = quantize_blocks(state[name], qtype)
    shards: list = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    for stale in [root / WEIGHTS_NAME, root / INDEX_NAME, *root.glob("model-*-of-*.safetensors")]:
        if stale.exists():
            stale.unlink()
    if len(shards) == 1:
        tmp = root / (WEIGHTS_NAME + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        _publish(tmp, root / WEIGHTS_NAME)
    else:
        weight_map = {}
        for i, names in enumerate(shards):
            shard = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tmp = root / (shard + ".tmp")
            save_file({n: tensors[n] for n in names}, str(tmp), metadata={"format": "pt"})
            _publish(tmp, root / shard)
            weight_map.update({n: shard for n in names})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_text(root / INDEX_NAME, json.dumps({"metadata": {"total_size": total},
                                                          "weight_map": weight_map}, indent=1))
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            if Path(tokenizer).resolve() != (root / TOKENIZER_NAME).resolve():
                shutil.copyfile(tokenizer, root / (TOKENIZER_NAME + ".tmp"))
        else:
            tokenizer.save(str(root / (TOKENIZER_NAME + ".tmp")))
        _publish(root / (TOKENIZER_NAME + ".tmp"), root / TOKENIZER_NAME)
    atomic_write_text(root / CONFIG_NAME, json.dumps(cfg_dict, indent=2) + "\n")
    return root
