"""tools/greedy_corpus.py: the corpus of the primary's own greedy continuations equals a plain
greedy loop over the primary, resumes after an interruption to the same bytes, and refuses a
resume with other settings."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from test_train_any_primary import save_primary_checkpoint, tiny_primary, tokenizer_file, write_corpus  # noqa: F401

_spec = importlib.util.spec_from_file_location("greedy_corpus", Path(__file__).resolve().parents[1] / "tools" / "greedy_corpus.py")
greedy_corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(greedy_corpus)


def _args(tmp_path, out, **kw):
    opts = {"--model": str(tmp_path / "primary"), "--corpus": str(tmp_path / "corpus"), "--prompts": "5",
            "--min-chars": "100", "--prompt-tokens": "6", "--new-tokens": "7", "--batch": "2", "--out": str(out), **kw}
    return [x for k, v in opts.items() for x in (k, v)]


@pytest.fixture()
def setup(tmp_path, tokenizer_file):  # noqa: F811
    primary = tiny_primary()
    save_primary_checkpoint(primary, tmp_path / "primary", tokenizer_file)
    write_corpus(tmp_path / "corpus")
    return tmp_path, primary


def test_continuations_equal_a_greedy_loop(setup):
    from tokenizers import Tokenizer

    tmp_path, primary = setup
    out = tmp_path / "gc"
    assert greedy_corpus.main(_args(tmp_path, out)) == 0
    lines = (out / "train.txt").read_text().splitlines()
    paras = greedy_corpus.paragraphs(tmp_path / "corpus", "train", 5, 100)
    tok = Tokenizer.from_file(str(tmp_path / "primary" / "tokenizer.json"))
    assert len(lines) == 10 and lines[0::2] == paras
    for para, line in zip(paras, lines[1::2]):
        ids = tok.encode(para).ids[:6]
        with torch.no_grad():
            for _ in range(7):
                ids.append(int(primary(torch.tensor([ids]))[0, -1].argmax()))
        assert line == " ".join(tok.decode(ids).split())
    assert (out / "val.txt").resolve() == (tmp_path / "corpus" / "val.txt").resolve()
    assert not (out / "train.txt.part").exists()


def test_resume_and_changed_settings(setup):
    tmp_path, _ = setup
    full = tmp_path / "full"
    greedy_corpus.main(_args(tmp_path, full) + ["--no-mix"])
    expect = (full / "train.txt").read_text()
    out = tmp_path / "resumed"
    out.mkdir()
    first_batch = "".join(expect.splitlines(keepends=True)[:2])
    (out / "train.txt.part").write_text(first_batch + "a half-written line of the next ba")  # killed mid-batch
    settings = json.loads(json.dumps({"model": str(tmp_path / "primary"), "corpus": str(tmp_path / "corpus"),
                                      "split": "train", "prompts": 5, "min_chars": 100, "prompt_tokens": 6,
                                      "new_tokens": 7, "dtype": "float32", "mix": False}))
    (out / "progress.json").write_text(json.dumps({"settings": settings, "done": 2, "bytes": len(first_batch.encode())}))
    assert greedy_corpus.main(_args(tmp_path, out) + ["--no-mix"]) == 0
    assert (out / "train.txt").read_text() == expect
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.txt.part").write_text("")
    (other / "progress.json").write_text(json.dumps({"settings": {**settings, "new_tokens": 9}, "done": 0, "bytes": 0}))
    with pytest.raises(SystemExit, match="other settings"):
        greedy_corpus.main(_args(tmp_path, other) + ["--no-mix"])
    with pytest.raises(SystemExit, match="--new-tokens must be >= 1"):
        greedy_corpus.main(_args(tmp_path, tmp_path / "bad", **{"--new-tokens": "0"}))
    with pytest.raises(SystemExit, match="has only"):
        greedy_corpus.main(_args(tmp_path, tmp_path / "few", **{"--prompts": "100000"}))
