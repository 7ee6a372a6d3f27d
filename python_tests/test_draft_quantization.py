"""Drafting models served with block-quantized matrices (``Engine(draft_quantization=...)``):
the blocks dequantize to within the format's rounding of the weights, the engine's drafter and
Tandem secondary compute the float64 reference on the dequantized weights (up to the kernels'
int8 activations) rather than the dense one, the lossless modes still equal ``primary``, and bad
options are refused naming the argument."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf package quantizes the blocks")

from conftest import tiny_model_config  # noqa: E402
from test_engine_paged_forward import Harness  # noqa: E402
from tandem_rt.config import RouterConfig, TandemConfig  # noqa: E402
from tandem_rt.engine import Engine, SamplingParams  # noqa: E402
from tandem_rt.engine.paged_model import PagedLlama, build_meta  # noqa: E402
from tandem_rt.models import TandemModel  # noqa: E402
from tandem_rt.models.random_init import randomize_  # noqa: E402
from tandem_rt.quantized import (QuantMatrix, dequantize, pack_rows16, quantize_drafting_model,  # noqa: E402
                                 with_packed)

V = 80


def reduced_vocab_model(seed=3, head_dim=None) -> TandemModel:
    """Primary 64 wide; secondary and drafter 32 wide with a reduced output vocabulary of 32 random
    tokens (tied heads: the rows of the embedding), down projections of 48 inputs (not a multiple
    of 32: they stay dense)."""
    primary = tiny_model_config(V, hidden_size=64, layers=3, heads=4, kv_heads=2, intermediate_size=64, tie=True,
                                head_dim=head_dim)
    small = tiny_model_config(V, hidden_size=32, layers=2, heads=4, kv_heads=1, intermediate_size=48, tie=True,
                              output_vocab_size=32, head_dim=head_dim)
    cfg = TandemConfig(primary=primary, secondary=small, drafter=small,
                       router=RouterConfig(embed_dim=32, top_k=3, hidden_size=16, threshold=0.5, gamma_max=6),
                       torch_dtype="float32", layer_map=[2, 3])
    torch.manual_seed(seed)
    model = TandemModel(cfg)
    randomize_(model, 0.3, norm_range=(0.8, 1.2), vector_std=0.1)
    g = torch.Generator().manual_seed(seed)
    subset = torch.randperm(V, generator=g)[:32].sort().values
    model.secondary.vocab_subset.copy_(subset)
    model.drafter.vocab_subset.copy_(subset)
    return model.eval()


@pytest.mark.parametrize("qtype, step", [("Q8_0", 1 / 127), ("Q4_1", 1 / 15)])
def test_blocks_dequantize_within_the_rounding_step(qtype, step):
    model = reduced_vocab_model()
    layers, head = quantize_drafting_model(model.drafter, qtype)
    params = dict(model.drafter.named_parameters())
    assert set(layers) == {n for n, p in params.items()
                           if n.startswith("model.layers.") and p.dim() == 2 and p.shape[1] % 32 == 0}
    assert not any("down_proj" in n for n in layers) and any("o_proj" in n for n in layers)
    want_head = model.drafter.output_weight.detach().index_select(0, model.drafter.vocab_subset)
    for w, q in [(params[n].detach(), m) for n, m in layers.items()] + [(want_head, head)]:
        assert q.qtype == qtype and (q.out_features, q.in_features) == tuple(w.shape)
        blocks = w.double().view(w.shape[0], -1, 32)
        span = blocks.abs().amax(-1) * 2 if qtype == "Q8_0" else blocks.amax(-1) - blocks.amin(-1)
        err = (dequantize(q, torch.float64).view_as(blocks) - blocks).abs().amax(-1)
        # half a quantization step (Q8_0: amax / 127; Q4_1: range / 15) plus the fp16 scale's rounding
        assert (err <= span * step * (0.5 + 1e-2) + 1e-6).all()


def test_packed_rows_slice_without_copy():
    w = torch.randn(64, 64)
    _, head = quantize_drafting_model(_one_layer(w), "Q8_0")
    packed = with_packed(head, keep_blocks=False)
    part = packed.rows(16, 48)
    assert part.blocks is None and part.packed.data_ptr() == packed.packed[1:3].data_ptr()
    assert torch.equal(dequantize(part), dequantize(head)[16:48])
    odd = packed.rows(8, 40)          # not on groups of 16: block rows
    assert odd.packed is None and torch.equal(dequantize(odd), dequantize(head)[8:40])
    assert torch.equal(pack_rows16(head.blocks, "Q8_0")[1:3], part.packed)


def _one_layer(head_weight):
    cfg = tiny_model_config(head_weight.shape[0], hidden_size=head_weight.shape[1], layers=1, heads=4, kv_heads=1,
                            intermediate_size=64, tie=True)
    from tandem_rt.models.llama import LlamaForCausalLM
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        m.model.embed_tokens.weight.copy_(head_weight)
    return m


def dequantized_reference(m, qtype):
    """float64 copy of drafting model ``m`` whose quantized matrices are their dequantized blocks
    and whose LM head (untied; the token embeddings stay dense) has the dequantized head rows."""
    layers, head = quantize_drafting_model(m, qtype)
    ref = copy.deepcopy(m).double()
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, q in layers.items():
            params[name].copy_(dequantize(q, torch.float64))
        full = torch.zeros(m.config.vocab_size, m.config.hidden_size, dtype=torch.float64)
        full[ref.vocab_subset] = dequantize(head, torch.float64)
        ref.lm_head = torch.nn.Linear(m.config.hidden_size, m.config.vocab_size, bias=False).double()
        ref.lm_head.weight.copy_(full)
    return ref


def _err(a, b):
    """Largest |a - b| over the finite entries (the same entries must be finite: the reduced vocabulary)."""
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a))
    return (a[finite].double() - b[finite].double()).abs().max().item()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_drafter_computes_the_dequantized_reference(qtype):
    model = reduced_vocab_model()
    dense = copy.deepcopy(model.drafter).double()
    ref = dequantized_reference(model.drafter, qtype)
    e = Engine(model, num_pages=32, page_size=8, max_batch_size=2, draft_quantization=qtype)
    assert isinstance(e.drafter.lm_head, QuantMatrix) and isinstance(e.drafter.layers[0].w_qkv, QuantMatrix)
    assert not isinstance(e.drafter.layers[0].w_down, QuantMatrix)    # 48 inputs: dense
    tokens = [3, 17, 42, 5, 60, 61, 9, 33, 70, 2, 11]
    pm = e.page_manager
    pm.add_sequence("s")
    assert not pm.prepare_write("s", 0, len(tokens))
    meta = build_meta(pm, ["s"], [0], [len(tokens)], [0], "cpu")
    got, _ = e.drafter.forward(torch.tensor(tokens), meta, e.drafter_cache.k, e.drafter_cache.v, step=True)
    want = ref(torch.tensor([tokens]))[0]
    scale = want[torch.isfinite(want)].abs().max().item()
    # the kernels' int8 activations (per 32 inputs; a product's relative error ~0.5% for Q8_0 blocks,
    # ~1.5% for Q4_1) compound over the layers: a bounded error against the dequantized weights;
    # Q4_1 moves the weights far more than that, and the result must follow the blocks, not the dense model
    assert _err(got, want) < (0.1 if qtype == "Q8_0" else 0.2) * scale
    if qtype == "Q4_1":
        assert _err(got, want) < 0.3 * _err(dense(torch.tensor([tokens]))[0], want)


def test_secondary_reads_the_quantized_kv_weights_in_the_refresh():
    model = reduced_vocab_model(seed=5)
    h = Harness(model, page_size=8)
    h.e = Engine(model, num_pages=64, page_size=8, max_batch_size=4, draft_quantization="Q4_1")
    h.pm = h.e.page_manager
    assert isinstance(h.e.secondary.kv_weights(0)[0], QuantMatrix)
    ref_model = copy.deepcopy(model).double()
    dense_secondary = ref_model.secondary
    seq, plen = [4, 8, 15, 16, 23, 42, 7, 1], 5
    h.pm.add_sequence("a")
    h.primary(["a"], [seq[:plen]], [0])                       # prefill + refresh of positions 0..4
    got = torch.cat([h.secondary(["a"], [seq[:plen]], [plen - 1], [plen]),   # query row at plen - 1
                     h.secondary(["a"], [seq], [plen], [plen])])               # own rows after it
    _, hidden = ref_model.primary(torch.tensor([seq]), hidden_layers=ref_model.layer_map)
    boundary = torch.minimum(torch.full((len(seq),), plen), torch.arange(len(seq)) + 1)
    results = {}
    for name, sec in (("dequantized", dequantized_reference(model.secondary, "Q4_1")),
                      ("dense", dense_secondary)):
        ref_model.secondary = sec
        results[name] = ref_model.secondary_forward(torch.tensor([seq]), hidden, boundary)[0][plen - 1:]
    want = results["dequantized"]
    scale = want[torch.isfinite(want)].abs().max().item()
    assert _err(got, want) < 0.2 * scale                       # int8 activations (as above)
    assert _err(got, want) < 0.3 * _err(results["dense"], want)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_lossless_modes_equal_primary_with_quantized_drafts(qtype):
    model = reduced_vocab_model(seed=7)
    e = Engine(model, num_pages=64, page_size=8, max_batch_size=4, draft_quantization=qtype)
    prompts = [[3, 9, 27, 50, 7], [11, 5, 60], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    sp = SamplingParams(max_new_tokens=14, ignore_eos=True)
    want = [r.token_ids for r in e.generate(prompts, sp, mode="primary")]
    for mode, gamma in (("speed", 3), ("tandem-speed", 4), ("tandem-speed", "auto")):
        got = e.generate(prompts, sp, mode=mode, gamma=gamma)
        assert [r.token_ids for r in got] == want, (mode, gamma)
        assert sum(r.stats["blocks"] for r in got) > 0


@pytest.mark.cuda
@pytest.mark.parametrize("graphs", [False, True])
def test_quantized_drafts_on_cuda(graphs):
    """On a GPU the drafting models' blocks move to the device (CUDA ``linear_rows_q``), with and
    without CUDA graphs; greedy speculative output equals the primary's (fp32: but for
    accumulation-order near-ties between the primary's verify and decode rows)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (runs on the lent GPU machine)")
    model = reduced_vocab_model(seed=9, head_dim=32)
    e = Engine(model, device="cuda", num_pages=64, page_size=16, use_cuda_graphs=graphs, draft_quantization="Q8_0")
    assert e.secondary.lm_head.blocks.is_cuda and e.drafter.layers[0].w_qkv.blocks.is_cuda
    prompts = [[3, 9, 27, 50, 7], [11, 5, 60]]
    sp = SamplingParams(max_new_tokens=16, ignore_eos=True)
    want = [r.token_ids for r in e.generate(prompts, sp, mode="primary")]
    for mode in ("speed", "tandem-speed"):
        got = [r.token_ids for r in e.generate(prompts, sp, mode=mode, gamma=3)]
        agree = sum(a == b for x, y in zip(got, want) for a, b in zip(x, y)) / sum(map(len, want))
        assert agree > 0.9, (mode, got, want)


