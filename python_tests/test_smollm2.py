"""The real model: SmolLM2-135M-Instruct (Q4_1 GGUF) through ``tandem_rt.gguf`` vs transformers'
GGUF loading of the same file. Run ``python tools/fetch_smollm2.py`` first, then
``pytest -m slow python_tests/test_smollm2.py``."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import tiny_ecosystem_models  # noqa: F401  (sets HF_HUB_OFFLINE)

REPO_ROOT = Path(__file__).resolve().parents[1]
GGUF = Path(os.environ.get("TANDEM_RT_SMOLLM2_GGUF",
                           REPO_ROOT / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
PROMPTS = [
    "Once upon a time, there was a little",
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is 7 times 8?<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY_PROMPT = "Once upon a time, there was a little"
GREEDY_TOKENS = 20
# both sides dequantise with the same ``gguf`` code, so only fp32 summation order could differ
# over 30 layers; measured on CPU with torch 2.13.0: max difference 0 (bit-identical)
LOGIT_TOL = 1e-3

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not GGUF.is_file(), reason=f"{GGUF} is absent: run `python tools/fetch_smollm2.py` "
                                                             "or set TANDEM_RT_SMOLLM2_GGUF")]


@pytest.fixture(scope="module")
def models():
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from tandem_rt.gguf import gguf_tokenizer_json, load_gguf_model

    ours = load_gguf_model(GGUF, dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name,
                                                  dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_str(gguf_tokenizer_json(GGUF))
    return ours, theirs, tokenizer


def test_config(models):
    cfg = models[0].config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (49152, 576, 30, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rope_theta) == (9, 3, 64, 1e5)
    assert cfg.tie_word_embeddings


def test_logits_match_transformers(models):
    ours, theirs, tok = models
    worst = 0.0
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt).ids])
        assert tok.decode(ids[0].tolist(), skip_special_tokens=False) == prompt
        with torch.no_grad():
            expected = theirs(ids).logits
            got = ours(ids)
        diff = (got - expected).abs().max().item()
        worst = max(worst, diff)
        assert diff <= LOGIT_TOL, (prompt, diff)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
    print(f"max |logit difference| over {len(PROMPTS)} prompts: {worst:.3g}")


def greedy(model_fn, ids: torch.Tensor, n: int) -> list:
    out = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model_fn(out)[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_continuation_matches_transformers(models):
    ours, theirs, tok = models
    ids = torch.tensor([tok.encode(GREEDY_PROMPT).ids])
    mine = greedy(ours, ids, GREEDY_TOKENS)
    with torch.no_grad():
        ref = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY_TOKENS,
                              do_sample=False, pad_token_id=2)[0, ids.shape[1]:].tolist()
    print(f"ours:         {tok.decode(mine)!r}\ntransformers: {tok.decode(ref)!r}")
    assert mine == ref


def test_import_gguf_checkpoint_primary(models, tmp_path):
    import tandem_rt
    from tandem_rt.gguf import import_gguf

    ours, _, tok = models
    out = import_gguf(GGUF, tmp_path / "ckpt", dtype="float32", secondary_config={
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 1,
        "num_key_value_heads": 1})
    model = tandem_rt.load_checkpoint(out)
    ids = torch.tensor([tok.encode(PROMPTS[0]).ids])
    with torch.no_grad():
        assert torch.equal(model.primary(ids), ours(ids))
    assert (out / "tokenizer.json").is_file()
