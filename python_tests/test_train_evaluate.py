"""Table 1 metrics against an independent computation; export round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_tandem_model
from tandem_rt.checkpoint import load_checkpoint, save_checkpoint
from tandem_rt.train.evaluate import evaluate_models, format_table
from tandem_rt.train.export import assemble
from tandem_rt.train.tandem import freeze


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _metrics(logits, primary, targets):
    ls = torch.log_softmax(logits.double(), -1)
    lp = torch.log_softmax(primary.double(), -1)
    return {"accuracy": (logits.argmax(-1) == targets).double().mean().item(),
            "cross_entropy": -ls.gather(-1, targets[..., None]).mean().item(),
            "relative_accuracy": (logits.argmax(-1) == primary.argmax(-1)).double().mean().item(),
            "relative_tv": 0.5 * (ls.exp() - lp.exp()).abs().sum(-1).mean().item()}


def test_evaluate_models_matches_direct_computation():
    tandem = random_tandem_model(seed=5)
    freeze(tandem.primary)
    tokens = np.random.default_rng(0).integers(0, 97, 100).astype(np.uint16)
    res = evaluate_models(tandem.primary, tokens, standalone={"drafter": tandem.drafter},
                          tandems={"tandem": tandem}, seq_len=12, batch_size=3, block_length=2, progress=False)
    ids = torch.from_numpy(tokens[:96].astype(np.int64)).view(8, 12)
    with torch.no_grad():
        out = tandem(ids, block_length=2)
        drafter = tandem.drafter(ids)
    p = out.primary_logits[:, :-1]
    tgt = ids[:, 1:]
    for name, logits in (("primary", p), ("drafter", drafter[:, :-1]), ("tandem", out.secondary_logits[:, :-1])):
        exp = _metrics(logits, p, tgt)
        for k, v in exp.items():
            assert res[name][k] == pytest.approx(v, abs=1e-5), (name, k)
        assert res[name]["positions"] == 8 * 11
    assert res["primary"]["relative_accuracy"] == 1.0
    assert res["_meta"]["tokens"] == 96
    assert "| tandem |" in format_table(res)


def test_evaluate_models_drafting_boundaries_match_the_table1_path():
    """boundary="drafting" (what tandem-rt train trains and the engine drafts with) against the
    Table 1 evaluation of tools/eval_drafts.py (train/draft_eval.py), which builds its own masks;
    and it differs from the training boundaries (the block-end queries differ)."""
    from tandem_rt.train.draft_eval import evaluate_drafts
    from tandem_rt.train.draft_training import TandemDraft

    tandem = random_tandem_model(seed=6)
    freeze(tandem.primary)
    tokens = np.random.default_rng(1).integers(0, 97, 120).astype(np.uint16)
    res = evaluate_models(tandem.primary, tokens, tandems={"tandem": tandem}, seq_len=20, batch_size=4,
                          block_length=3, progress=False, boundary="drafting")
    draft = TandemDraft(tandem.secondary, tandem.config.primary.hidden_size)
    draft.proj = tandem.tandem.proj
    windows = tokens[:120].astype(np.int64).reshape(6, 20)
    ref = evaluate_drafts(tandem.primary, windows, {"tandem": draft}, list(tandem.layer_map), gammas=(3,),
                          table_gamma=3)
    for k in ("accuracy", "relative_accuracy", "relative_tv"):
        assert res["tandem"][k] == pytest.approx(ref["tandem"][k], abs=1e-6), k
    assert res["_meta"]["boundary"] == "drafting"
    other = evaluate_models(tandem.primary, tokens, tandems={"tandem": tandem}, seq_len=20, batch_size=4,
                            block_length=3, progress=False, boundary="training")
    assert other["tandem"]["relative_tv"] != pytest.approx(res["tandem"]["relative_tv"], abs=1e-6)
    with pytest.raises(ValueError, match="boundary"):
        evaluate_models(tandem.primary, tokens, tandems={"tandem": tandem}, seq_len=20, boundary="causal")


def test_evaluate_drafts_per_window_and_paired_comparison():
    """The per-window sums add up to the table's figures, recomputed here from the models' logits
    (argmax agreement and accepted prefixes in plain loops); the paired comparison's estimates are
    the differences of those figures, and a model compared with itself differs by exactly 0."""
    from tandem_rt.train.draft_eval import evaluate_drafts, format_comparison, paired_comparison
    from tandem_rt.train.draft_training import TandemDraft

    tandem = random_tandem_model(seed=6)
    freeze(tandem.primary)
    windows = np.random.default_rng(2).integers(0, 97, (6, 20)).astype(np.int64)
    draft = TandemDraft(tandem.secondary, tandem.config.primary.hidden_size)
    draft.proj = tandem.tandem.proj
    models = {"drafter": tandem.drafter.eval(), "tandem": draft, "oracle": tandem.primary}  # oracle: always accepted
    res = evaluate_drafts(tandem.primary, windows, models, list(tandem.layer_map), gammas=(2, 3), table_gamma=3,
                          batch_size=4)
    with torch.no_grad():
        p_arg = tandem.primary(torch.from_numpy(windows)).argmax(-1)
        d_arg = tandem.drafter(torch.from_numpy(windows)).argmax(-1)
    for w in range(6):
        agree = [bool(d_arg[w, i] == p_arg[w, i]) for i in range(20)]
        assert res["drafter"]["per_window"]["agree"][w] == sum(agree[:19])
        for g in (2, 3):
            total = 0
            for q in range(g, 20 - g, g):
                k = 0
                while k < g and agree[q + k]:
                    k += 1
                total += k
            assert res["drafter"]["per_window"][f"accepted_g{g}"][w] == total
    for name in ("drafter", "tandem"):
        pw = res[name]["per_window"]
        assert sum(pw["agree"]) / sum(pw["positions"]) == pytest.approx(res[name]["relative_accuracy"])
        assert sum(pw["tv"]) / sum(pw["positions"]) == pytest.approx(res[name]["relative_tv"], rel=1e-5)
        assert sum(pw["accepted_g3"]) / sum(pw["blocks_g3"]) == pytest.approx(res[name]["accepted_g3"])
    assert res["oracle"]["accepted_g3"] == 3 and res["oracle"]["relative_accuracy"] == 1
    cmp = paired_comparison(res, "oracle", "tandem", resamples=200)
    o, t = res["oracle"], res["tandem"]
    assert cmp["relative_accuracy_points"]["estimate"] == pytest.approx(100 * (t["relative_accuracy"] - 1))
    assert cmp["accepted_g2_gain"]["estimate"] == pytest.approx(t["accepted_g2"] / 2 - 1)
    assert cmp["relative_accuracy_points"]["low"] <= cmp["relative_accuracy_points"]["estimate"] \
        <= cmp["relative_accuracy_points"]["high"]
    cmp = paired_comparison(res, "drafter", "tandem", resamples=200)
    d = res["drafter"]
    assert cmp["relative_tv_change"]["estimate"] == pytest.approx(t["relative_tv"] / d["relative_tv"] - 1, rel=1e-5)
    if d["accepted_g2"] == 0:
        assert cmp["accepted_g2_gain"] is None and "undefined" in format_comparison(cmp)
    same = paired_comparison(res, "oracle", "oracle", resamples=200)
    assert same["relative_tv_change"] is None                        # the oracle's TV is 0
    assert all(r["low"] == r["high"] == r["estimate"] == 0 for r in same.values() if r is not None)
    assert "relative_accuracy_points" in format_comparison(cmp)


def test_train_boundary_config_field():
    import dataclasses

    from tandem_rt.config import ConfigError, TandemConfig

    cfg = random_tandem_model(seed=1).config
    assert cfg.train_boundary == "training" and "train_boundary" not in cfg.to_dict()
    drafting = dataclasses.replace(cfg, train_boundary="drafting")
    assert TandemConfig.from_dict(drafting.to_dict()).train_boundary == "drafting"
    with pytest.raises(ConfigError, match="train_boundary"):
        dataclasses.replace(cfg, train_boundary="causal")
    with pytest.raises(ConfigError, match="train_boundary"):
        TandemConfig.from_dict({**cfg.to_dict(), "train_boundary": ["drafting"]})


def test_assemble_and_checkpoint_round_trip(tmp_path):
    tandem = random_tandem_model(seed=6, drafter=False, router=False)
    donor = random_tandem_model(seed=7)
    model = assemble(tandem, donor.drafter, donor.router, dtype="bfloat16")
    save_checkpoint(model, tmp_path, dtype=torch.bfloat16)
    back = load_checkpoint(tmp_path, dtype=torch.float32)
    assert back.config.torch_dtype == "bfloat16"
    for src, dst in ((tandem.primary, back.primary), (tandem.secondary, back.secondary), (tandem.tandem, back.tandem),
                     (donor.drafter, back.drafter), (donor.router, back.router)):
        for name, t in src.state_dict().items():
            torch.testing.assert_close(dst.state_dict()[name], t.to(torch.bfloat16).float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="router"):
        bad = random_tandem_model(seed=1)
        bad.router.config.embed_dim = 5
        assemble(tandem, None, bad.router)


@pytest.mark.parametrize("mode", ["drafter", "tandem"])
def test_speculative_greedy_is_lossless(mode):
    from tandem_rt.train.evaluate import greedy_generate, speculative_greedy

    tandem = random_tandem_model(seed=8)
    freeze(tandem.primary)
    prompt = [5, 17, 3, 44, 9]
    kw = {"drafter": tandem.drafter} if mode == "drafter" else {"tandem": tandem}
    r = speculative_greedy(tandem.primary, prompt, 12, gamma=3, **kw)
    assert r["tokens"] == greedy_generate(tandem.primary, prompt, 12)
    assert all(0 <= a <= 3 for a in r["accepted"]) and sum(a + 1 for a in r["accepted"]) >= 12
    # a drafter identical to the primary is always accepted
    perfect = speculative_greedy(tandem.primary, prompt, 8, gamma=3, drafter=tandem.primary)
    assert perfect["accepted"] == [3, 3]


def test_tandem_drafts_use_primary_kv_of_committed_tokens():
    """The first draft of speculative_greedy equals the Eq. (2) block forward at the boundary."""
    from tandem_rt.train.evaluate import speculative_greedy

    tandem = random_tandem_model(seed=9)
    freeze(tandem.primary)
    prompt = [5, 17, 3, 44, 9, 2]
    r = speculative_greedy(tandem.primary, prompt, 1, gamma=1, tandem=tandem)
    with torch.no_grad():
        ids = torch.tensor([prompt])
        _, hidden = tandem.primary(ids, hidden_layers=tandem.layer_map)
        b = torch.tensor([1, 2, 3, 4, 5, 5])  # the last prompt token is not yet processed by the primary
        first = int(tandem.secondary_forward(ids, hidden, b)[0, -1].argmax())
        p = tandem.primary(torch.tensor([prompt + [first]]))[0, -2:].argmax(-1).tolist()
    assert r["accepted"] == [int(first == p[0])]


@pytest.mark.parametrize("feature", [False, True])
def test_eval_drafts_models_keep_the_feature_input(feature):
    """tools/eval_drafts.py evaluates a checkpoint's Tandem secondary as it was trained: projections
    and, where the checkpoint has one, its feature input (reference: TandemModel.secondary_forward)."""
    import importlib.util
    from pathlib import Path

    from tandem_rt.models.tandem import training_boundary

    spec = importlib.util.spec_from_file_location("eval_drafts", Path(__file__).resolve().parents[1] / "tools" / "eval_drafts.py")
    eval_drafts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_drafts)
    model = random_tandem_model(seed=3, layer_map=[2, 4], feature_layer=4 if feature else None)
    if feature:
        torch.nn.init.normal_(model.tandem.feature.proj.weight, std=0.3)  # W_f starts at zero
    ids = torch.randint(0, 97, (2, 15), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, hidden = model.primary_forward(ids)
        b = training_boundary(15, 3)
        ref = model.secondary_forward(ids, hidden, b)
        models = eval_drafts.draft_models(model, "")
        got = models["Tandem-Distil"](ids, hidden, b.expand(2, -1))
    torch.testing.assert_close(got, ref)
    assert set(models) == {"drafter-Distil", "Tandem-Distil"}
    if feature:  # without the feature input the logits differ
        model.tandem.feature.proj.weight.data.zero_()
        with torch.no_grad():
            assert not torch.allclose(models["Tandem-Distil"](ids, hidden, b.expand(2, -1)), got)
