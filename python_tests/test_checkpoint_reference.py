"""Checkpoints that name their primary by source + sha256 instead of holding a copy, and that
store token embeddings shared with the primary once: round trip, derived-weight cache, and every
refusal (hash mismatch, missing source, paths leaving the checkpoint or the package)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import random_tandem_model
from tandem_rt import primary_source as ps
from tandem_rt.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from tandem_rt.config import ConfigError, TandemConfig


def _source(tmp_path, seed=0):
    model = random_tandem_model(seed=seed)
    save_checkpoint(model, tmp_path / "src")
    return model, tmp_path / "src"


def _ref(src, **kw):
    return {"kind": "tandem", "path": str(src), "sha256": ps.source_sha256(src), **kw}


def test_referenced_primary_round_trip_uses_the_derived_cache(tmp_path, monkeypatch):
    model, src = _source(tmp_path)
    save_checkpoint(model, tmp_path / "ref", primary_source=_ref(src))
    names = json.loads((tmp_path / "ref" / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (tmp_path / "ref" / "model.safetensors").read_bytes()[:8], "little")])
    assert not any(n.startswith("primary.") for n in names)
    derived = tmp_path / "derived"
    loaded = load_checkpoint(tmp_path / "ref", derived_cache=derived)
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    assert len(list(derived.glob("primary-*.safetensors"))) == 1
    # the second load reads the derived weights, not the source's
    monkeypatch.setattr(ps, "load_primary_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("reconverted")))
    again = load_checkpoint(tmp_path / "ref", derived_cache=derived)
    assert torch.equal(again.primary.model.embed_tokens.weight, model.primary.model.embed_tokens.weight)


def test_changed_source_is_refused_naming_both(tmp_path):
    model, src = _source(tmp_path)
    save_checkpoint(model, tmp_path / "ref", primary_source=_ref(src))
    other = random_tandem_model(seed=5)
    save_checkpoint(other, src)  # same path, other weights
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "ref", derived_cache=tmp_path / "d")
    assert str(src) in str(exc.value) and str(tmp_path / "ref") in str(exc.value) and "sha256" in str(exc.value)


def test_missing_or_escaping_sources_are_refused(tmp_path):
    model, src = _source(tmp_path)
    sha = ps.source_sha256(src)
    cases = [({"kind": "tandem", "path": str(tmp_path / "nowhere"), "sha256": sha}, "does not exist"),
             ({"kind": "tandem", "path": "../src", "sha256": sha}, "leaves the checkpoint"),
             ({"kind": "gguf", "path": str(src), "sha256": sha}, "is a tandem source"),
             ({"kind": "tandem", "package": "no_such_package_xyz", "file": "m.gguf", "sha256": sha}, "not installed"),
             ({"kind": "tandem", "package": "tandem_rt", "file": "bundled/../../x", "sha256": sha}, None)]
    for i, (ref, match) in enumerate(cases):
        out = tmp_path / f"ref{i}"
        if match is None:
            with pytest.raises(ValueError, match="inside the package"):
                save_checkpoint(model, out, primary_source=ref)
            continue
        save_checkpoint(model, out, primary_source=ref)
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(out, derived_cache=tmp_path / "d")


@pytest.mark.parametrize("ref,match", [({"kind": "x", "path": "a", "sha256": "0" * 64}, "kind"),
                                       ({"kind": "gguf", "path": "a", "sha256": "xyz"}, "sha256"),
                                       ({"kind": "gguf", "sha256": "0" * 64}, "path or a package"),
                                       ({"kind": "gguf", "path": "a", "package": "p", "file": "f", "sha256": "0" * 64},
                                        "not both"),
                                       ({"kind": "gguf", "package": "p", "file": "/abs", "sha256": "0" * 64}, "relative"),
                                       ({"kind": "gguf", "path": "a", "sha256": "0" * 64, "extra": 1}, "unknown")])
def test_malformed_references_are_config_errors(ref, match):
    cfg = random_tandem_model().config.to_dict()
    cfg["primary_source"] = ref
    with pytest.raises(ConfigError, match=match):
        TandemConfig.from_dict(cfg)


def test_package_file_source_and_inspect(tmp_path, monkeypatch):
    """A source that is a file of an installed package is found through the package, not a path."""
    pkg = tmp_path / "site" / "fake_model_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the package is never imported')\n")
    model = random_tandem_model(seed=4)
    save_checkpoint(model, pkg / "weights")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    ref = {"kind": "tandem", "package": "fake_model_pkg", "file": "weights", "sha256": ps.source_sha256(pkg / "weights")}
    save_checkpoint(model, tmp_path / "ref", primary_source=ref)
    loaded = load_checkpoint(tmp_path / "ref", derived_cache=tmp_path / "d")
    assert torch.equal(loaded.primary.output_weight, model.primary.output_weight)
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-m", "tandem_rt.cli", "inspect", str(tmp_path / "ref")],
                         capture_output=True, text=True, check=True, env=env).stdout
    assert "primary weights not stored: tandem source package fake_model_pkg: weights" in out
    assert ref["sha256"] in out


def test_shared_embeddings_are_stored_once(tmp_path):
    model = random_tandem_model(seed=3, primary_tie=True)
    cfg = model.config
    # widths differ in the tiny config: sharing must be refused at save time
    with pytest.raises(ValueError, match="hidden_size"):
        save_checkpoint(model, tmp_path / "x", shared_embeddings=["drafter"])
    from tandem_rt.train.draft_training import init_small_model, small_model_config
    import dataclasses
    from tandem_rt.models import TandemModel

    small = small_model_config(cfg.primary, 1, "primary")
    new = TandemModel(dataclasses.replace(cfg, secondary=small, drafter=small, router=None,
                                                         layer_map=[4])).eval()
    new.primary.load_state_dict(model.primary.state_dict())
    for part in (new.secondary, new.drafter):
        part.load_state_dict(init_small_model(new.primary, small, "primary").state_dict())
    save_checkpoint(new, tmp_path / "s", shared_embeddings=["secondary", "drafter"])
    header_len = int.from_bytes((tmp_path / "s" / "model.safetensors").read_bytes()[:8], "little")
    names = json.loads((tmp_path / "s" / "model.safetensors").read_bytes()[8:8 + header_len])
    assert "secondary.model.embed_tokens.weight" not in names and "drafter.model.embed_tokens.weight" not in names
    loaded = load_checkpoint(tmp_path / "s")
    assert torch.equal(loaded.drafter.model.embed_tokens.weight, new.primary.model.embed_tokens.weight)
    assert read_config(tmp_path / "s").shared_embeddings == ["secondary", "drafter"]
    with torch.no_grad():
        new.drafter.model.embed_tokens.weight.add_(1.0)
    with pytest.raises(ValueError, match="differ"):
        save_checkpoint(new, tmp_path / "t", shared_embeddings=["drafter"])


def test_index_shard_paths_must_stay_inside(tmp_path):
    model = random_tandem_model()
    save_checkpoint(model, tmp_path / "c", max_shard_bytes=20000)
    index = tmp_path / "c" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    for bad, match in [("../x.safetensors", "outside"), ("/abs/x.safetensors", "outside")]:
        d = json.loads(json.dumps(data))
        first = next(iter(d["weight_map"]))
        d["weight_map"][first] = bad
        index.write_text(json.dumps(d))
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(tmp_path / "c")
    index.write_text(json.dumps({"weight_map": list(data["weight_map"])}))
    with pytest.raises(CheckpointError, match="weight_map must be an object"):
        load_checkpoint(tmp_path / "c")
