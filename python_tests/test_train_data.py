"""Token cache and window sampling."""
from __future__ import annotations

import lzma

import numpy as np
import pytest
import torch

from tandem_rt.train.data import WindowSampler, load_tokens, sequential_windows, tokenize_to_memmap
from tandem_rt.train.tokenizer import EOS_TOKEN, train_bpe


pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = ["The cat sat on the mat and looked at the little dog.",
        "A dog ran after the ball in the green garden.", EOS_TOKEN] * 30


def test_memmap_cache_matches_direct_encoding(tmp_path):
    tok = train_bpe(TEXT, vocab_size=300)
    src = tmp_path / "split.txt.xz"
    with lzma.open(src, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(TEXT) + "\n")
    arr = tokenize_to_memmap(tok, src, tmp_path / "cache" / "split.bin", batch_lines=7, progress=False)
    expected = []
    for line in TEXT:
        expected += [1] if line == EOS_TOKEN else tok.encode(line + "\n").ids
    assert arr.dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(arr), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(load_tokens(tmp_path / "cache" / "split.bin")), expected)
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_windows_are_contiguous_slices_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)  # each value identifies its position
    s = WindowSampler(tokens, seq_len=16, seed=3)
    b = s.sample(5)
    assert b.shape == (5, 16) and b.dtype == torch.int64
    assert torch.equal(b[:, 1:] - b[:, :-1], torch.ones(5, 15, dtype=torch.int64))
    assert int(b.max()) < 1000 and int(b.min()) >= 0
    state = s.state_dict()
    nxt = s.sample(4)
    s2 = WindowSampler(tokens, seq_len=16, seed=99)
    s2.load_state_dict(state)
    assert torch.equal(s2.sample(4), nxt)
    # different ranks draw different windows
    r0 = WindowSampler(tokens, 16, seed=0, rank=0).sample(8)
    r1 = WindowSampler(tokens, 16, seed=0, rank=1).sample(8)
    assert not torch.equal(r0, r1)


def test_window_sampler_validates():
    with pytest.raises(ValueError, match="seq_len"):
        WindowSampler(np.arange(10, dtype=np.uint16), seq_len=11)
    with pytest.raises(ValueError, match="tokens"):
        WindowSampler(np.zeros((2, 5), dtype=np.uint16), seq_len=2)


def test_sequential_windows():
    tokens = np.arange(50, dtype=np.uint16)
    ws = list(sequential_windows(tokens, 8))
    assert len(ws) == 6 and torch.equal(ws[1], torch.arange(8, 16))
    assert len(list(sequential_windows(tokens, 8, max_tokens=20))) == 2
