"""Bad numbers never turn into silent wrong output: tiny / huge temperatures and top_k overflow are
refused at construction, malformed prompts and engine dtypes/devices are refused by name, and a
checkpoint with NaN or infinite weights is refused at load."""
from __future__ import annotations

import pytest
import torch

from conftest import random_tandem_model
from tandem_rt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tandem_rt.engine import Engine, SamplingParams


@pytest.mark.parametrize("kw,match", [(dict(temperature=1e-45), "temperature"), (dict(temperature=1e300), "temperature"),
                                      (dict(temperature=float("nan")), "temperature"), (dict(top_k=2 ** 31), "top_k")])
def test_sampling_params_refuse_overflowing_values(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)
    SamplingParams(temperature=1e-3, top_k=2 ** 31 - 1)  # the bounds themselves are accepted


@pytest.mark.parametrize("prompt", [[1.0, 2.0], [b"Once"], [object()]])
def test_malformed_prompts_are_refused(prompt):
    engine = Engine(random_tandem_model(), num_pages=32)
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        engine.generate(prompt, SamplingParams(max_new_tokens=2))


@pytest.mark.parametrize("kw,match", [(dict(dtype=torch.float64), "dtype"), (dict(device="meta"), "device")])
def test_engine_refuses_unsupported_dtype_and_device(kw, match):
    with pytest.raises(ValueError, match=match):
        Engine(random_tandem_model(), num_pages=32, **kw)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load(tmp_path, value):
    model = random_tandem_model()
    with torch.no_grad():
        model.secondary.model.layers[1].mlp.up_proj.weight[3, 4] = value
    save_checkpoint(model, tmp_path / "c")
    with pytest.raises(CheckpointError, match="secondary.model.layers.1.mlp.up_proj.weight.*NaN or infinite"):
        load_checkpoint(tmp_path / "c")


def _mutated_config(tmp_path, edit):
    import json

    model = random_tandem_model()
    save_checkpoint(model, tmp_path / "c")
    file = tmp_path / "c" / "tandem_config.json"
    cfg = json.loads(file.read_text())
    edit(cfg)
    file.write_text(json.dumps(cfg))
    return tmp_path / "c"


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["primary"].update(rope_theta="abc"), "rope_theta"),
    (lambda c: c["secondary"].update(rms_norm_eps=True), "rms_norm_eps"),
    (lambda c: c.update(layer_map=[True, 4]), r"layer_map\[0\]"),
    (lambda c: c["primary"].update(tie_word_embeddings="false"), "tie_word_embeddings"),
    (lambda c: c.update(projection_bias="no"), "projection_bias"),
    (lambda c: c["router"].update(threshold="abc"), "threshold"),
])
def test_malformed_config_values_are_named_with_the_file(tmp_path, edit, match):
    path = _mutated_config(tmp_path, edit)
    with pytest.raises(CheckpointError, match=match) as exc:
        load_checkpoint(path)
    assert "tandem_config.json" in str(exc.value)


