"""Config validation: every bad field is refused with a message naming it."""
import pytest

from tandem_rt.config import ConfigError, ModelConfig, RouterConfig, TandemConfig, default_layer_map
from conftest import tiny_model_config, tiny_tandem_config


def test_default_layer_map_last_secondary_layer_reads_last_primary_layer():
    assert default_layer_map(6, 2) == [3, 6]
    assert default_layer_map(30, 4) == [8, 15, 22, 30]  # round((j+1)*30/4): 7.5->8, 15, 22.5->22, 30
    assert default_layer_map(4, 4) == [1, 2, 3, 4]


@pytest.mark.parametrize("field,value,match", [
    ("num_attention_heads", 5, "num_attention_heads"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("hidden_size", 0, "hidden_size"),
    ("rope_theta", -1.0, "rope_theta"),
    ("eos_token_id", 1000, "eos_token_id"),
    ("head_dim", 7, "head_dim"),
])
def test_model_config_rejects(field, value, match):
    kw = tiny_model_config().to_dict()
    kw[field] = value
    if field == "num_attention_heads":
        kw["head_dim"] = None
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kw)


def test_tandem_config_roundtrip_and_validation():
    cfg = tiny_tandem_config()
    again = TandemConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert cfg.layer_map == default_layer_map(4, 2)
    bad = cfg.to_dict()
    bad["layer_map"] = [1]
    with pytest.raises(ConfigError, match="layer_map"):
        TandemConfig.from_dict(bad)
    bad["layer_map"] = [1, 5]
    with pytest.raises(ConfigError, match=r"layer_map\[1\]"):
        TandemConfig.from_dict(bad)
    bad = cfg.to_dict()
    bad["format_version"] = 2
    with pytest.raises(ConfigError, match="format_version"):
        TandemConfig.from_dict(bad)
    bad = cfg.to_dict()
    del bad["router"]
    with pytest.raises(ConfigError, match="router"):
        TandemConfig.from_dict(bad)
    bad = cfg.to_dict()
    bad["secondary"]["vocab_size"] = 50
    with pytest.raises(ConfigError, match="vocab_size"):
        TandemConfig.from_dict(bad)
    bad = cfg.to_dict()
    bad["primary"]["bogus"] = 1
    with pytest.raises(ConfigError, match="bogus"):
        TandemConfig.from_dict(bad)
    bad = cfg.to_dict()
    bad["torch_dtype"] = "int8"
    with pytest.raises(ConfigError, match="torch_dtype"):
        TandemConfig.from_dict(bad)
    good = cfg.to_dict()
    good["feature_layer"] = cfg.layer_map[-1]
    assert TandemConfig.from_dict(good).to_dict() == good
    for value in (cfg.layer_map[-1] + 1, True, "4", 1.0):
        bad = dict(good, feature_layer=value)
        with pytest.raises(ConfigError, match="feature_layer"):
            TandemConfig.from_dict(bad)
    out = dict(good, feature_at="output")
    assert TandemConfig.from_dict(out).feature_at == "output" and TandemConfig.from_dict(out).to_dict() == out
    assert "feature_at" not in TandemConfig.from_dict(good).to_dict()   # "input", the default, is not written
    for value in ("middle", None, 1):
        with pytest.raises(ConfigError, match="feature_at"):
            TandemConfig.from_dict(dict(good, feature_at=value))
    mlp = dict(good, feature_hidden=64)
    assert TandemConfig.from_dict(mlp).to_dict() == mlp
    for value in (0, -3, 2.5, True, "64"):
        with pytest.raises(ConfigError, match="feature_hidden"):
            TandemConfig.from_dict(dict(good, feature_hidden=value))
    anchored = dict(cfg.to_dict(), projection_embed=True)
    assert TandemConfig.from_dict(anchored).projection_embed and TandemConfig.from_dict(anchored).to_dict() == anchored
    assert "projection_embed" not in cfg.to_dict()   # false, the default, is not written
    for value in (1, "true", None):
        with pytest.raises(ConfigError, match="projection_embed"):
            TandemConfig.from_dict(dict(cfg.to_dict(), projection_embed=value))


def test_router_config():
    r = RouterConfig(embed_dim=8, top_k=3)
    assert r.num_features == 1 + 3 + 24
    with pytest.raises(ConfigError, match="threshold"):
        RouterConfig(embed_dim=8, threshold=1.5)
