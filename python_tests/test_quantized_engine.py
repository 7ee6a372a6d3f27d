"""The engine with the primary's weights kept in their GGUF blocks (``quantized_primary``):
block rows read back as the gguf package dequantizes them (Q/K permutation undone), the
quantized primary's logits stay within int8-activation error of the dense primary on the same
dequantized weights, and the speculative modes stay lossless with respect to the quantized
primary (fp32, greedy)."""
from __future__ import annotations

import copy

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")

from conftest import tiny_model_config  # noqa: E402
from tiny_ecosystem_models import tiny_hf_model, write_llama_gguf  # noqa: E402
from tandem_rt.config import TandemConfig  # noqa: E402
from tandem_rt.engine import Engine, SamplingParams  # noqa: E402
from tandem_rt.gguf import load_gguf_model  # noqa: E402
from tandem_rt.models import TandemModel  # noqa: E402
from tandem_rt.models.random_init import randomize_  # noqa: E402
from tandem_rt.quantized import QuantMatrix, dequantize, read_gguf_matrices  # noqa: E402

Q = gguf.GGMLQuantizationType


def quant_plan(layers=2):
    plan = {"token_embd.weight": Q.Q8_0}
    kinds = [Q.Q4_1, Q.Q4_0, Q.Q8_0]
    for i in range(layers):
        for j, t in enumerate(["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]):
            plan[f"blk.{i}.{t}.weight"] = kinds[(i + (j >= 3)) % 3] if t not in ("attn_q", "attn_k", "attn_v") \
                else kinds[i % 3]
    return plan


@pytest.fixture(scope="module")
def gguf_tandem(tmp_path_factory):
    ref = tiny_hf_model("llama", tie=True, vocab=96, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96,
                        seed=7)
    path = write_llama_gguf(ref, tmp_path_factory.mktemp("q") / "tiny.gguf", quant=quant_plan())
    primary = load_gguf_model(path)          # dequantised (the dense reference)
    small = tiny_model_config(96, hidden_size=32, layers=1, heads=4, kv_heads=1, intermediate_size=48, tie=True)
    cfg = TandemConfig(primary=primary.config, secondary=small, drafter=small, torch_dtype="float32")
    torch.manual_seed(0)
    model = TandemModel(cfg)
    randomize_(model.secondary, 0.3)
    randomize_(model.drafter, 0.3)
    model.primary.load_state_dict(primary.state_dict())
    return path, model.eval()


def test_block_rows_dequantize_to_the_loaded_weights(gguf_tandem):
    path, model = gguf_tandem
    mats = read_gguf_matrices(path)
    params = dict(model.primary.named_parameters())
    assert len(mats) == 1 + 2 * 7 and {m.qtype for m in mats.values()} == {"Q8_0", "Q4_0", "Q4_1"}
    for name, qm in mats.items():
        assert torch.equal(dequantize(qm), params[name].detach()), name


def test_quantized_primary_logits_and_lossless_modes(gguf_tandem):
    path, model = gguf_tandem
    dense = Engine(model, num_pages=64, page_size=4)
    prompts = [[3, 9, 27, 81 % 96, 50, 7], [11, 5, 60]]
    sp = SamplingParams(max_new_tokens=16, ignore_eos=True)
    ref = [r.token_ids for r in dense.generate(prompts, sp, mode="primary")]
    quant = Engine(model, num_pages=64, page_size=4, quantized_primary=read_gguf_matrices(path))
    assert isinstance(quant.primary.layers[0].w_qkv, QuantMatrix) and isinstance(quant.primary.lm_head, QuantMatrix)
    got = [r.token_ids for r in quant.generate(prompts, sp, mode="primary")]
    # int8 activations change near-ties only: most greedy tokens agree with the dense primary
    agree = sum(a == b for x, y in zip(got, ref) for a, b in zip(x, y)) / sum(map(len, ref))
    assert agree > 0.6, (got, ref)
    for mode, gamma in (("speed", 3), ("tandem-speed", 4), ("tandem-speed", 1)):
        spec = [r.token_ids for r in quant.generate(prompts, sp, mode=mode, gamma=gamma)]
        assert spec == got, (mode, gamma)


def test_quantized_steps_of_more_than_64_rows_stay_lossless(gguf_tandem):
    """A step of more than QUANT_ROWS_MAX rows (12 sequences x 7-row verify blocks, prompts riding
    in the first steps) computes every row with the few-row kernel as a decode row is, so the
    speculative modes still reproduce the quantized primary's greedy tokens."""
    from tandem_rt.quantized import QUANT_ROWS_MAX

    path, model = gguf_tandem
    quant = Engine(model, num_pages=256, page_size=4, max_batch_size=12, quantized_primary=read_gguf_matrices(path))
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 96, (10,), generator=g).tolist() for _ in range(12)]
    sp = SamplingParams(max_new_tokens=14, ignore_eos=True)
    want = [r.token_ids for r in sorted(quant.generate(prompts, sp, mode="primary"), key=lambda r: r.prompt_index)]
    assert 12 * 7 > QUANT_ROWS_MAX
    for mode in ("speed", "tandem-speed"):
        got = [r.token_ids for r in sorted(quant.generate(prompts, sp, mode=mode, gamma=6), key=lambda r: r.prompt_index)]
        assert got == want, mode


