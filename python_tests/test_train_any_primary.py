"""The trainer for any primary (``tandem-rt train``): primary cache, drafting masks, cached
distillation loss, projection fit, reduced draft vocabulary, and the pipeline end to end on a
tiny primary. References are independent (direct forwards, float64 loops)."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import tiny_model_config
from tandem_rt.checkpoint import load_checkpoint, save_checkpoint
from tandem_rt.config import TandemConfig
from tandem_rt.models import TandemModel
from tandem_rt.models.llama import LlamaForCausalLM
from tandem_rt.models.random_init import randomize_
from tandem_rt.train import draft_training as dt
from tandem_rt.train.primary_cache import CacheError, PrimaryCache, build_primary_cache

SENTENCES = ["The little girl ran to the garden and saw a cat.", "Once upon a time there was a king who had three sons.",
             "\"Come here,\" said the old woman, and the boy came.", "The sun was warm and the birds sang in the trees."]

V = 1024  # the test tokenizer's vocabulary (random primaries may predict any id below it)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A small byte-level BPE trained on the test sentences (vocabulary padded to V by the model)."""
    from tandem_rt.train.tokenizer import train_bpe

    tok = train_bpe(SENTENCES * 20, vocab_size=300, min_frequency=1)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def tiny_primary(seed=0, layers=4, hidden=32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    m = LlamaForCausalLM(tiny_model_config(V, hidden_size=hidden, layers=layers, heads=4, kv_heads=2,
                                           intermediate_size=64))
    randomize_(m, 0.3, norm_range=(0.8, 1.2), vector_std=0.1)
    return m.eval()


def save_primary_checkpoint(primary: LlamaForCausalLM, path, tokenizer) -> None:
    sec = tiny_model_config(V, hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32)
    cfg = TandemConfig(primary=primary.config, secondary=sec, torch_dtype="float32")
    model = TandemModel(cfg)
    model.primary.load_state_dict(primary.state_dict())
    save_checkpoint(model, path, tokenizer=str(tokenizer))


def windows(n=6, T=24, seed=0):
    g = np.random.default_rng(seed)
    return g.integers(0, V, size=(n, T)).astype(np.int32)


# ----------------------------------------------------------------------------- primary cache

def test_cache_matches_direct_forward(tmp_path):
    prim = tiny_primary()
    w = windows()
    cache = build_primary_cache(prim, w, tmp_path / "c", [2, 4], top_k=5, primary_sha256="a" * 64,
                                tokenizer_sha256="b" * 64, batch_size=4, progress=False)
    assert len(cache) == 6
    with torch.no_grad():
        logits, hidden = prim(torch.from_numpy(w.astype(np.int64)), hidden_layers=[2, 4])
    b = cache.batch([1, 4, 5])
    idx = torch.tensor([1, 4, 5])
    assert torch.equal(b.tokens, torch.from_numpy(w[[1, 4, 5]].astype(np.int64)))
    for m in range(2):
        assert torch.equal(b.hidden[m], hidden[m][idx].to(torch.bfloat16))
    p64 = torch.softmax(logits[idx].double(), -1)
    ref_p, ref_i = p64.topk(5, -1)
    assert torch.equal(b.topk_ids, ref_i)
    torch.testing.assert_close(b.topk_probs, ref_p.float(), atol=2e-3, rtol=2e-3)


def test_cache_resumes_to_identical_bytes(tmp_path):
    prim = tiny_primary()
    w = windows(n=7)
    kw = dict(layer_map=[1, 4], top_k=3, primary_sha256="a" * 64, tokenizer_sha256="b" * 64, progress=False)
    build_primary_cache(prim, w, tmp_path / "one", batch_size=2, **kw)
    assert build_primary_cache(prim, w, tmp_path / "two", batch_size=2, max_windows=3, **kw) is None
    with pytest.raises(CacheError, match="incomplete"):
        PrimaryCache(tmp_path / "two")
    # bytes written after the last recorded window (a crash mid-write) are dropped on resume
    with open(tmp_path / "two" / "hidden.bin", "ab") as fh:
        fh.write(b"\x01" * 100)
    build_primary_cache(prim, w, tmp_path / "two", batch_size=2, **kw)
    for name in ("tokens.bin", "hidden.bin", "topk_ids.bin", "topk_probs.bin"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


@pytest.mark.parametrize("change", ["primary", "tokenizer", "layer_map", "data"])
def test_cache_from_other_primary_is_refused(tmp_path, change):
    prim = tiny_primary()
    w = windows()
    kw = dict(layer_map=[2, 4], top_k=3, primary_sha256="a" * 64, tokenizer_sha256="b" * 64, progress=False)
    build_primary_cache(prim, w, tmp_path / "c", **kw)
    if change == "primary":
        kw["primary_sha256"] = "c" * 64
    elif change == "tokenizer":
        kw["tokenizer_sha256"] = "d" * 64
    elif change == "layer_map":
        kw["layer_map"] = [1, 4]
    else:
        w = windows(seed=1)
    field = {"primary": "primary_sha256", "tokenizer": "tokenizer_sha256", "layer_map": "layer_map",
             "data": "windows_sha256"}[change]
    with pytest.raises(CacheError, match=field):
        build_primary_cache(prim, w, tmp_path / "c", **kw)


def test_cache_refuses_bad_input_and_full_disk(tmp_path, monkeypatch):
    prim = tiny_primary()
    kw = dict(layer_map=[2], top_k=3, primary_sha256="a" * 64, tokenizer_sha256="b" * 64, progress=False)
    with pytest.raises(CacheError, match="non-empty"):
        build_primary_cache(prim, np.zeros((0, 8), np.int32), tmp_path / "e", **kw)
    with pytest.raises(CacheError, match="vocabulary"):
        build_primary_cache(prim, np.full((2, 8), V, np.int32), tmp_path / "v", **kw)
    with pytest.raises(CacheError, match="layer_map"):
        build_primary_cache(prim, windows(), tmp_path / "l", **{**kw, "layer_map": [9]})
    import shutil as sh

    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10, 10, 10))
    with pytest.raises(CacheError, match="not enough disk space"):
        build_primary_cache(prim, windows(), tmp_path / "d", **kw)


