"""Byte-level BPE tokenizer trained with the ``tokenizers`` library.

Special tokens: ``<|pad|>`` (id 0, also used as BOS) and ``<|endoftext|>`` (id 1, EOS, the
book separator of the corpus). Paragraphs (one per corpus line) are encoded followed by a
``"\\n"``; a line that is exactly ``<|endoftext|>`` becomes the single EOS token.
"""
from __future__ import annotations

import lzma
import os
from pathlib import Path
from typing import Iterable, Iterator, Union

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
PAD_ID = 0
EOS_ID = 1


def open_text(path: Union[str, os.PathLike]):
    """Open a ``.txt`` or ``.txt.xz`` file for reading text (UTF-8, streaming)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path {str(path)!r} does not exist")
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def iter_lines(path: Union[str, os.PathLike], stride: int = 1) -> Iterator[str]:
    """Lines of a corpus file without their trailing newline (every ``stride``-th line)."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    with open_text(path) as fh:
        for n, line in enumerate(fh):
            if n % stride == 0:
                yield line.rstrip("\n")


def train_bpe(lines: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on ``lines`` (paragraph strings).

    Returns a ``tokenizers.Tokenizer`` with ``<|pad|>`` = 0 and ``<|endoftext|>`` = 1.
    """
    if vocab_size < 256 + 2:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + 2 specials), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[PAD_TOKEN, EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=True)
    texts = (line + "\n" for line in lines if line != EOS_TOKEN)
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.token_to_id(PAD_TOKEN) != PAD_ID or tok.token_to_id(EOS_TOKEN) != EOS_ID:
        raise RuntimeError("special token ids are not 0/1 after training")
    return tok


def load_tokenizer(path: Union[str, os.PathLike]) -> Tokenizer:
    """Load ``tokenizer.json`` (a file, or a directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"tokenizer path {str(path)!r} does not exist")
    return Tokenizer.from_file(str(path))


def encode_lines(tok: Tokenizer, lines: list, eos_id: int = EOS_ID) -> list:
    """Encode paragraph strings -> list of id lists (EOS line -> ``[eos_id]``, default this
    tokenizer family's ``EOS_ID``; pass the model's own for other tokenizers)."""
    texts = [line + "\n" for line in lines]
    out = []
    encs = tok.encode_batch([t for t, line in zip(texts, lines) if line != EOS_TOKEN], add_special_tokens=False)
    it = iter(encs)
    for line in lines:
        out.append(([eos_id] if eos_id is not None else []) if line == EOS_TOKEN else next(it).ids)
    return out
