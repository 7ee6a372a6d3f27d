"""``tandem_rt.gguf``: tiny GGUF files written with the ``gguf`` writer (Q/K permuted like
llama.cpp's converter) load to the logits of the source model and of transformers' GGUF loader."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")

from tiny_ecosystem_models import hf_logits, llama_cpp_permute, tiny_hf_model, write_llama_gguf
from tandem_rt.gguf import gguf_model_config, load_gguf_model, unpermute_qk

Q = gguf.GGMLQuantizationType
TOL = 1e-4
MIXED = {  # one tensor of each type we promise (rows of 64 fit every block size)
    "token_embd.weight": Q.Q8_0,
    "output.weight": Q.Q8_0,
    "blk.0.ffn_up.weight": Q.Q4_0,
    "blk.1.ffn_gate.weight": Q.Q4_1,
    "blk.0.attn_q.weight": Q.BF16,
    "blk.1.attn_k.weight": Q.F16,
    "blk.1.attn_q.weight": Q.Q8_0,
}


def _ids(vocab=101, seed=1):
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tie", [False, True])
def test_f32_gguf_matches_source_model(tie, tmp_path):
    ref = tiny_hf_model("llama", tie=tie, kv_heads=2)
    path = write_llama_gguf(ref, tmp_path / "tiny.gguf")
    ours = load_gguf_model(path)
    assert ours.config.tie_word_embeddings == tie
    ids = _ids()
    expected = hf_logits(ref, ids)
    assert (ours(ids) - expected).abs().max().item() <= TOL
    assert expected.std().item() > 0.5


def test_quantised_gguf_matches_transformers_gguf_loader(tmp_path):
    from transformers import AutoModelForCausalLM

    ref = tiny_hf_model("llama", tie=False, seed=4)
    path = write_llama_gguf(ref, tmp_path / "mixed.gguf", quant=MIXED)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert {types[n] for n in MIXED} == {Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.BF16, Q.F16}
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ours = load_gguf_model(path)
    ids = _ids(seed=3)
    expected = hf_logits(theirs, ids)
    assert (ours(ids) - expected).abs().max().item() <= TOL
    # quantisation really changed the weights: the GGUF model differs from its fp32 source
    assert (expected - hf_logits(ref, ids)).abs().max().item() > 1e-3


def test_config_from_metadata(tmp_path):
    ref = tiny_hf_model("llama", tie=True, heads=4, kv_heads=1, rope_theta=321.0)
    cfg = gguf_model_config(write_llama_gguf(ref, tmp_path / "t.gguf"))
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (101, 64, 96, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 1, 16)
    assert cfg.rope_theta == 321.0 and cfg.max_position_embeddings == 128
    assert cfg.rms_norm_eps == pytest.approx(1e-5) and cfg.tie_word_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.attention_bias) == (1, 2, False)


@pytest.mark.parametrize("n_head, rows, cols", [(4, 64, 32), (1, 16, 8), (3, 48, 0)])
def test_unpermute_inverts_llama_cpp_permutation(n_head, rows, cols):
    w = np.random.default_rng(0).standard_normal((rows, cols) if cols else (rows,)).astype(np.float32)
    permuted = torch.from_numpy(llama_cpp_permute(w, n_head))
    assert not torch.equal(permuted, torch.from_numpy(w))
    assert torch.equal(unpermute_qk(permuted, n_head), torch.from_numpy(w))


def test_unsupported_architecture_is_refused(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        load_gguf_model(path)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_gguf_model(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_gguf_model(tmp_path / "missing.gguf")
