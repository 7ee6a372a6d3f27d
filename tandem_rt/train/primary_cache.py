"""The primary cache: one pass of the frozen primary over the training windows, memory-mapped.

Every drafter trained afterwards (the Tandem secondary, the standalone drafter, the router)
reads the primary from this cache, so the primary runs once. For window ``w`` (``seq_len``
tokens) the cache holds:

==================  =========================================  ==============================
file                array                                      meaning
==================  =========================================  ==============================
``tokens.bin``      int32 ``[W, T]``                           the window's token ids
``hidden.bin``      bf16 ``[W, M, T, d_L]`` (stored as int16)  ``x^(l)`` for each of the M
                                                               distinct layers ``l`` of the
                                                               layer map (sorted), the residual
                                                               streams the secondary reads
``topk_ids.bin``    int32 ``[W, T, k]``                        the primary's k most likely
                                                               next tokens at each position
``topk_probs.bin``  float16 ``[W, T, k]``                      their probabilities (full
                                                               softmax, not renormalised)
``meta.json``       fingerprint, shapes, ``windows_done``      written atomically
==================  =========================================  ==============================

Size per token: ``M·d_L·2 + k·6 + 4`` bytes (SmolLM2-135M, M = 2, k = 32: 2,500 bytes, i.e.
2.5 GB per million tokens).

The *fingerprint* (primary weights sha256, tokenizer sha256, the primary's compute dtype, layer
map, top-k, window length, sha256 of the token windows) is stored in ``meta.json``: a cache made from another primary,
tokenizer, layer map or data is refused, naming the field that differs. Building resumes from
``windows_done`` after an interruption (windows are written in order, and ``meta.json`` is
updated only after their bytes are flushed).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from tqdm import tqdm

PathLike = Union[str, os.PathLike]
CACHE_VERSION = 1
FILES = ("tokens.bin", "hidden.bin", "topk_ids.bin", "topk_probs.bin")


class CacheError(ValueError):
    """A primary cache is missing, incomplete, corrupt or from another primary / tokenizer / data."""


def bytes_per_token(num_layers: int, hidden_size: int, top_k: int) -> int:
    """Cache bytes per token: bf16 hidden states, int32 + float16 top-k, int32 token id."""
    return num_layers * hidden_size * 2 + top_k * 6 + 4


def windows_sha256(windows: np.ndarray) -> str:
    """sha256 of the int32 bytes of the token windows ``[W, T]``."""
    return hashlib.sha256(np.ascontiguousarray(windows, dtype=np.int32).tobytes()).hexdigest()


def make_fingerprint(primary_sha256: str, tokenizer_sha256: str, layer_map: list, top_k: int, seq_len: int,
                     windows: np.ndarray, compute_dtype: str = "float32") -> dict:
    return {"version": CACHE_VERSION, "primary_sha256": primary_sha256, "tokenizer_sha256": tokenizer_sha256,
            "compute_dtype": compute_dtype,
            "layer_map": [int(x) for x in layer_map], "top_k": int(top_k), "seq_len": int(seq_len),
            "num_windows": int(windows.shape[0]), "windows_sha256": windows_sha256(windows)}


def _read_meta(cache_dir: Path) -> Optional[dict]:
    file = cache_dir / "meta.json"
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"corrupt primary cache metadata {file}: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("fingerprint"), dict):
        raise CacheError(f"corrupt primary cache metadata {file}: no fingerprint")
    return meta


def _write_meta(cache_dir: Path, meta: dict) -> None:
    from tandem_rt.checkpoint import atomic_write_text

    atomic_write_text(cache_dir / "meta.json", json.dumps(meta, indent=1))


def check_fingerprint(found: dict, expected: dict, where) -> None:
    """Raise :class:`CacheError` naming every fingerprint field that differs."""
    diff = [k for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k)]
    if diff:
        details = "; ".join(f"{k}: cache has {found.get(k)!r}, expected {expected.get(k)!r}" for k in diff)
        raise CacheError(f"primary cache {where} was made from another primary, tokenizer, layer map or data "
                         f"({details}); delete it or choose another directory")


@dataclass
class CacheBatch:
    """One training batch read from the cache (B windows of T tokens)."""

    tokens: torch.Tensor      # int64 [B, T]
    hidden: list              # per layer-map entry, bf16 [B, T, d_L]
    topk_ids: torch.Tensor    # int64 [B, T, k]
    topk_probs: torch.Tensor  # float32 [B, T, k]


class PrimaryCache:
    """Read-only view of a complete cache directory. ``len(cache)`` windows; ``cache.batch(idx)``."""

    def __init__(self, cache_dir: PathLike, expected_fingerprint: Optional[dict] = None,
                 layer_map: Optional[list] = None):
        """``layer_map``: the secondary's layer map (each entry a stored layer, repeats allowed);
        ``batch().hidden`` then holds one entry per secondary layer. Default: the stored layers."""
        self.dir = Path(cache_dir)
        meta = _read_meta(self.dir)
        if meta is None:
            raise CacheError(f"{self.dir} is not a primary cache (no meta.json)")
        fp = meta["fingerprint"]
        if expected_fingerprint is not None:
            check_fingerprint(fp, expected_fingerprint, self.dir)
        if meta.get("windows_done") != fp["num_windows"]:
            raise CacheError(f"primary cache {self.dir} is incomplete ({meta.get('windows_done')} of "
                             f"{fp['num_windows']} windows): run the cache stage again to finish it")
        self.meta, self.fingerprint = meta, fp
        self.layers = list(fp["layer_map"])
        self.read_map = list(layer_map) if layer_map is not None else list(self.layers)
        missing = [l for l in self.read_map if l not in self.layers]
        if missing:
            raise CacheError(f"primary cache {self.dir} holds layers {self.layers}, not {missing}")
        W, T, k = fp["num_windows"], fp["seq_len"], fp["top_k"]
        M, d = len(fp["layer_map"]), meta["hidden_size"]
        self.shape = (W, M, T, d)
        self.tokens = self._open("tokens.bin", np.int32, (W, T))
        self.hidden = self._open("hidden.bin", np.int16, (W, M, T, d))
        self.topk_ids = self._open("topk_ids.bin", np.int32, (W, T, k))
        self.topk_probs = self._open("topk_probs.bin", np.float16, (W, T, k))

    def _open(self, name, dtype, shape):
        file = self.dir / name
        need = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if not file.is_file() or file.stat().st_size != need:
            size = file.stat().st_size if file.is_file() else "missing"
            raise CacheError(f"primary cache file {file} should have {need} bytes, has {size}: corrupt cache")
        return np.memmap(file, dtype=dtype, mode="r", shape=shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def seq_len(self) -> int:
        return self.shape[2]

    def batch(self, idx) -> CacheBatch:
        """Windows ``idx`` (int sequence or int64 tensor ``[B]``) -> :class:`CacheBatch`."""
        idx = np.sort(np.asarray(torch.as_tensor(idx).cpu(), dtype=np.int64))
        hid = torch.from_numpy(np.ascontiguousarray(self.hidden[idx])).view(torch.bfloat16)
        return CacheBatch(tokens=torch.from_numpy(self.tokens[idx].astype(np.int64)),
                          hidden=[hid[:, self.layers.index(l)] for l in self.read_map],
                          topk_ids=torch.from_numpy(self.topk_ids[idx].astype(np.int64)),
                          topk_probs=torch.from_numpy(self.topk_probs[idx].astype(np.float32)))


def _check_disk(cache_dir: Path, need: int) -> None:
    free = shutil.disk_usage(cache_dir).free
    if need > free:
        raise CacheError(f"not enough disk space for the primary cache in {cache_dir}: {need / 1e9:.2f} GB "
                         f"still to write, {free / 1e9:.2f} GB free")


@torch.no_grad()
def build_primary_cache(primary, windows: np.ndarray, cache_dir: PathLike, layer_map: list, top_k: int,
                        primary_sha256: str, tokenizer_sha256: str, batch_size: int = 8,
                        progress: bool = True, max_windows: Optional[int] = None) -> PrimaryCache:
    """Run the frozen ``primary`` over ``windows`` and write the cache (resuming a partial one).

    Args:
        primary: :class:`~tandem_rt.models.LlamaForCausalLM` (its dtype is the compute dtype).
        windows: int ``[W, T]`` token windows.
        cache_dir: directory (created); an existing cache with the same fingerprint is resumed
            or reused, one with another fingerprint is refused (:class:`CacheError`).
        layer_map: the secondary's layer map; each distinct primary layer in it is stored once
            (0 = embeddings), and the returned cache reads them in this order.
        top_k: number of the primary's most likely next tokens stored per position.
        primary_sha256, tokenizer_sha256: identify the primary and tokenizer in the fingerprint.
        max_windows: stop after this many windows in this call (tests, time slicing).
    Returns:
        the :class:`PrimaryCache` when complete (None when stopped early by ``max_windows``).
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise CacheError(f"windows must be a non-empty [W, T] array with T >= 2, got shape {windows.shape}")
    cfg = primary.config
    V, d = cfg.vocab_size, cfg.hidden_size
    if not 1 <= top_k <= V:
        raise CacheError(f"top_k must be in [1, {V}], got {top_k}")
    for l in layer_map:
        if not 0 <= int(l) <= cfg.num_hidden_layers:
            raise CacheError(f"layer_map entry {l} is not a primary layer in 0..{cfg.num_hidden_layers}")
    if windows.min() < 0 or windows.max() >= V:
        raise CacheError(f"windows hold token ids outside the primary's vocabulary [0, {V})")
    W, T = windows.shape
    read_map = [int(l) for l in layer_map]
    layer_map = sorted(set(read_map))   # each distinct layer is stored once
    M = len(layer_map)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    from tandem_rt.dtypes import dtype_name

    fp = make_fingerprint(primary_sha256, tokenizer_sha256, layer_map, top_k, T, windows,
                          dtype_name(next(primary.parameters()).dtype))
    meta = _read_meta(cache_dir)
    if meta is not None:
        found = meta["fingerprint"]
        if set(layer_map) <= set(found.get("layer_map", [])):  # a cache holding more layers serves too
            fp = {**fp, "layer_map": found["layer_map"]}
            layer_map = list(found["layer_map"])
            M = len(layer_map)
        check_fingerprint(found, fp, cache_dir)
    else:
        meta = {"fingerprint": fp, "hidden_size": d, "vocab_size": V, "windows_done": 0,
                "bytes_per_token": bytes_per_token(M, d, top_k)}
        for name in FILES:  # start from empty files (a stale partial file from a crash is dropped)
            (cache_dir / name).unlink(missing_ok=True)
        _write_meta(cache_dir, meta)
    done = int(meta["windows_done"])
    row_bytes = {"tokens.bin": T * 4, "hidden.bin": M * T * d * 2, "topk_ids.bin": T * top_k * 4,
                 "topk_probs.bin": T * top_k * 2}
    if done < W:
        _check_disk(cache_dir, (W - done) * sum(row_bytes.values()))
    handles = {}
    for name in FILES:
        file = cache_dir / name
        fh = open(file, "r+b" if file.exists() else "w+b")
        fh.truncate(done * row_bytes[name])  # drop bytes written after the last recorded window
        fh.seek(done * row_bytes[name])
        handles[name] = fh
    bar = tqdm(total=W, initial=done, desc="primary cache", unit="win", disable=not progress,
               dynamic_ncols=True, mininterval=2.0)
    stop = W if max_windows is None else min(W, done + max_windows)
    try:
        while done < stop:
            n = min(batch_size, stop - done)
            ids = torch.from_numpy(windows[done:done + n].astype(np.int64))
            logits, hidden = primary(ids, hidden_layers=list(layer_map))
            probs = torch.softmax(logits.float(), dim=-1)
            top_p, top_i = probs.topk(top_k, dim=-1)
            hid = torch.stack([h.to(torch.bfloat16) for h in hidden], dim=1)  # [n, M, T, d]
            arrays = {"tokens.bin": ids.to(torch.int32).numpy(), "hidden.bin": hid.view(torch.int16).numpy(),
                      "topk_ids.bin": top_i.to(torch.int32).numpy(),
                      "topk_probs.bin": top_p.to(torch.float16).numpy()}
            for name, arr in arrays.items():
                handles[name].write(np.ascontiguousarray(arr).tobytes())
            for fh in handles.values():
                fh.flush()
                os.fsync(fh.fileno())
            done += n
            meta["windows_done"] = done
            _write_meta(cache_dir, meta)
            bar.update(n)
            del logits, hidden, probs
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CacheError(f"disk full while writing the primary cache in {cache_dir} after {done} of {W} "
                             "windows; free space and run again to resume") from None
        raise
    finally:
        bar.close()
        for fh in handles.values():
            fh.close()
    if done < W:
        return None
    return PrimaryCache(cache_dir, fp, layer_map=read_map)
