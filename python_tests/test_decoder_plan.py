"""``_C.cpu.DecoderPlan``: the decoder layers of a CPU step in one C++ call give bit-identical logits,
residual streams and K/V pools to the Python loop over the same ops (dense bf16 / fp32 weights and
GGUF-quantized ones), on ragged batches of decode and verify rows; bad arguments are refused."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import random_tandem_model
from tandem_rt._ext import _C
from tandem_rt.paged.page_manager import PageManager
from tandem_rt.engine.paged_model import PagedLlama, build_meta


def pools(model, num_pages=16, page_size=4):
    cfg = model.config
    shape = (num_pages, page_size, cfg.num_key_value_heads, cfg.head_dim)
    dtype = model.output_weight.dtype
    return ([torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)],
            [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)])


SMALL_STEPS = ([1, 1], [4, 2], [1, 3])   # decode rows, then ragged verify blocks
LARGE_STEPS = ([1, 1], [40, 30], [9, 1])  # a step of 70 rows, then 10 (several row passes per product)


def run_steps(paged: PagedLlama, model, hidden_layers, steps=SMALL_STEPS, num_pages=16, prompt_lens=(9, 5)):
    """Prompts of two sequences (Python path), then the steps (step=True) of ``steps`` rows per
    sequence -> (list of (logits, streams) per step, final K/V pools)."""
    torch.manual_seed(0)
    pm = PageManager(num_pages=num_pages, page_size=4)
    k, v = pools(model, num_pages=num_pages)
    seqs = {"a": torch.randint(0, 97, (prompt_lens[0],)).tolist(), "b": torch.randint(0, 97, (prompt_lens[1],)).tolist()}
    for sid, toks in seqs.items():
        pm.add_sequence(sid)
        pm.prepare_write(sid, 0, len(toks))
        meta = build_meta(pm, [sid], [0], [len(toks)], [0], "cpu")
        paged.forward(torch.tensor(toks), meta, k, v)
    outs = []
    for rows in steps:
        starts, ends, ids = [], [], []
        for (sid, toks), r in zip(seqs.items(), rows):
            new = torch.randint(0, 97, (r,)).tolist()
            starts.append(len(toks))
            toks.extend(new)
            ends.append(len(toks))
            ids.extend(new)
            pm.prepare_write(sid, starts[-1], ends[-1])
        meta = build_meta(pm, list(seqs), starts, ends, starts, "cpu")
        outs.append(paged.forward(torch.tensor(ids), meta, k, v, hidden_layers=hidden_layers, step=True))
    return outs, (k, v)


@pytest.mark.parametrize("steps", [SMALL_STEPS, LARGE_STEPS], ids=["small", "large"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_equals_the_python_loop(dtype, steps):
    model = random_tandem_model(seed=4).primary.to(dtype)
    hidden = [0, 2, model.config.num_hidden_layers]
    with_plan = PagedLlama(copy.deepcopy(model))
    without = PagedLlama(copy.deepcopy(model), decoder_plan=False)
    assert with_plan.decoder_plan is not None and without.decoder_plan is None
    got, (gk, gv) = run_steps(with_plan, model, hidden, steps, num_pages=32)
    ref, (rk, rv) = run_steps(without, model, hidden, steps, num_pages=32)
    for (gl, gs), (rl, rs) in zip(got, ref):
        assert torch.equal(gl, rl)
        assert len(gs) == len(rs) == 3 and all(torch.equal(a, b) for a, b in zip(gs, rs))
    assert all(torch.equal(a, b) for a, b in zip(gk + gv, rk + rv))


@pytest.mark.parametrize("steps", [SMALL_STEPS, LARGE_STEPS], ids=["small", "large"])
def test_plan_equals_the_python_loop_on_quantized_weights(tmp_path, steps):
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
    from test_quantized_engine import quant_plan
    from tiny_ecosystem_models import tiny_hf_model, write_llama_gguf
    from tandem_rt.gguf import load_gguf_model
    from tandem_rt.quantized import QuantMatrix, read_gguf_matrices

    del gguf
    ref_hf = tiny_hf_model("llama", tie=True, vocab=97, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96,
                           seed=7)
    path = write_llama_gguf(ref_hf, tmp_path / "tiny.gguf", quant=quant_plan())
    model = load_gguf_model(path).float()
    mats = read_gguf_matrices(path)
    with_plan = PagedLlama(copy.deepcopy(model), quantized=mats)
    without = PagedLlama(copy.deepcopy(model), quantized=mats, decoder_plan=False)
    assert isinstance(with_plan.layers[0].w_qkv, QuantMatrix)
    got, (gk, gv) = run_steps(with_plan, model, [1, 2], steps, num_pages=32)
    ref, (rk, rv) = run_steps(without, model, [1, 2], steps, num_pages=32)
    for (gl, gs), (rl, rs) in zip(got, ref):
        assert torch.equal(gl, rl) and all(torch.equal(a, b) for a, b in zip(gs, rs))
    assert all(torch.equal(a, b) for a, b in zip(gk + gv, rk + rv))


@pytest.fixture
def threads():
    """Sets torch's CPU thread count for a test and restores it."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


