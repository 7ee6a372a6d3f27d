"""Tokenizer: trains on a small text, round-trips, specials at ids 0/1."""
from __future__ import annotations

import lzma

import pytest
import torch

from tandem_rt.train.tokenizer import EOS_ID, EOS_TOKEN, PAD_ID, encode_lines, iter_lines, load_tokenizer, train_bpe


pytestmark = pytest.mark.usefixtures("one_torch_thread")

LINES = [
    "Once upon a time there was a little girl who lived in a wood.",
    "The wolf said, \"Where are you going, my dear?\" and she answered him kindly.",
    "Jo laughed; Meg frowned at her sister, but Beth only smiled — and Amy sighed.",
    EOS_TOKEN,
    "Numbers 1234 and symbols %&* survive, as does café and naïve.",
] * 20


def test_train_and_round_trip(tmp_path):
    tok = train_bpe(LINES, vocab_size=320)
    assert tok.token_to_id("<|pad|>") == PAD_ID and tok.token_to_id(EOS_TOKEN) == EOS_ID
    assert 258 < tok.get_vocab_size() <= 320
    for text in LINES[:5] + ["Unseen words: xylophone quixotic zebra!\n"]:
        if text == EOS_TOKEN:
            continue
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
    # merges were learned: a frequent word is shorter than its bytes
    assert len(tok.encode("little girl").ids) < len("little girl".encode())
    tok.save(str(tmp_path / "tokenizer.json"))
    again = load_tokenizer(tmp_path)
    assert again.encode(LINES[0]).ids == tok.encode(LINES[0]).ids


def test_encode_lines_maps_eos_line_and_appends_newline():
    tok = train_bpe(LINES, vocab_size=300)
    out = encode_lines(tok, ["Hello there.", EOS_TOKEN, "Bye."])
    assert out[1] == [EOS_ID]
    assert tok.decode(out[0]) == "Hello there.\n"
    assert tok.decode(out[2]) == "Bye.\n"


def test_iter_lines_reads_xz(tmp_path):
    path = tmp_path / "t.txt.xz"
    with lzma.open(path, "wt", encoding="utf-8") as fh:
        fh.write("a\nb\nc\n")
    assert list(iter_lines(path)) == ["a", "b", "c"]
    assert list(iter_lines(path, stride=2)) == ["a", "c"]
    with pytest.raises(ValueError, match="path"):
        list(iter_lines(tmp_path / "missing.txt"))


def test_bad_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(LINES, vocab_size=100)