def test_bad_draft_quantization_is_refused():
    model = reduced_vocab_model()
    with pytest.raises(ValueError, match="draft_quantization must be None or one of"):
        Engine(model, num_pages=8, page_size=8, draft_quantization="Q4_0")
    with pytest.raises(ValueError, match="draft_quantization needs bfloat16 or float32"):
        Engine(copy.deepcopy(model), num_pages=8, page_size=8, dtype=torch.float16, draft_quantization="Q8_0")
    with pytest.raises(ValueError, match="qtype must be one of"):
        quantize_drafting_model(model.drafter, "Q5_K")
    odd = tiny_model_config(V, hidden_size=24, layers=1, heads=2, kv_heads=1, intermediate_size=40, tie=True)
    small = TandemModel(TandemConfig(primary=model.config.primary, secondary=odd, drafter=odd, torch_dtype="float32",
                                     layer_map=[3]))
    with pytest.raises(ValueError, match="no matrix with a multiple of 32 inputs"):
        Engine(small, num_pages=8, page_size=8, draft_quantization="Q8_0")
    layers, head = quantize_drafting_model(model.drafter, "Q8_0")
    with pytest.raises(ValueError, match=r"quantized_head must be a QuantMatrix \[32, 32\]"):
        PagedLlama(model.drafter, quantized=layers, quantized_head=head.rows(0, 16))
    with pytest.raises(ValueError, match="quantized_head must be a QuantMatrix"):
        PagedLlama(model.drafter, quantized_head=torch.zeros(32, 32))