def test_quantized_primary_is_validated(gguf_tandem):
    path, model = gguf_tandem
    mats = read_gguf_matrices(path)
    with pytest.raises(ValueError, match="not a parameter of the primary"):
        Engine(model, num_pages=16, page_size=4, quantized_primary={"model.nope.weight": next(iter(mats.values()))})
    name = "model.layers.0.mlp.up_proj.weight"
    wrong = {name: mats["model.layers.0.mlp.down_proj.weight"]}
    with pytest.raises(ValueError, match="the primary's parameter is"):
        Engine(model, num_pages=16, page_size=4, quantized_primary=wrong)
    with pytest.raises(ValueError, match="must be a QuantMatrix"):
        Engine(model, num_pages=16, page_size=4, quantized_primary={name: torch.zeros(3)})
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        Engine(copy.deepcopy(model), num_pages=16, page_size=4, dtype=torch.float16, quantized_primary=mats)


@pytest.mark.parametrize("with_q4_0", [False, True])
def test_auto_quantized_primary_of_a_gguf_reference(gguf_tandem, tmp_path, monkeypatch, with_q4_0):
    """A checkpoint that references its primary's GGUF file: ``Engine.from_pretrained`` (quantized
    "auto") serves the file's blocks when they are all Q8_0 / Q4_1 and this CPU runs the int8
    kernels, and the dense weights when a matrix is Q4_0 (only the block-row kernel reads it) or
    without the int8 kernels; the blocks give the tokens of an engine built on them directly."""
    import tandem_rt.quantized as quantized
    from tandem_rt import primary_source as ps
    from tandem_rt.checkpoint import save_checkpoint

    path, model = gguf_tandem
    if not with_q4_0:   # the same weights written without Q4_0 matrices
        plan = {k: (Q.Q4_1 if v == Q.Q4_0 else v) for k, v in quant_plan().items()}
        ref_hf = tiny_hf_model("llama", tie=True, vocab=96, hidden=64, layers=2, heads=4, kv_heads=2,
                               intermediate=96, seed=7)
        path = write_llama_gguf(ref_hf, tmp_path / "no_q4_0.gguf", quant=plan)
        model = copy.deepcopy(model)
        model.primary.load_state_dict(load_gguf_model(path).state_dict())
    assert ({m.qtype for m in read_gguf_matrices(path).values()} >= {"Q4_0"}) == with_q4_0
    monkeypatch.setenv("TANDEM_RT_CACHE_DIR", str(tmp_path / "derived"))
    ckpt = save_checkpoint(model, tmp_path / "ref", primary_source={"kind": "gguf", "path": str(path),
                                                                   "sha256": ps.source_sha256(path)})
    monkeypatch.setattr(quantized, "packs16", lambda: True)
    auto = Engine.from_pretrained(ckpt, num_pages=64, page_size=4, draft_quantization=None)
    assert (auto.primary.quantized_bytes > 0) == (not with_q4_0)
    if not with_q4_0:
        # no derived cache is built: the norms and the embedding come from the file itself, equal to
        # what the full dequantising load gives
        assert not list((tmp_path / "derived").glob("*.safetensors"))
        from tandem_rt.checkpoint import load_checkpoint
        skip = {"primary." + n for n in read_gguf_matrices(path)} - {"primary.model.embed_tokens.weight"}
        part = load_checkpoint(ckpt, skip_values=skip, derived_cache=tmp_path / "d2")
        assert not (tmp_path / "d2").exists()
        full = load_gguf_model(path).state_dict()
        kept = [n for n in full if "primary." + n not in skip]
        assert "model.norm.weight" in kept and "model.embed_tokens.weight" in kept
        for n in kept:
            assert torch.equal(part.primary.state_dict()[n], full[n]), n
        direct = Engine(model, num_pages=64, page_size=4, quantized_primary=read_gguf_matrices(path))
        sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
        assert auto.generate([[3, 9, 27]], sp, mode="primary")[0].token_ids == \
            direct.generate([[3, 9, 27]], sp, mode="primary")[0].token_ids
    monkeypatch.setattr(quantized, "packs16", lambda: False)
    assert Engine.from_pretrained(ckpt, num_pages=64, page_size=4).primary.quantized_bytes == 0