def test_corrupt_header_shape_and_tokenizer_are_named(tmp_path):
    import json

    model = random_tandem_model()
    save_checkpoint(model, tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = "abc"
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    assert len(new) == n  # "abc" is shorter than any real shape: padded to the same header size
    f.write_bytes(raw[:8] + new + raw[8 + n:])
    with pytest.raises(CheckpointError, match="corrupt header entry"):
        load_checkpoint(tmp_path / "c")
    save_checkpoint(model, tmp_path / "d", tokenizer=None)
    (tmp_path / "d" / "tokenizer.json").write_text("{1: 2}")
    with pytest.raises(CheckpointError, match="malformed tokenizer file"):
        Engine.from_pretrained(str(tmp_path / "d"))


def test_second_engine_in_another_dtype_is_refused_and_the_first_keeps_working():
    import copy

    model = random_tandem_model()
    e1 = Engine(model, num_pages=32)
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    before = e1.generate([[1, 2, 3]], sp, mode="primary")[0].token_ids
    with pytest.raises(ValueError, match="already served by another Engine"):
        Engine(model, num_pages=32, dtype=torch.bfloat16)
    assert e1.generate([[1, 2, 3]], sp, mode="primary")[0].token_ids == before
    e2 = Engine(copy.deepcopy(model), num_pages=32, dtype=torch.bfloat16)
    assert len(e2.generate([[1, 2, 3]], sp, mode="primary")[0].token_ids) == 4
    Engine(model, num_pages=16)  # same dtype and device: allowed


def test_impossible_pool_is_refused_before_allocating():
    import dataclasses

    model = random_tandem_model()
    cfg = model.config
    big = dataclasses.replace(cfg.primary, max_position_embeddings=10_000_000)
    model.config = dataclasses.replace(cfg, primary=big)
    # the default pool is capped by a memory budget instead of growing with the context
    e = Engine(model, max_batch_size=2)
    assert e.page_manager.num_pages < 10_000
    with pytest.raises(ValueError, match="GiB available"):
        Engine(random_tandem_model(), num_pages=10 ** 9)


def _sample(logits, temperature, seed=0, top_k=0, top_p=1.0):
    from tandem_rt import ops

    B = logits.shape[0]
    probs = torch.empty(B, logits.shape[1])
    tok = ops.sample(logits, torch.full((B,), float(temperature)), torch.full((B,), top_k, dtype=torch.int32),
                     torch.full((B,), float(top_p)), torch.tensor([seed, 0]), probs_out=probs)
    return tok, probs


@pytest.mark.parametrize("temperature", [0.0, 1.0, 1e-30])
def test_non_finite_logits_follow_the_clamping_rule(temperature):
    inf, nan = float("inf"), float("nan")
    # +inf wins (greedy and sampled); NaN is never chosen over a finite logit
    tok, probs = _sample(torch.tensor([[0.0, inf, 1.0], [nan, 0.0, 1.0], [nan, 5.0, nan]]), temperature)
    assert tok.tolist() == [1, 2 if temperature < 1e-3 or temperature == 0 else tok[1].item(), 1]
    assert torch.isfinite(probs).all()
    assert probs[0].tolist() == [0.0, 1.0, 0.0] and probs[1, 0] == 0.0 and probs[2].tolist() == [0.0, 1.0, 0.0]
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_tied_infinite_logits_share_the_mass():
    inf = float("inf")
    logits = torch.tensor([[inf, 0.0, inf, -inf]]).repeat(4000, 1)
    tok, probs = _sample(logits, 1.0, seed=3)
    torch.testing.assert_close(probs[0], torch.tensor([0.5, 0.0, 0.5, 0.0]))
    frac = (tok == 0).float().mean().item()
    assert set(tok.tolist()) == {0, 2} and 0.45 < frac < 0.55


def _greedy_ref(row: list) -> int:
    """Lowest index of the largest logit after the clamping rule (NaN / -inf lowest, +inf largest),
    -0.0 below +0.0: a plain-Python scan."""
    def key(x):
        if x != x or x == float("-inf"):
            return (-1, 0.0, 0)
        if x == float("inf"):
            return (1, 0.0, 0)
        return (0, x, 0 if (x == 0.0 and str(x).startswith("-")) else 1)
    best = 0
    for j in range(1, len(row)):
        if key(row[j]) > key(row[best]):
            best = j
    return best


def _adversarial_rows(gen, V: int, n: int) -> torch.Tensor:
    """fp32 ``[n, V]`` rows of few distinct values (ties) mixed with NaN, +-inf and +-0.0; some
    rows entirely non-positive (the maximum is a zero of either sign) or non-finite."""
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0])
    rows = []
    for i in range(n):
        vals = torch.randint(-3, 3, (V,), generator=gen).float()
        if i % 4 == 1:
            vals = -vals.abs()
        pick = torch.rand(V, generator=gen) < 0.15
        vals[pick] = special[torch.randint(0, 5, (int(pick.sum()),), generator=gen)]
        if i % 4 == 2:
            vals = special[torch.randint(0, 5, (V,), generator=gen)]
            vals[vals > 0] = 0.0
        if i % 4 == 3:
            vals[vals > 0] = -0.0
        rows.append(vals)
    return torch.stack(rows)


@pytest.mark.parametrize("V", [1, 15, 16, 17, 100, 8192 + 5])
def test_greedy_argmax_on_adversarial_rows(V):
    # the ops' greedy choice (sample at temperature 0 and every row of a greedy verify) against a
    # plain-Python scan, on ties, non-finite logits and signed zeros at every position modulo 16
    from tandem_rt import ops

    gen = torch.Generator().manual_seed(V)
    logits = _adversarial_rows(gen, V, 64)
    want = [_greedy_ref(r) for r in logits.tolist()]
    tok, _ = _sample(logits, 0.0)
    assert tok.tolist() == want
    B, G = 16, 3   # verify: 16 sequences x 4 rows, every draft equal to the reference's choice
    draft = torch.tensor(want, dtype=torch.int64).view(B, G + 1)[:, :G].contiguous()
    accepted, emitted = ops.verify(draft, torch.full((B,), G, dtype=torch.int32), None, logits.view(B, G + 1, V),
                                   torch.zeros(B), torch.zeros(B, dtype=torch.int32), torch.ones(B),
                                   torch.tensor([0, 0]))
    assert accepted.tolist() == [G] * B
    assert emitted.flatten().tolist() == want
