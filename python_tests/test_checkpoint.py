"""Checkpoint save/load round trip and every refusal the loader promises."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import tandem_rt
from tandem_rt.checkpoint import CheckpointError, load_checkpoint, read_safetensors_header, save_checkpoint
from conftest import random_tandem_model


@pytest.fixture
def saved(tmp_path):
    model = random_tandem_model(seed=1)
    save_checkpoint(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def _logits(model, ids):
    out = model(ids, block_length=2)
    return out.primary_logits, out.secondary_logits


def test_roundtrip_same_logits_and_names(saved):
    model, path = saved
    loaded = tandem_rt.load_checkpoint(path)
    ids = torch.randint(0, 97, (2, 9))
    for a, b in zip(_logits(model, ids), _logits(loaded, ids)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    names = set(load_file(path / "model.safetensors"))
    assert "primary.model.layers.0.self_attn.q_proj.bias" in names
    assert "primary.lm_head.weight" in names          # primary untied in the tiny config
    assert "secondary.lm_head.weight" not in names    # secondary tied
    assert "tandem.proj.1.weight" in names and "tandem.proj.1.bias" in names
    assert "drafter.model.norm.weight" in names and "router.fc1.weight" in names
    cfg = json.loads((path / "tandem_config.json").read_text())
    assert set(cfg) == {"format", "format_version", "primary", "secondary", "layer_map", "train_block_length",
                        "projection_bias", "drafter", "router", "torch_dtype"}
    assert cfg["torch_dtype"] == "float32"
    assert (path / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by others, like any file


@pytest.mark.parametrize("extra", [{}, {"feature_at": "output", "feature_hidden": 16}, {"projection_embed": True}])
def test_feature_input_roundtrip(tmp_path, extra):
    """A checkpoint with the feature input stores ``tandem.feature.*`` and ``feature_layer`` (and the
    MLP's ``up`` matrix, ``feature_at`` / ``feature_hidden``); the loaded secondary reads it (same
    logits; different from the secondary without it)."""
    import dataclasses

    from tandem_rt.models.tandem import TandemModel

    base = random_tandem_model(seed=2)
    cfg = dataclasses.replace(base.config, feature_layer=base.config.layer_map[-1], **extra)
    torch.manual_seed(3)
    model = TandemModel(cfg)
    model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        model.tandem.feature.proj.weight.normal_(0, 0.5)
    model.eval()
    save_checkpoint(model, tmp_path / "ckpt")
    names = set(load_file(tmp_path / "ckpt" / "model.safetensors"))
    assert {"tandem.feature.norm.weight", "tandem.feature.proj.weight"} <= names
    assert ("tandem.feature.up.weight" in names) == ("feature_hidden" in extra)
    written = json.loads((tmp_path / "ckpt" / "tandem_config.json").read_text())
    assert written["feature_layer"] == cfg.feature_layer and all(written[k] == v for k, v in extra.items())
    loaded = load_checkpoint(tmp_path / "ckpt")
    ids = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(_logits(model, ids)[1], _logits(loaded, ids)[1], rtol=0, atol=0)
    assert not torch.equal(_logits(base.eval(), ids)[1], _logits(loaded, ids)[1])


def test_dtype_conversion_and_device(saved):
    model, path = saved
    loaded = load_checkpoint(path, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    ref = model.primary.model.embed_tokens.weight.to(torch.bfloat16)
    assert torch.equal(loaded.primary.model.embed_tokens.weight, ref)
    with pytest.raises(ValueError, match="dtype"):
        load_checkpoint(path, dtype="int8")


def test_sharded_roundtrip(tmp_path):
    model = random_tandem_model(seed=2)
    save_checkpoint(model, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "model.safetensors").exists()
    loaded = load_checkpoint(tmp_path)
    ids = torch.randint(0, 97, (1, 5))
    torch.testing.assert_close(_logits(model, ids)[1], _logits(loaded, ids)[1], rtol=0, atol=0)


def test_tokenizer_is_copied(tmp_path, saved):
    model, _ = saved
    tok = tmp_path / "tok.json"
    tok.write_text('{"version": "1.0"}')
    save_checkpoint(model, tmp_path / "c2", tokenizer=tok)
    assert (tmp_path / "c2" / "tokenizer.json").read_text() == tok.read_text()


def _rewrite(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor(saved):
    _, path = saved
    _rewrite(path, lambda t: t.pop("secondary.model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*secondary\.model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(path)


def test_unexpected_tensor(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"primary.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*primary\.extra\.weight"):
        load_checkpoint(path)


def test_wrong_shape(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"tandem.proj.0.weight": torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=r"tandem\.proj\.0\.weight.*shape \[3, 3\]"):
        load_checkpoint(path)


def test_wrong_dtype(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"router.fc2.bias": torch.zeros(1, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=r"router\.fc2\.bias.*dtype I32"):
        load_checkpoint(path)


def test_unknown_format_version(saved):
    _, path = saved
    cfg = json.loads((path / "tandem_config.json").read_text())
    cfg["format_version"] = 99
    (path / "tandem_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(path)


def test_malformed_json(saved):
    _, path = saved
    (path / "tandem_config.json").write_text('{"format": "tandem_rt", ')
    with pytest.raises(CheckpointError, match="malformed JSON"):
        load_checkpoint(path)


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="tandem_config.json does not exist"):
        load_checkpoint(tmp_path)


def test_truncated_file(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_header_larger_than_file(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    with pytest.raises(CheckpointError, match="header size .* larger than the file"):
        load_checkpoint(path)


def test_corrupt_header(saved):
    _, path = saved
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:12] = b"\xff\xfe{["
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        read_safetensors_header(path / "model.safetensors")


def test_index_names_missing_shard(tmp_path):
    model = random_tandem_model(seed=2)
    save_checkpoint(model, tmp_path, max_shard_bytes=20_000)
    next(tmp_path.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-.* which does not exist"):
        load_checkpoint(tmp_path)


def test_save_replaces_stale_shards(tmp_path):
    model = random_tandem_model(seed=2)
    save_checkpoint(model, tmp_path, max_shard_bytes=20_000)
    save_checkpoint(model, tmp_path)
    assert not list(tmp_path.glob("model-*-of-*.safetensors"))
    assert not (tmp_path / "model.safetensors.index.json").exists()
    load_checkpoint(tmp_path)


def test_skip_param_init_restores_the_initialisers():
    from tandem_rt.checkpoint import skip_param_init

    original = torch.nn.init.normal_
    with pytest.raises(RuntimeError, match="inside"):
        with skip_param_init():
            t = torch.zeros(3)
            assert torch.nn.init.normal_(t) is t and torch.equal(t, torch.zeros(3))   # a no-op inside
            raise RuntimeError("inside")
    assert torch.nn.init.normal_ is original
    t = torch.zeros(1000)
    torch.nn.init.normal_(t)
    assert t.std() > 0.5                                                                 # a real one after


def test_loading_does_not_import_dynamo(saved):
    """Building the model on the meta device skips parameter initialisation: ``normal_`` on a meta
    tensor would import torch._dynamo (seconds of a cold start)."""
    import subprocess
    import sys

    code = (f"import sys; import tandem_rt; tandem_rt.load_checkpoint({str(saved[1])!r}); "
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