@pytest.mark.parametrize("num_threads", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_team_equals_the_python_loop(dtype, num_threads, threads):
    """With several threads the plan runs a step as one team (one parallel region, barriers between
    the ops); the plan forking the threads per op and the Python loop give the same bits."""
    threads(num_threads)
    model = random_tandem_model(seed=5).primary.to(dtype)
    hidden = [1, model.config.num_hidden_layers]
    team = PagedLlama(copy.deepcopy(model))
    op_by_op = PagedLlama(copy.deepcopy(model))
    op_by_op.decoder_plan = op_by_op._build_decoder_plan(team=False)
    loop = PagedLlama(copy.deepcopy(model), decoder_plan=False)
    assert team.decoder_plan.team and not op_by_op.decoder_plan.team
    got, (gk, gv) = run_steps(team, model, hidden)
    for other in (op_by_op, loop):
        ref, (rk, rv) = run_steps(other, model, hidden)
        for (gl, gs), (rl, rs) in zip(got, ref):
            assert torch.equal(gl, rl) and all(torch.equal(a, b) for a, b in zip(gs, rs))
        assert all(torch.equal(a, b) for a, b in zip(gk + gv, rk + rv))


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_long_contexts_equal_the_python_loop(num_threads, threads):
    """Sequences longer than one attention key segment (512 keys): the plan shares one scratch for
    the segments' partial states across its layers and its team; the Python loop lets each
    attention call allocate its own; the same bits, whatever the thread count."""
    threads(num_threads)
    model = random_tandem_model(seed=6).primary.to(torch.bfloat16)
    plan = PagedLlama(copy.deepcopy(model))
    loop = PagedLlama(copy.deepcopy(model), decoder_plan=False)
    kw = dict(num_pages=420, prompt_lens=(1030, 530))
    got, (gk, gv) = run_steps(plan, model, [1], **kw)
    ref, (rk, rv) = run_steps(loop, model, [1], **kw)
    for (gl, gs), (rl, rs) in zip(got, ref):
        assert torch.equal(gl, rl) and all(torch.equal(a, b) for a, b in zip(gs, rs))
    assert all(torch.equal(a, b) for a, b in zip(gk + gv, rk + rv))


@pytest.mark.parametrize("team", [True, False])
def test_plan_reports_an_error_inside_a_layer(team, threads):
    """A bad argument met by a later layer (its K pool has the wrong head count) raises the op's
    ValueError from the team as from the serial plan, and the plan stays usable."""
    threads(2)
    model = random_tandem_model(seed=4).primary
    paged = PagedLlama(model)
    plan = paged._build_decoder_plan(team=team)
    k, v = pools(model)
    cfg = model.config
    args = (torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int32),
            torch.ones(1, dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), 1, 1)
    x = torch.randn(1, cfg.hidden_size)
    bad = list(k)
    bad[1] = torch.zeros(16, 4, cfg.num_key_value_heads + 1, cfg.head_dim)
    with pytest.raises(ValueError, match="k_cache"):
        plan.run(x, *args, bad, v, [])
    out = plan.run(x, *args, k, v, [1])
    assert len(out) == 2 and torch.isfinite(out[0]).all()


def test_plan_refuses_bad_arguments():
    model = random_tandem_model(seed=4).primary
    paged = PagedLlama(model)
    plan = paged.decoder_plan
    assert plan.num_layers == model.config.num_hidden_layers
    k, v = pools(model)
    x = torch.zeros(1, model.config.hidden_size)
    args = (torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int32),
            torch.ones(1, dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), 1, 1)
    with pytest.raises(ValueError, match="one pool per layer"):
        plan.run(x, *args, k[:1], v, [])
    with pytest.raises(ValueError, match="hidden_layers entries must be in"):
        plan.run(x, *args, k, v, [plan.num_layers + 1])
    with pytest.raises(ValueError, match="kernel must be 0"):
        lw = paged.layers[0]
        _C.cpu.DecoderPlan([(lw.ln1, (lw.w_qkv, 7, 0), None, (lw.w_o, 0, 0), lw.ln2, (lw.w_gate_up, 0, 0),
                             (lw.w_down, 0, 0))], 4, 2, 12, 1e-5, 10000.0, 0.1)
    with pytest.raises(ValueError, match="bad head counts"):
        _C.cpu.DecoderPlan([], 3, 2, 12, 1e-5, 10000.0, 0.1)
    with pytest.raises(ValueError, match="decoder_plan needs the CPU engine"):
        PagedLlama(copy.deepcopy(model).half(), decoder_plan=True)
