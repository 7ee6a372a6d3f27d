"""Incremental detokenization: the deltas concatenate to the full decode at the end, and every
prefix of the deltas is a prefix of the full text of the tokens so far (nothing emitted is ever
wrong), for a byte-level BPE tokenizer (multi-byte characters split over tokens) and decoders
that join or strip spaces."""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from tandem_rt.engine.detokenize import IncrementalDetokenizer
from tandem_rt.paths import default_model_path


def _bpe():
    return Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))  # SmolLM2's byte-level BPE


def _wordpiece():
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(40)} | {f"##s{i}": 40 + i for i in range(20)},
                                     unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _metaspace():
    vocab = {f"\u2581w{i}": i for i in range(30)} | {f"p{i}": 30 + i for i in range(30)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="p0"))
    tok.decoder = decoders.Metaspace()
    return tok


def _check(tok, ids, chunks, start=0):
    d = IncrementalDetokenizer(tok, start=start)
    out, at = [], start
    for n in chunks:
        at = min(len(ids), at + n)
        out.append(d.step(ids[:at]))
        assert tok.decode(ids[start:at]).startswith("".join(out))
    out.append(d.finish(ids))
    assert "".join(out) == tok.decode(ids[start:])


@pytest.mark.parametrize("make", [_bpe, _wordpiece, _metaspace])
def test_deltas_concatenate_to_the_full_decode(make):
    tok = make()
    rng = random.Random(0)
    V = tok.get_vocab_size()
    texts = ["Once upon a time, a little girl 😀 said «héllo» — 日本語 ok.", "naïve café ☕☕ end"]
    for trial in range(30):
        if trial < len(texts) and make is _bpe:
            ids = tok.encode(texts[trial]).ids
        else:
            ids = [rng.randrange(V) for _ in range(rng.randrange(1, 60))]
        chunks = [rng.randrange(1, 5) for _ in range(len(ids))]
        _check(tok, ids, chunks)
        _check(tok, ids, chunks, start=rng.randrange(len(ids)))   # text of ids[start:] only (a prompt before)


def test_work_per_step_is_bounded():
    """Each step decodes a window of the last tokens, not the whole list."""
    lengths = []

    class Counting:
        def decode(self, ids):
            lengths.append(len(ids))
            return " ".join(str(i) for i in ids)

    d = IncrementalDetokenizer(Counting())
    ids = []
    for i in range(500):
        ids.append(i % 7)
        d.step(ids)
    assert max(lengths) <= 3