def test_corrupt_cache_file_is_refused(tmp_path):
    prim = tiny_primary()
    build_primary_cache(prim, windows(), tmp_path / "c", [4], 3, "a" * 64, "b" * 64, progress=False)
    with open(tmp_path / "c" / "topk_ids.bin", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(CacheError, match="topk_ids.bin"):
        PrimaryCache(tmp_path / "c")


# ----------------------------------------------------------------------------- drafting masks and loss

@pytest.mark.parametrize("gamma", [1, 2, 3, 5, 8])
def test_drafting_boundary_matches_block_definition(gamma):
    T = 40
    for phase in range(gamma):
        b = dt.drafting_boundary(T, gamma, phase).tolist()
        for i in range(T):
            # blocks start at phase, phase + γ, ...; before the first start the block starts at 0
            starts = [s for s in range(phase, T, gamma) if s <= i]
            expect = starts[-1] if starts else 0
            assert b[i] == expect
            assert 1 <= i - b[i] + 1 <= max(gamma, phase)


def test_sampler_covers_each_window_once_per_epoch_and_resumes():
    s = dt.CacheWindowSampler(10, gamma_max=4, seed=3)
    plans = torch.cat([s.sample(4) for _ in range(5)])  # 20 draws = 2 epochs
    for epoch in (plans[:10], plans[10:]):
        assert sorted(epoch[:, 0].tolist()) == list(range(10))
    assert plans[:, 1].min() >= 1 and plans[:, 1].max() <= 4
    assert bool(((plans[:, 2] >= 0) & (plans[:, 2] < plans[:, 1])).all())
    state = s.state_dict()
    a = s.sample(6)
    s2 = dt.CacheWindowSampler(10, gamma_max=4, seed=99)
    s2.load_state_dict(state)
    assert torch.equal(a, s2.sample(6))


def _loss_reference(logits, batch, w, subset):
    """float64 per-position loop of the cached distillation loss."""
    B, T, _ = logits.shape
    ce_terms, kd_terms = [], []
    ids_list = subset.tolist() if subset is not None else None
    for b in range(B):
        for i in range(T - 1):
            row = logits[b, i].double()
            lsm = row - torch.logsumexp(row, 0)
            tgt = int(batch.tokens[b, i + 1])
            if ids_list is None:
                ce_terms.append(-float(lsm[tgt]))
            elif tgt in ids_list:
                ce_terms.append(-float(lsm[ids_list.index(tgt)]))
            q, lp = [], []
            for t, p in zip(batch.topk_ids[b, i].tolist(), batch.topk_probs[b, i].tolist()):
                if ids_list is None:
                    q.append(p), lp.append(float(lsm[t]))
                elif t in ids_list:
                    q.append(p), lp.append(float(lsm[ids_list.index(t)]))
            if q:
                z = sum(q)
                kd_terms.append(-sum(qq / z * l for qq, l in zip(q, lp)))
    ce = sum(ce_terms) / len(ce_terms)
    kd = sum(kd_terms) / len(kd_terms)
    return (1 - w) * ce + w * kd


@pytest.mark.parametrize("reduced", [False, True])
def test_cached_distil_loss_matches_float64_loop(reduced):
    g = torch.Generator().manual_seed(0)
    B, T, Vs, k = 2, 6, 20, 4
    subset = torch.tensor([0, 2, 3, 5, 7, 11, 13, 17]) if reduced else None
    N = subset.numel() if reduced else Vs
    logits = torch.randn(B, T, N, generator=g)
    tokens = torch.randint(0, Vs, (B, T), generator=g)
    tokens[0, 1], tokens[1, 2] = 2, 11  # some targets inside the subset
    ids = torch.stack([torch.randperm(Vs, generator=g)[:k] for _ in range(B * T)]).view(B, T, k)
    probs = torch.rand(B, T, k, generator=g) / k
    batch = dt.CacheBatch(tokens, [], ids, probs)
    index = dt.subset_index(subset, Vs)
    loss, _ = dt.cached_distil_loss(logits, batch, 0.5, index)
    assert math.isclose(float(loss), _loss_reference(logits, batch, 0.5, subset), rel_tol=1e-5)


def test_fit_projections_recovers_a_linear_map(tmp_path):
    """When the primary's residual is an exact affine image of the secondary's own residual,
    the ridge fit predicts it (R^2 ~ 1)."""
    prim = tiny_primary(layers=2)
    cfg = dt.small_model_config(prim.config, 1, "primary")
    small = dt.init_small_model(prim, cfg, "primary")
    draft = dt.TandemDraft(small, prim.config.hidden_size)
    # layer_map [0]: x^(0) is the primary's embedding, which equals the secondary's y^(0)
    build_primary_cache(prim, windows(n=40), tmp_path / "c", [0], 3, "a" * 64, "b" * 64, progress=False)
    cache = PrimaryCache(tmp_path / "c")
    r2 = dt.fit_projections(draft, cache, num_windows=40, ridge=1e-8)
    assert r2[0] > 0.999
    torch.testing.assert_close(draft.proj[0].weight, torch.eye(32), atol=2e-2, rtol=0)


def test_init_from_primary_copies_layers_and_freezes_embeddings():
    prim = tiny_primary()
    cfg = dt.small_model_config(prim.config, 2, "primary", draft_vocab=100)
    subset = torch.arange(0, 200, 2)
    small = dt.init_small_model(prim, cfg, "primary", vocab_subset=subset)
    assert torch.equal(small.model.embed_tokens.weight, prim.model.embed_tokens.weight)
    assert not small.model.embed_tokens.weight.requires_grad
    for name, t in small.state_dict().items():
        if name.startswith("model.layers."):
            assert torch.equal(t, prim.state_dict()[name]), name
    assert torch.equal(small.vocab_subset, subset)


def test_init_layers_copy_the_named_primary_layers():
    prim = tiny_primary(layers=4)
    cfg = dt.small_model_config(prim.config, 2, "primary")
    small = dt.init_small_model(prim, cfg, "primary", layers=[1, 3])
    p_sd = prim.state_dict()
    for name, t in small.state_dict().items():
        if name.startswith("model.layers."):
            j, rest = name[len("model.layers."):].split(".", 1)
            assert torch.equal(t, p_sd[f"model.layers.{[1, 3][int(j)]}.{rest}"]), name
    assert torch.equal(small.model.norm.weight, prim.model.norm.weight)
    for bad in ([1], [3, 1], [1, 1], [0, 4]):
        with pytest.raises(ValueError, match="init_layers"):
            dt.init_small_model(prim, cfg, "primary", layers=bad)


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_identity_projections_on_copied_layers_reproduce_the_primary(gamma):
    """A secondary that copies *every* primary layer, with identity projections and the layer map
    reading each layer's input, computes exactly the primary: its primary-derived K/V are the
    primary's own K/V, its own K/V the same values recomputed. So for any drafting boundary its
    logits equal the primary's causal forward (an independent reference)."""
    prim = tiny_primary(layers=3)
    cfg = dt.small_model_config(prim.config, 3, "primary")
    small = dt.init_small_model(prim, cfg, "primary", layers=[0, 1, 2]).eval()
    draft = dt.TandemDraft(small, prim.config.hidden_size)
    dt.init_projections_identity(draft)
    ids = torch.randint(0, V, (2, 17))
    with torch.no_grad():
        ref, hidden = prim(ids, hidden_layers=[0, 1, 2])
        boundary = dt.drafting_boundary(17, gamma).expand(2, 17)
        out = draft(ids, hidden, boundary)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # a secondary that skips layers differs from the primary (the test can fail)
    cfg2 = dt.small_model_config(prim.config, 2, "primary")
    skip = dt.TandemDraft(dt.init_small_model(prim, cfg2, "primary", layers=[0, 2]).eval(), prim.config.hidden_size)
    dt.init_projections_identity(skip)
    with torch.no_grad():
        assert not torch.allclose(skip(ids, [hidden[0], hidden[2]], boundary), ref, atol=1e-2)


def test_identity_projections_need_equal_widths():
    prim = tiny_primary(layers=2, hidden=32)
    small = dt.init_small_model(prim, dt.small_model_config(prim.config, 1, "scratch",
                                                            {"hidden_size": 16, "intermediate_size": 32,
                                                             "num_attention_heads": 2, "num_key_value_heads": 1,
                                                             "head_dim": 8}), "scratch")
    with pytest.raises(ValueError, match="identity projections need"):
        dt.init_projections_identity(dt.TandemDraft(small, 32))


# ----------------------------------------------------------------------------- reduced vocabulary

def test_reduced_vocabulary_logits_are_the_full_ones_masked():
    prim = tiny_primary()
    cfg = dt.small_model_config(prim.config, 2, "primary", draft_vocab=50)
    subset = torch.sort(torch.randperm(V)[:50]).values
    small = dt.init_small_model(prim, cfg, "primary", vocab_subset=subset).eval()
    full_cfg = dt.small_model_config(prim.config, 2, "primary")
    full = dt.init_small_model(prim, full_cfg, "primary").eval()
    full.load_state_dict({k: v for k, v in small.state_dict().items() if k != "vocab_subset"})
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        a, b = small(ids), full(ids)
    assert torch.isinf(a[..., [i for i in range(60) if i not in set(subset.tolist())]]).all()
    torch.testing.assert_close(a[..., subset], b[..., subset])
    assert torch.equal(small(ids, reduced=True), b[..., subset])


def test_choose_draft_vocab_takes_the_most_frequent(tmp_path):
    prim = tiny_primary()
    w = np.zeros((4, 10), np.int32)
    w[:, ::2] = 7
    w[:, 1::2] = np.arange(1, 6) * 100
    build_primary_cache(prim, w, tmp_path / "c", [4], 2, "a" * 64, "b" * 64, progress=False)
    cache = PrimaryCache(tmp_path / "c")
    ids = dt.choose_draft_vocab(cache, 3, always=(1,))
    assert 1 in ids.tolist() and 7 in ids.tolist()
    assert ids.tolist() == sorted(set(ids.tolist())) and ids.numel() == 3


# ----------------------------------------------------------------------------- pipeline end to end



def write_corpus(directory, n_train=400, n_val=80):
    directory.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    for name, n in (("train.txt", n_train), ("val.txt", n_val)):
        lines = []
        for i in range(n):
            lines.append(" ".join(SENTENCES[j] for j in g.integers(0, 4, size=3)))
            if i % 50 == 49:
                lines.append("<|endoftext|>")
        (directory / name).write_text("\n".join(lines) + "\n")
    return directory


def tiny_plan(tmp_path, tokenizer, **kw):
    from tandem_rt.train.pipeline import TrainPlan

    if not (tmp_path / "primary").is_dir():
        save_primary_checkpoint(tiny_primary(), tmp_path / "primary", tokenizer)
        write_corpus(tmp_path / "corpus")
    args = dict(primary=str(tmp_path / "primary"), corpus=str(tmp_path / "corpus"), out=str(tmp_path / "out"),
                run_dir=str(tmp_path / "run"), train_tokens=2048, heldout_tokens=512, seq_len=32, num_layers=1,
                top_k=4, gamma_max=4, epochs=1.0, batch_size=4, draft_vocab=200, router_steps=20)
    args.update(kw)
    return TrainPlan(**args)


def test_pipeline_end_to_end_resumes_and_exports(tmp_path, one_torch_thread, tokenizer_file):
    from tandem_rt.engine import Engine, SamplingParams
    from tandem_rt.train.pipeline import run_pipeline

    plan = tiny_plan(tmp_path, tokenizer_file, reference_primary=True)
    assert run_pipeline(plan, progress=False, stop_after="cache") == {}
    meta = json.loads((tmp_path / "run" / "cache" / "meta.json").read_text())
    assert meta["windows_done"] == 2048 // 32
    # interrupt the drafter half-way: the run state is resumed, not restarted
    from tandem_rt.train import loop

    real_train = loop.train
    calls = []

    def counting_train(*a, **k):
        calls.append(k.get("max_steps"))
        return real_train(*a, **k)

    import tandem_rt.train.loop as loop_mod
    loop_mod.train = counting_train
    try:
        report = run_pipeline(plan, progress=False)
    finally:
        loop_mod.train = real_train
    assert (tmp_path / "run" / "drafter" / "half" / "ckpt.pt").is_file()
    assert set(report) >= {"primary", "drafter-Distil", "Tandem-Distil", "_meta"}
    for name in ("drafter-Distil", "Tandem-Distil"):
        r = report[name]
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["relative_tv"] <= 1 and r["target_coverage"] > 0.5
    ckpt = load_checkpoint(tmp_path / "out", dtype=torch.float32, derived_cache=tmp_path / "derived")
    cfg = ckpt.config
    assert cfg.primary_source["kind"] == "tandem" and cfg.shared_embeddings == ["secondary", "drafter"]
    assert cfg.secondary.output_vocab_size == 200 and cfg.drafter.output_vocab_size == 200
    assert torch.equal(ckpt.secondary.vocab_subset, torch.load(tmp_path / "run" / "draft_vocab.pt"))
    # the exported pieces are the trained ones, and the engine runs them losslessly
    engine = Engine.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    ref = engine.generate(["The little girl"], sp, mode="primary")[0].token_ids
    for mode in ("speed", "tandem-speed"):
        assert engine.generate(["The little girl"], sp, mode=mode, gamma=3)[0].token_ids == ref
    # a second run reuses every stage: nothing is trained again, no projection is fitted again
    from tandem_rt.train import draft_training

    calls.clear()
    real_fit, fits = draft_training.fit_projections, []
    loop_mod.train = counting_train
    draft_training.fit_projections = lambda *a, **k: fits.append(1) or real_fit(*a, **k)
    try:
        again = run_pipeline(plan, progress=False)
    finally:
        loop_mod.train, draft_training.fit_projections = real_train, real_fit
    assert calls == [] and fits == []
    assert again["Tandem-Distil"]["relative_tv"] == report["Tandem-Distil"]["relative_tv"]


def test_pipeline_refuses_bad_corpora_and_changed_options(tmp_path, tokenizer_file):
    from tandem_rt.train.pipeline import TrainError, run_pipeline

    plan = tiny_plan(tmp_path, tokenizer_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.txt").write_text("")
    with pytest.raises(TrainError, match="empty"):
        run_pipeline(tiny_plan(tmp_path, tokenizer_file, corpus=str(empty), run_dir=str(tmp_path / "r1")), progress=False)
    short = tmp_path / "short"
    short.mkdir()
    (short / "train.txt").write_text("Hi there.\n")
    with pytest.raises(TrainError, match="fewer than one training window"):
        run_pipeline(tiny_plan(tmp_path, tokenizer_file, corpus=str(short), run_dir=str(tmp_path / "r2")), progress=False)
    with pytest.raises(TrainError, match="no train.txt"):
        run_pipeline(tiny_plan(tmp_path, tokenizer_file, corpus=str(tmp_path), run_dir=str(tmp_path / "r3")), progress=False)
    with pytest.raises(TrainError, match=r"feature_layer 2 must be one of layer_map \[4\]"):
        run_pipeline(tiny_plan(tmp_path, tokenizer_file, feature_layer=2, run_dir=str(tmp_path / "r4")), progress=False)
    run_pipeline(plan, progress=False, stop_after="tokenize")
    with pytest.raises(TrainError, match="top_k was 4, now 8"):
        run_pipeline(tiny_plan(tmp_path, tokenizer_file, top_k=8), progress=False, stop_after="tokenize")
    from tandem_rt.train.pipeline import TrainPlan

    for bad, match in [(dict(seq_len=4), "seq_len"), (dict(epochs=0), "epochs"), (dict(init="x"), "init"),
                       (dict(draft_vocab=1), "draft_vocab"), (dict(lr=5.0), "lr"),
                       (dict(feature_layer=-1), "feature_layer"), (dict(train_dtype="float16"), "train_dtype"),
                       (dict(proj_init="x"), "proj_init"), (dict(init_layers=[0, 1]), "init_layers"),
                       (dict(init_layers=[0], init="scratch"), "init_layers needs init='primary'"),
                       (dict(proj_lr_scale=0.0), "proj_lr_scale"), (dict(feature_lr_scale=-1.0), "feature_lr_scale"),
                       (dict(proj_lr_scale=float("nan")), "proj_lr_scale")]:
        with pytest.raises(TrainError, match=match):
            tiny_plan(tmp_path, tokenizer_file, **bad)


def test_cli_train_runs_and_reports(tmp_path, tokenizer_file):
    import subprocess
    import sys

    save_primary_checkpoint(tiny_primary(), tmp_path / "primary", tokenizer_file)
    write_corpus(tmp_path / "corpus")
    cmd = [sys.executable, "-m", "tandem_rt.cli", "train", "--primary", str(tmp_path / "primary"),
           "--corpus", str(tmp_path / "corpus"), "--out", str(tmp_path / "out"), "--run-dir", str(tmp_path / "run"),
           "--train-tokens", "1024", "--heldout-tokens", "256", "--seq-len", "32", "--layers", "1", "--top-k", "4",
           "--gamma-max", "3", "--epochs", "1", "--batch-size", "4", "--draft-vocab", "0", "--quiet", "--threads", "1",
           "--feature-layer", "4"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "| Tandem-Distil |" in res.stdout and "wrote" in res.stdout
    ckpt = load_checkpoint(tmp_path / "out")
    assert ckpt.config.secondary.output_vocab_size is None
    # the feature input was trained (W_f starts at zero) and exported
    assert ckpt.config.feature_layer == 4 and ckpt.tandem.feature.proj.weight.abs().sum() > 0
    for i, what in ((5, "primary source"), (7, "corpus")):
        bad = subprocess.run(cmd[:i] + [str(tmp_path / "missing")] + cmd[i + 1:], capture_output=True, text=True)
        assert bad.returncode == 2 and what in bad.stderr and "does not exist" in bad.stderr, bad.stderr


def test_cache_stores_each_layer_once_and_reads_repeats(tmp_path):
    prim = tiny_primary()
    w = windows(n=3)
    cache = build_primary_cache(prim, w, tmp_path / "c", [4, 2, 2], 3, "a" * 64, "b" * 64, progress=False)
    assert cache.layers == [2, 4] and cache.shape[1] == 2
    with torch.no_grad():
        _, hidden = prim(torch.from_numpy(w.astype(np.int64)), hidden_layers=[4, 2, 2])
    b = cache.batch([0, 1, 2])
    assert len(b.hidden) == 3
    for m in range(3):
        assert torch.equal(b.hidden[m], hidden[m].to(torch.bfloat16))
    with pytest.raises(CacheError, match="holds layers"):
        PrimaryCache(tmp_path / "c", layer_map=[3])


def test_cache_with_more_layers_serves_a_subset(tmp_path):
    prim = tiny_primary()
    w = windows(n=3)
    kw = dict(top_k=3, primary_sha256="a" * 64, tokenizer_sha256="b" * 64, progress=False)
    build_primary_cache(prim, w, tmp_path / "c", [2, 4], **kw)
    cache = build_primary_cache(prim, w, tmp_path / "c", [4, 4], **kw)
    assert cache.layers == [2, 4] and len(cache.batch([0]).hidden) == 2
    with torch.no_grad():
        _, hidden = prim(torch.from_numpy(w[:1].astype(np.int64)), hidden_layers=[4])
    assert torch.equal(cache.batch([0]).hidden[1], hidden[0].to(torch.bfloat16))
    with pytest.raises(CacheError, match="layer_map"):
        build_primary_cache(prim, w, tmp_path / "c", [3], **kw)


def test_train_dtype_resolution(tmp_path, tokenizer_file, monkeypatch):
    """``train_dtype=None`` autocasts to bf16 only where the CPU multiplies bf16 natively."""
    from tandem_rt.train import pipeline

    for native in (True, False):
        monkeypatch.setattr(pipeline, "cpu_has_native_bf16", lambda: native)
        assert pipeline.train_autocast(tiny_plan(tmp_path, tokenizer_file)) is native
        assert pipeline.train_autocast(tiny_plan(tmp_path, tokenizer_file, train_dtype="bfloat16")) is True
        assert pipeline.train_autocast(tiny_plan(tmp_path, tokenizer_file, train_dtype="float32")) is False


def test_lr_scale_attribute_scales_the_adamw_step():
    """A parameter with ``lr_scale`` moves ``lr_scale`` times as far as its twin with the same
    gradient (first AdamW step, no weight decay on vectors: the step is ``lr`` per entry)."""
    from tandem_rt.train.loop import TrainConfig, make_optimizer

    m = torch.nn.Module()
    m.a = torch.nn.Parameter(torch.zeros(5))
    m.b = torch.nn.Parameter(torch.zeros(5))
    m.w = torch.nn.Parameter(torch.zeros(3, 5))
    m.b.lr_scale = 0.1
    m.w.lr_scale = 0.1
    cfg = TrainConfig(total_tokens=1, lr=1e-2)
    opt = make_optimizer(m, cfg)
    assert sorted((g["weight_decay"], g["lr_scale"]) for g in opt.param_groups) == [(0.0, 0.1), (0.0, 1.0), (0.1, 0.1)]
    for g in opt.param_groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    grad = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.5])
    m.a.grad, m.b.grad, m.w.grad = grad.clone(), grad.clone(), grad.expand(3, 5).clone()
    opt.step()
    torch.testing.assert_close(m.a.detach(), -1e-2 * grad.sign(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(m.b.detach(), -1e-3 * grad.sign(), rtol=1e-4, atol=1e-7)


def test_pipeline_applies_projection_and_feature_lr_scales(tmp_path, tokenizer_file):
    from tandem_rt.primary_source import load_primary
    from tandem_rt.train.pipeline import build_small_models, run_pipeline

    plan = tiny_plan(tmp_path, tokenizer_file, feature_layer=4, proj_lr_scale=0.25, feature_lr_scale=0.05,
                     tandem_init="init")
    run_pipeline(plan, progress=False, stop_after="cache")
    source = load_primary(plan.primary, dtype=torch.float32, progress=False)
    cache = PrimaryCache(tmp_path / "run" / "cache")
    draft = build_small_models(plan, source, [4], cache, "tandem")
    assert {p.lr_scale for p in draft.proj.parameters()} == {0.25}
    assert {p.lr_scale for p in draft.feature.parameters()} == {0.05}
    assert all(getattr(p, "lr_scale", 1.0) == 1.0 for p in draft.secondary.parameters())


def test_offset_agreement_matches_a_loop():
    from tandem_rt.train.draft_eval import offset_agreement

    g = torch.Generator().manual_seed(0)
    agree = torch.rand(3, 23, generator=g) < 0.4
    for gamma in (1, 3, 5):
        got = offset_agreement(agree, gamma)
        hit, n = [0.0] * gamma, [0.0] * gamma
        for b in range(3):
            for i in range(gamma, 23):
                k = (i - gamma) % gamma
                hit[k] += float(agree[b, i])
                n[k] += 1
        assert got.tolist() == [hit, n]


def test_probe_primary_features_tool_runs_on_a_run(tmp_path, tokenizer_file, one_torch_thread):
    """tools/probe_primary_features.py on a tiny run: its inputs pair the token at i and the primary's
    layer output at i - 1 with the primary's argmax at i (checked against the cache entry by entry),
    and every default probe reports a held-out relative accuracy."""
    import importlib.util
    from pathlib import Path

    from tandem_rt.train.pipeline import run_pipeline

    plan = tiny_plan(tmp_path, tokenizer_file, num_layers=1)
    run_pipeline(plan, progress=False, stop_after="drafter")
    spec = importlib.util.spec_from_file_location(
        "probe_primary_features", Path(__file__).resolve().parents[1] / "tools" / "probe_primary_features.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cache = PrimaryCache(tmp_path / "run" / "cache")
    batch = cache.batch([0, 1])
    embed = torch.randn(V, 32, generator=torch.Generator().manual_seed(0))
    x, y = tool.probe_inputs(batch, ["token", "h4"], [4], embed)
    T = batch.tokens.shape[1]
    for b in range(2):
        for i in range(1, T):
            row = x[b * (T - 1) + i - 1]
            e, h = embed[batch.tokens[b, i]], batch.hidden[0][b, i - 1].float()
            torch.testing.assert_close(row[:32], e / e.pow(2).mean().add(1e-5).sqrt())
            torch.testing.assert_close(row[32:], h / h.pow(2).mean().add(1e-5).sqrt())
            assert y[b * (T - 1) + i - 1] == batch.topk_ids[b, i, 0]
    out = tmp_path / "probe.json"
    assert tool.main(["--run", str(tmp_path / "run"), "--steps", "3", "--batch-windows", "4", "--heldout-windows", "8",
                      "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["inputs"] for r in res["probes"]] == ["token", "token+h4", "drafter", "drafter+h4"]
    n_pos = 8 * (cache.batch([0]).tokens.shape[1] - 1)
    for r in res["probes"]:
        assert 0.0 <= r["relative_accuracy"] <= 1.0 and r["positions"] == n_pos
    with pytest.raises(SystemExit, match="unknown probe input"):
        tool.main(["--run", str(tmp_path / "run"), "--steps", "1", "--heldout-windows", "8", "--probes", "token+h9"])


def test_token_anchored_projections_fit_the_residual_beyond_the_embedding(tmp_path, tokenizer_file):
    """``projection_embed``: the ridge fit targets ``y^(j) - embed(x)`` (so layer 0's projection
    fits zero: its primary-derived residual is the secondary's own input), and the exported
    checkpoint carries the option; the plain fit targets ``y^(j)``."""
    from tandem_rt.primary_source import load_primary
    from tandem_rt.train.draft_training import own_residuals
    from tandem_rt.train.pipeline import build_small_models, run_pipeline

    plan = tiny_plan(tmp_path, tokenizer_file, projection_embed=True, tandem_init="init", num_layers=2,
                     layer_map=[2, 4])
    run_pipeline(plan, progress=False, stop_after="cache")
    source = load_primary(plan.primary, dtype=torch.float32, progress=False)
    cache = PrimaryCache(tmp_path / "run" / "cache")
    draft = build_small_models(plan, source, [2, 4], cache, "tandem")
    assert draft.projection_embed
    assert draft.proj[0].weight.abs().max() < 1e-5 and draft.proj[0].bias.abs().max() < 1e-5
    batch = cache.batch(np.arange(min(32, len(cache))))
    with torch.no_grad():
        ys = own_residuals(draft.secondary, batch.tokens)
        target = (ys[1] - draft.secondary.model.embed_tokens(batch.tokens)).flatten(0, 1).double().numpy()
        pred = draft.proj[1](batch.hidden[1].float()).flatten(0, 1).double().numpy()
    x = batch.hidden[1].flatten(0, 1).double().numpy()
    xa = np.concatenate([x, np.ones((len(x), 1))], 1)               # least squares with a bias column
    best = xa @ np.linalg.lstsq(xa, target, rcond=None)[0]
    err = lambda p: float(((p - target) ** 2).mean())   # noqa: E731
    assert err(pred) <= err(best) * 1.02 + 1e-9      # the fit's target is y^(1) - embed(x) (a small ridge)
    assert err(pred) < 0.5 * float(((target - target.mean(0)) ** 2).mean())


def test_pilot_own_context_tool_trains_and_evaluates_on_a_run(tmp_path, tokenizer_file, one_torch_thread):
    """tools/pilot_own_context.py on a finished tiny run: trains the own-context secondary (its own
    state directory, resumed when done), evaluates it beside the run's drafter and Tandem secondary
    (their figures equal the run's eval.json), and on the primary's greedy continuations."""
    import importlib.util
    from pathlib import Path

    from tandem_rt.train.pipeline import run_pipeline

    plan = tiny_plan(tmp_path, tokenizer_file, num_layers=1)
    run_pipeline(plan, progress=False)
    spec = importlib.util.spec_from_file_location(
        "pilot_own_context", Path(__file__).resolve().parents[1] / "tools" / "pilot_own_context.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "pilot.json"
    argv = ["--run", str(tmp_path / "run"), "--json", str(out), "--quiet", "--greedy-prompts", "2",
            "--prompt-tokens", "8", "--max-new-tokens", "8"]
    assert tool.main(argv) == 0
    res = json.loads(out.read_text())
    run_eval = json.loads((tmp_path / "run" / "eval.json").read_text())
    for name in ("drafter-Distil", "Tandem-Distil"):
        assert res[name]["relative_accuracy"] == pytest.approx(run_eval[name]["relative_accuracy"])
    own = res["Tandem-Distil, own context"]
    assert 0.0 <= own["relative_accuracy"] <= 1.0 and own["positions"] == run_eval["Tandem-Distil"]["positions"]
    assert (tmp_path / "run" / "own_context" / "done.json").is_file()
    greedy = res["_greedy"]
    assert greedy["_meta"]["prompts"] == 2 and greedy["primary"]["positions"] == 2 * 15
    assert greedy["primary"]["relative_accuracy"] == 1.0
    assert tool.main(argv) == 0    # resumes: the finished state is reloaded, same figures
    assert json.loads(out.read_text())["Tandem-Distil, own context"] == own
    with pytest.raises(SystemExit, match="not a finished"):
        tool.main(["--run", str(tmp_path / "nothing")])
