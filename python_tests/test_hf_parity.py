"""Our decoder loaded by ``tandem_rt.hf.load_hf_model`` vs transformers on tiny random models."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_ecosystem_models import hf_logits, save_hf, tiny_hf_model, to_legacy_rope_config
from tandem_rt.hf import hf_config_to_model_config, load_hf_model

TOL = 1e-4

CASES = {
    "llama-gqa-tied": dict(kind="llama", tie=True),
    "llama-gqa-untied": dict(kind="llama", tie=False),
    "llama-mqa-untied": dict(kind="llama", tie=False, heads=4, kv_heads=1),
    "qwen2-bias-untied": dict(kind="qwen2", tie=False),
    "qwen2-bias-tied": dict(kind="qwen2", tie=True, kv_heads=4),
    "mistral-gqa": dict(kind="mistral", tie=False),
}


def _ids(vocab=101, B=2, T=13, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    ref = tiny_hf_model(**CASES[case])
    save_hf(ref, tmp_path)
    ours = load_hf_model(tmp_path)
    cfg = ours.config
    assert cfg.tie_word_embeddings == CASES[case]["tie"]
    assert cfg.attention_bias == (CASES[case]["kind"] == "qwen2")
    assert cfg.rope_theta == 5000.0
    assert (ours.lm_head is None) == CASES[case]["tie"]
    ids = _ids()
    expected = hf_logits(ref, ids)
    got = ours(ids)
    assert got.shape == expected.shape == (2, 13, 101)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= TOL
    # the comparison is sensitive: logits are far from uniform
    assert expected.std().item() > 0.5


def test_sharded_checkpoint(tmp_path):
    ref = tiny_hf_model("qwen2", tie=False, seed=3)
    save_hf(ref, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids = _ids(seed=2)
    assert (load_hf_model(tmp_path)(ids) - hf_logits(ref, ids)).abs().max().item() <= TOL


def test_legacy_config_form_with_top_level_rope_theta(tmp_path):
    ref = tiny_hf_model("llama", tie=False, rope_theta=777.0)
    save_hf(ref, tmp_path)
    new_form = json.loads((tmp_path / "config.json").read_text())
    legacy = to_legacy_rope_config(tmp_path)
    assert "rope_parameters" not in legacy and legacy["rope_theta"] == 777.0
    assert hf_config_to_model_config(new_form).rope_theta == hf_config_to_model_config(legacy).rope_theta == 777.0
    ids = _ids()
    assert (load_hf_model(tmp_path)(ids) - hf_logits(ref, ids)).abs().max().item() <= TOL


def test_head_dim_not_hidden_over_heads(tmp_path):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=12)
    from tiny_ecosystem_models import randomize_
    ref = randomize_(transformers.LlamaForCausalLM(cfg), 5).eval()
    save_hf(ref, tmp_path)
    ours = load_hf_model(tmp_path)
    assert ours.config.head_dim == 12
    ids = _ids(vocab=50)
    assert (ours(ids) - hf_logits(ref, ids)).abs().max().item() <= TOL


def test_bfloat16_load(tmp_path):
    ref = tiny_hf_model("llama", tie=True)
    save_hf(ref, tmp_path)
    ours = load_hf_model(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    ids = _ids()
    expected = hf_logits(ref, ids)
    assert (ours(ids).float() - expected).abs().max().item() < 0.1 * expected.abs().max().item()


def _base_config(**extra):
    cfg = {"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-5}
    cfg.update(extra)
    return cfg


def test_config_translation():
    cfg = hf_config_to_model_config(_base_config(rope_theta=123.0, eos_token_id=[7, 8], bos_token_id=3))
    assert (cfg.rope_theta, cfg.eos_token_id, cfg.bos_token_id, cfg.head_dim) == (123.0, 7, 3, 8)
    assert cfg.tie_word_embeddings is False and cfg.attention_bias is False
    qwen = hf_config_to_model_config(_base_config(model_type="qwen2", use_sliding_window=False, sliding_window=16))
    assert qwen.attention_bias is True  # Qwen2 configs carry no attention_bias key
    assert hf_config_to_model_config(_base_config(rope_parameters={"rope_type": "default", "rope_theta": 9.0},
                                                  rope_scaling=None)).rope_theta == 9.0


@pytest.mark.parametrize("extra, words", [
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "linear"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "llama3"),
    (dict(model_type="mistral", sliding_window=64), "sliding_window=64"),
    (dict(model_type="gpt2"), "gpt2"),
    (dict(hidden_act="gelu"), "gelu"),
    (dict(mlp_bias=True), "mlp_bias"),
])
def test_config_refusals(extra, words):
    with pytest.raises(ValueError, match=words):
        hf_config_to_model_config(_base_config(**extra))


def test_large_sliding_window_ignored_with_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = hf_config_to_model_config(_base_config(model_type="mistral", sliding_window=4096))
    assert cfg.max_position_embeddings == 256
    assert any("sliding_window" in str(w.message) for w in caught)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    ref = tiny_hf_model("llama", tie=False)
    save_hf(ref, tmp_path)
    file = tmp_path / "model.safetensors"
    state = load_file(str(file))
    removed = state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_model(tmp_path)
    state["model.layers.1.mlp.up_proj.weight"] = removed
    state["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) model\.layers\.9\.extra\.weight"):
        load_hf_model(tmp_path)
    state.pop("model.layers.9.extra.weight")
    state["model.norm.weight"] = torch.ones(7)
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.norm\.weight has shape \[7\]"):
        load_hf_model(tmp_path)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_hf_model(tmp_path)