@pytest.mark.cuda
@pytest.mark.parametrize("graphs", [False, True])
def test_quantized_primary_on_cuda(gguf_tandem, graphs):
    """On a GPU the blocks move to the device and the decode / verify rows run the CUDA
    ``linear_rows_q`` kernel (fp32: the same weights as the dense primary, dequantized exactly, so
    the greedy tokens agree but for accumulation-order near-ties)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (runs on the lent GPU machine)")
    path, model = gguf_tandem
    prompts = [[3, 9, 27, 81 % 96, 50, 7], [11, 5, 60]]
    sp = SamplingParams(max_new_tokens=16, ignore_eos=True)
    dense = Engine(copy.deepcopy(model), device="cuda", num_pages=64, page_size=4)
    ref = [r.token_ids for r in dense.generate(prompts, sp, mode="primary")]
    quant = Engine(copy.deepcopy(model), device="cuda", num_pages=64, page_size=4, use_cuda_graphs=graphs,
                   quantized_primary=read_gguf_matrices(path))
    w = quant.primary.layers[0].w_qkv
    assert isinstance(w, QuantMatrix) and w.blocks.is_cuda and w.packed is None
    got = [r.token_ids for r in quant.generate(prompts, sp, mode="primary")]
    agree = sum(a == b for x, y in zip(got, ref) for a, b in zip(x, y)) / sum(map(len, ref))
    assert agree > 0.9, (got, ref)
    spec = [r.token_ids for r in quant.generate(prompts, sp, mode="tandem-speed", gamma=3)]
    agree = sum(a == b for x, y in zip(spec, got) for a, b in zip(x, y)) / sum(map(len, got))
    assert agree > 0.9, (spec, got)


def test_quant_matrix_to_a_device_keeps_the_block_rows(gguf_tandem):
    """``QuantMatrix.to``: the block rows (unpacked from the 16-output layout when the blocks were
    dropped) on the device, without the CPU-only packed layout; already there: the same object."""
    from tandem_rt.quantized import pack_rows16

    path, _ = gguf_tandem
    qm = next(m for m in read_gguf_matrices(path).values() if m.qtype == "Q4_1" and m.out_features % 16 == 0)
    assert qm.to("cpu") is qm
    packed_only = QuantMatrix(None, qm.qtype, qm.in_features, pack_rows16(qm.blocks, qm.qtype))
    moved = packed_only.to("cpu")
    assert moved.packed is None and torch.equal(moved.blocks, qm.blocks)
