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