def test_generate_cli_quantizes_the_drafts(tmp_path, capsys, monkeypatch):
    import json

    from tandem_rt.checkpoint import save_checkpoint
    from tandem_rt.cli import main

    model = reduced_vocab_model(seed=16)
    save_checkpoint(model, tmp_path / "ckpt")
    sp = SamplingParams(max_new_tokens=8, ignore_eos=True)
    want = Engine(copy.deepcopy(model), num_pages=64, draft_quantization="Q4_1").generate(
        [[4, 5, 6]], sp, mode="tandem-speed", gamma=3)[0]
    dense = Engine(copy.deepcopy(model), num_pages=64).generate([[4, 5, 6]], sp, mode="tandem-speed", gamma=3)[0]
    args = ["generate", "--model", str(tmp_path / "ckpt"), "--prompt-ids", "4,5,6", "--mode", "tandem-speed",
            "--gamma", "3", "--max-new-tokens", "8", "--ignore-eos", "--dtype", "float32", "--json", "--stats"]
    import tandem_rt.quantized as quantized

    seen = []
    real = quantized.quantize_drafting_model
    monkeypatch.setattr(quantized, "quantize_drafting_model", lambda m, q: seen.append(q) or real(m, q))
    assert main(args + ["--draft-quantization", "Q4_1"]) == 0
    out = json.loads(capsys.readouterr().out)[0]
    assert out["token_ids"] == want.token_ids == dense.token_ids            # lossless
    # the flag reached the engine: both drafting models quantized to Q4_1, the run as the Q4_1 engine's
    assert seen == ["Q4_1", "Q4_1"]
    assert out["stats"]["accepted_tokens"] == want.stats["accepted_tokens"]


