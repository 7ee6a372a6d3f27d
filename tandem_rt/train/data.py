"""Token data: tokenise a corpus split once into a cached ``uint16`` memmap, sample windows.

Cache layout: ``<cache_dir>/<split>.bin`` (raw little-endian uint16 token ids, the whole split
in corpus order) written through a temporary file, so an interrupted run never leaves a
partial cache under the final name.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from tqdm import tqdm

from tandem_rt.train.tokenizer import encode_lines, iter_lines

PathLike = Union[str, os.PathLike]


def tokenize_to_memmap(tok, text_path: PathLike, out_path: PathLike, batch_lines: int = 4096,
                       progress: bool = True) -> np.memmap:
    """Tokenise ``text_path`` (``.txt``/``.txt.xz``) into ``out_path`` (uint16) and return it.

    Reuses ``out_path`` if it exists. Raises ValueError if the vocabulary exceeds uint16.
    Returns a read-only ``np.memmap`` of dtype uint16 and shape ``[N]``.
    """
    if tok.get_vocab_size() > 65536:
        raise ValueError(f"tok: vocabulary {tok.get_vocab_size()} does not fit uint16")
    out_path = Path(out_path)
    if not out_path.is_file():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(out_path.suffix + ".tmp")
        total_bytes = None
        n_tokens = 0
        with open(tmp, "wb") as fh:
            bar = tqdm(desc=f"tokenise {Path(text_path).name}", unit="tok", unit_scale=True, disable=not progress)
            batch = []

            def flush():
                nonlocal n_tokens
                ids = [i for seq in encode_lines(tok, batch) for i in seq]
                np.asarray(ids, dtype=np.uint16).tofile(fh)
                n_tokens += len(ids)
                bar.update(len(ids))
                batch.clear()

            for line in iter_lines(text_path):
                batch.append(line)
                if len(batch) >= batch_lines:
                    flush()
            if batch:
                flush()
            bar.close()
        os.replace(tmp, out_path)
    return np.memmap(out_path, dtype=np.uint16, mode="r")


def load_tokens(path: PathLike) -> np.memmap:
    """Open a cached uint16 token file -> read-only memmap ``[N]``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"token cache {str(path)!r} does not exist (run tools/prepare_data.py)")
    return np.memmap(path, dtype=np.uint16, mode="r")


class WindowSampler:
    """Random fixed-length windows from a token array.

    ``sample(batch_size)`` -> int64 ``[batch_size, seq_len]``; windows start anywhere in
    ``[0, N - seq_len]``, drawn from a ``torch.Generator`` seeded with ``seed`` (and ``rank``
    so that data-parallel ranks draw different windows). The generator state is part of
    ``state_dict()`` so resumed runs continue the same stream.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0, rank: int = 0):
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        if seq_len < 1 or len(tokens) < seq_len:
            raise ValueError(f"seq_len must be in [1, {len(tokens)}], got {seq_len}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed, self.rank = seed, rank
        self.gen = torch.Generator().manual_seed(seed * 1000003 + rank)

    def sample(self, batch_size: int) -> torch.Tensor:
        starts = torch.randint(0, len(self.tokens) - self.seq_len + 1, (batch_size,), generator=self.gen)
        rows = [np.asarray(self.tokens[s:s + self.seq_len], dtype=np.int64) for s in starts.tolist()]
        return torch.from_numpy(np.stack(rows))

    def reseed(self, offset: int) -> None:
        """Restart the stream from ``(seed, rank, offset)`` (resuming a rank whose state was not saved)."""
        self.gen.manual_seed((self.seed * 1000003 + self.rank) * 7919 + offset + 1)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])


def sequential_windows(tokens: np.ndarray, seq_len: int, max_tokens: Optional[int] = None):
    """Non-overlapping windows in order (for evaluation): yields int64 ``[seq_len]`` tensors.

    Covers ``min(len(tokens), max_tokens)`` tokens; the tail shorter than ``seq_len`` is dropped.
    """
    n = len(tokens) if max_tokens is None else min(len(tokens), int(max_tokens))
    for s in range(0, n - seq_len + 1, seq_len):
        yield torch.from_numpy(np.asarray(tokens[s:s + seq_len], dtype=np.int64))