def test_auto_means_q8_0_drafts_on_the_cpu(tmp_path, monkeypatch):
    from tandem_rt.checkpoint import save_checkpoint
    from tandem_rt.cli import main
    from tandem_rt.engine.engine import auto_draft_quantization

    model = reduced_vocab_model(seed=2)
    assert auto_draft_quantization(model, "cpu", torch.float32) == "Q8_0"
    assert auto_draft_quantization(model, "cpu", torch.bfloat16) == "Q8_0"
    assert auto_draft_quantization(model, "cpu", None) == "Q8_0"          # the model's dtype (fp32)
    assert auto_draft_quantization(model, "cpu", torch.float16) is None
    assert auto_draft_quantization(model, "cuda", torch.bfloat16) is None
    narrow = tiny_model_config(V, hidden_size=24, layers=1, heads=2, kv_heads=1, intermediate_size=40, tie=True)
    assert auto_draft_quantization(TandemModel(TandemConfig(primary=model.config.primary, secondary=narrow,
                                                            torch_dtype="float32", layer_map=[3])),
                                   "cpu", torch.float32) is None
    save_checkpoint(model, tmp_path / "ckpt")
    assert Engine.from_pretrained(str(tmp_path / "ckpt"), num_pages=16).runner.draft_quantization == "Q8_0"
    e = Engine.from_pretrained(str(tmp_path / "ckpt"), num_pages=16, draft_quantization=None)
    assert e.runner.draft_quantization is None and not isinstance(e.drafter.lm_head, QuantMatrix)
    # the CLI: auto by default, "none" for dense drafting models
    seen = []
    real = Engine.from_pretrained.__func__

    def spy(cls, *a, **kw):
        seen.append(kw.get("draft_quantization", "auto"))
        return real(cls, *a, **kw)

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(spy))
    base = ["generate", "--model", str(tmp_path / "ckpt"), "--prompt-ids", "4,5,6", "--max-new-tokens", "2"]
    assert main(base) == 0 and main(base + ["--draft-quantization", "none"]) == 0
    assert seen == ["auto", None]


@pytest.mark.parametrize("draft_quantization", [None, "Q8_0"])
def test_reduced_vocabulary_greedy_drafts_equal_the_scattered_argmax(monkeypatch, draft_quantization):
    # steps.draft's greedy drafts from the subset's logits (mapped to token ids) against the argmax
    # of the scattered full-vocabulary row: the same drafts, so the same blocks and acceptance
    from tandem_rt.engine import steps

    import dataclasses

    from engine_models import agreeing_tandem_model

    # drafting models that agree with the primary, given a reduced vocabulary holding the primary's
    # greedy tokens on these prompts (so that drafts are accepted and a wrong mapping would show)
    base = agreeing_tandem_model(seed=21, vocab_size=64, layer_scale=0.4)
    prompts = [[3, 9, 27, 50, 7], [11, 5, 60], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    sp = SamplingParams(max_new_tokens=16, ignore_eos=True)
    seen = {t for r in Engine(copy.deepcopy(base), num_pages=64, page_size=8).generate(prompts, sp, mode="primary")
            for t in r.token_ids}
    keep = sorted(seen)[:32]
    keep = sorted(keep + [t for t in range(63, -1, -1) if t not in seen][:32 - len(keep)])
    cfg = base.config
    cfg = dataclasses.replace(cfg, secondary=dataclasses.replace(cfg.secondary, output_vocab_size=32),
                              drafter=dataclasses.replace(cfg.drafter, output_vocab_size=32))
    model = TandemModel(cfg)
    model.load_state_dict(base.state_dict(), strict=False)
    for part in (model.secondary, model.drafter):
        part.vocab_subset.copy_(torch.tensor(keep))
    model.eval()
    calls = []
    real = steps.reduced_greedy_drafts
    monkeypatch.setattr(steps, "reduced_greedy_drafts", lambda *a: calls.append(real(*a)) or calls[-1])

    def run():
        e = Engine(copy.deepcopy(model), num_pages=64, page_size=8, max_batch_size=4,
                   draft_quantization=draft_quantization)
        out = []
        for mode, gamma in (("speed", 3), ("tandem-speed", 4)):
            out += [(r.token_ids, r.stats["accepted_tokens"], r.stats["drafted_tokens"], r.stats["blocks"])
                    for r in e.generate(prompts, sp, mode=mode, gamma=gamma)]
        return out

    fast = run()
    assert calls and all(calls)
    monkeypatch.setattr(steps, "reduced_greedy_drafts", lambda *a: False)
    assert run() == fast
    assert sum(x[1] for x in fast) > 0
