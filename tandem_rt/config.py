"""Model and checkpoint configurations, validated on construction.

``ModelConfig`` describes one Llama-family decoder (primary, secondary or standalone
drafter); ``RouterConfig`` the adaptive-block-length router; ``TandemConfig`` the whole
checkpoint (``tandem_config.json``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from tandem_rt.dtypes import DTYPES

FORMAT_NAME = "tandem_rt"
FORMAT_VERSION = 1


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the field."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _from_dict(cls, data: Any, where: str):
    _require(isinstance(data, dict), f"{where}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    _require(not unknown, f"{where}: unknown field(s) {unknown}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    _require(not missing, f"{where}: missing field(s) {missing}")
    try:
        return cls(**data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


@dataclass
class ModelConfig:
    """A Llama-style decoder: RMSNorm, RoPE (rotate-half), SwiGLU, grouped-query attention."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: Optional[int] = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    # a reduced output vocabulary (drafters): logits only for these many token ids (the model's
    # ``vocab_subset`` buffer); every other token has probability 0
    output_vocab_size: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                     f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            _require(self.hidden_size % self.num_attention_heads == 0,
                     f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                     f"({self.hidden_size}) when head_dim is not given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _require(isinstance(self.head_dim, int) and self.head_dim > 0 and self.head_dim % 2 == 0,
                 f"head_dim must be a positive even integer, got {self.head_dim!r}")
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                 f"num_attention_heads ({self.num_attention_heads})")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
                     and value != float("inf"), f"{name} must be a positive number, got {value!r}")
        for name in ("tie_word_embeddings", "attention_bias"):
            _require(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        self.rope_theta = float(self.rope_theta)
        self.rms_norm_eps = float(self.rms_norm_eps)
        _require(self.output_vocab_size is None
                 or (isinstance(self.output_vocab_size, int) and not isinstance(self.output_vocab_size, bool)
                     and 1 <= self.output_vocab_size <= self.vocab_size),
                 f"output_vocab_size must be None or an integer in [1, vocab_size={self.vocab_size}], "
                 f"got {self.output_vocab_size!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, int) and 0 <= value < self.vocab_size),
                     f"{name} must be None or a token id in [0, {self.vocab_size}), got {value!r}")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["output_vocab_size"] is None:
            del d["output_vocab_size"]  # configs without a reduced vocabulary keep their old form
        return d

    @classmethod
    def from_dict(cls, data: dict, where: str = "model config") -> "ModelConfig":
        return _from_dict(cls, data, where)


@dataclass
class RouterConfig:
    """Adaptive block length router: a 2-layer MLP on secondary features.

    Features per drafted token: the secondary's next-token entropy (1), its top-``top_k``
    probabilities (``top_k``) and its input embeddings of those ``top_k`` tokens
    (``top_k * embed_dim``). Output: predicted total-variation distance between the
    secondary's and the primary's next-token distributions; drafting continues while the
    predicted acceptance ``1 - tv`` stays at or above ``threshold``.
    """

    embed_dim: int
    top_k: int = 4
    hidden_size: int = 128
    threshold: float = 0.8
    gamma_max: int = 8

    def __post_init__(self) -> None:
        for name in ("embed_dim", "top_k", "hidden_size", "gamma_max"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        _require(isinstance(self.threshold, (int, float)) and not isinstance(self.threshold, bool)
                 and 0.0 <= self.threshold <= 1.0, f"threshold must be a number in [0, 1], got {self.threshold!r}")
        self.threshold = float(self.threshold)

    @property
    def num_features(self) -> int:
        return 1 + self.top_k + self.top_k * self.embed_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "router config") -> "RouterConfig":
        return _from_dict(cls, data, where)


SOURCE_KINDS = ("gguf", "hf", "tandem")


def check_primary_source(ref) -> None:
    """Validate a ``primary_source`` reference: ``{"kind", "sha256"}`` plus either ``"path"`` (a
    file or directory) or ``"package"`` and ``"file"`` (a file inside an installed Python package,
    as a relative path that does not leave the package)."""
    _require(isinstance(ref, dict), f"primary_source must be a JSON object, got {type(ref).__name__}")
    keys = set(ref)
    allowed = {"kind", "sha256", "path", "package", "file"}
    _require(not keys - allowed, f"primary_source: unknown key(s) {sorted(keys - allowed)}")
    _require(ref.get("kind") in SOURCE_KINDS, f"primary_source.kind must be one of {SOURCE_KINDS}, got {ref.get('kind')!r}")
    sha = ref.get("sha256")
    _require(isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha),
             f"primary_source.sha256 must be 64 lowercase hex digits, got {sha!r}")
    if "package" in ref or "file" in ref:
        _require("path" not in ref, "primary_source: give either path or package + file, not both")
        pkg, file = ref.get("package"), ref.get("file")
        _require(isinstance(pkg, str) and pkg.isidentifier(),
                 f"primary_source.package must be a Python package name, got {pkg!r}")
        _require(isinstance(file, str) and file and not file.startswith(("/", "\\"))
                 and ".." not in file.replace("\\", "/").split("/"),
                 f"primary_source.file must be a relative path inside the package, got {file!r}")
    else:
        _require(isinstance(ref.get("path"), str) and ref["path"],
                 f"primary_source needs a path or a package + file, got {ref!r}")


def default_layer_map(primary_layers: int, secondary_layers: int) -> list[int]:
    """``l(j) = round((j+1) * L_L / L_S)``: the last secondary layer reads the primary's last."""
    return [int(round((j + 1) * primary_layers / secondary_layers)) for j in range(secondary_layers)]


TRAIN_BOUNDARIES = ("training", "drafting")
QUANTIZED_TYPES = ("Q8_0", "Q4_1")   # block quantizations a checkpoint may store its primary's matrices in


# where the feature input enters the secondary (TandemConfig.feature_at)
FEATURE_AT = ("input", "output")

@dataclass
class TandemConfig:
    """Everything in ``tandem_config.json`` (format ``tandem_rt`` version 1)."""

    primary: ModelConfig
    secondary: ModelConfig
    layer_map: Optional[list] = None
    train_block_length: int = 2
    projection_bias: bool = True
    drafter: Optional[ModelConfig] = None
    router: Optional[RouterConfig] = None
    torch_dtype: str = "bfloat16"
    format: str = field(default=FORMAT_NAME)
    format_version: int = field(default=FORMAT_VERSION)
    # optional: the primary's weights are not stored but named by source (see docs/CHECKPOINT.md)
    primary_source: Optional[dict] = None
    # optional: parts ("secondary", "drafter") whose token embeddings are the primary's (stored once)
    shared_embeddings: list = field(default_factory=list)
    # optional: the attention boundaries the secondary was trained with (docs/DESIGN.md §2.3):
    # "training" (block ends read the primary's own position: models.tandem.training_boundary) or
    # "drafting" (every query reads 1..γ own positions, as the engine drafts: tandem-rt train)
    train_boundary: str = "training"
    # optional: primary matrices stored as GGUF blocks (name -> "Q8_0" / "Q4_1"; docs/CHECKPOINT.md)
    quantized: dict = field(default_factory=dict)
    # optional: the primary layer (one of layer_map) whose representation at the last position
    # before a block is added to the secondary's input embeddings (``tandem.feature``; docs/DESIGN.md
    # §2.2 "Feature input"); None: Eq. (2) only
    feature_layer: Optional[int] = None
    # optional, with feature_layer: where the feature enters the secondary: "input" (added to its
    # input embeddings) or "output" (added to its last residual, before the final norm and LM head)
    feature_at: str = "input"
    # optional, with feature_layer: the hidden width of a two-layer feature MLP (None: one matrix W_f)
    feature_hidden: Optional[int] = None
    # optional: the primary-derived residual of secondary layer j also carries the token's own
    # embedding, y_hat_p = proj_j(x^(layer_map[j])_p) + embed(t_p) (docs/DESIGN.md §2.2 "Token-anchored
    # projections"); false: Eq. (2), y_hat_p = proj_j(x^(layer_map[j])_p)
    projection_embed: bool = False

    def __post_init__(self) -> None:
        _require(self.format == FORMAT_NAME, f"format must be {FORMAT_NAME!r}, got {self.format!r}")
        _require(self.format_version == FORMAT_VERSION,
                 f"unknown format_version {self.format_version!r} (this tandem_rt reads {FORMAT_VERSION})")
        L_L, L_S = self.primary.num_hidden_layers, self.secondary.num_hidden_layers
        if self.layer_map is None:
            self.layer_map = default_layer_map(L_L, L_S)
        _require(isinstance(self.layer_map, (list, tuple)) and len(self.layer_map) == L_S,
                 f"layer_map must have one entry per secondary layer ({L_S}), got {self.layer_map!r}")
        for j, layer in enumerate(self.layer_map):
            _require(isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer <= L_L,
                     f"layer_map[{j}] must be a primary layer index in 0..{L_L}, got {layer!r}")
        self.layer_map = list(self.layer_map)
        _require(isinstance(self.projection_bias, bool),
                 f"projection_bias must be true or false, got {self.projection_bias!r}")
        _require(isinstance(self.train_block_length, int) and not isinstance(self.train_block_length, bool)
                 and self.train_block_length >= 1,
                 f"train_block_length must be a positive integer, got {self.train_block_length!r}")
        _require(isinstance(self.torch_dtype, str) and self.torch_dtype in DTYPES, f"torch_dtype must be one of {sorted(DTYPES)}, got {self.torch_dtype!r}")
        for name in ("secondary", "drafter"):
            other = getattr(self, name)
            if other is not None:
                _require(other.vocab_size == self.primary.vocab_size,
                         f"{name}.vocab_size ({other.vocab_size}) must equal primary.vocab_size "
                         f"({self.primary.vocab_size}): the models share one tokenizer")
        if self.primary_source is not None:
            check_primary_source(self.primary_source)
        _require(isinstance(self.shared_embeddings, (list, tuple))
                 and all(x in ("secondary", "drafter") for x in self.shared_embeddings)
                 and len(set(self.shared_embeddings)) == len(self.shared_embeddings),
                 f"shared_embeddings must be a list of distinct 'secondary' / 'drafter', got {self.shared_embeddings!r}")
        self.shared_embeddings = list(self.shared_embeddings)
        _require(isinstance(self.train_boundary, str) and self.train_boundary in TRAIN_BOUNDARIES,
                 f"train_boundary must be one of {list(TRAIN_BOUNDARIES)}, got {self.train_boundary!r}")
        _require(isinstance(self.quantized, dict)
                 and all(isinstance(k, str) and k.startswith("primary.") and k.endswith(".weight")
                         and v in QUANTIZED_TYPES for k, v in self.quantized.items()),
                 f"quantized must map primary.* weight names to one of {list(QUANTIZED_TYPES)}, "
                 f"got {self.quantized!r}")
        _require(not (self.quantized and self.primary_source is not None),
                 "quantized needs the primary's weights stored, but primary_source references them")
        self.quantized = dict(self.quantized)
        _require(self.feature_layer is None or (isinstance(self.feature_layer, int)
                                                and not isinstance(self.feature_layer, bool)
                                                and self.feature_layer in self.layer_map),
                 f"feature_layer must be null or one of layer_map {self.layer_map}, got {self.feature_layer!r}")
        _require(self.feature_at in FEATURE_AT, f"feature_at must be one of {list(FEATURE_AT)}, got {self.feature_at!r}")
        _require(self.feature_hidden is None or (isinstance(self.feature_hidden, int)
                                                 and not isinstance(self.feature_hidden, bool) and self.feature_hidden > 0),
                 f"feature_hidden must be null or a positive integer, got {self.feature_hidden!r}")
        _require(isinstance(self.projection_embed, bool),
                 f"projection_embed must be true or false, got {self.projection_embed!r}")
        for name in self.shared_embeddings:
            other = getattr(self, name)
            _require(other is not None and other.hidden_size == self.primary.hidden_size,
                     f"shared_embeddings names {name!r}, whose hidden_size must equal the primary's "
                     f"({self.primary.hidden_size}) to share its embeddings")
        if self.router is not None:
            _require(self.router.embed_dim == self.secondary.hidden_size,
                     f"router.embed_dim ({self.router.embed_dim}) must equal secondary.hidden_size "
                     f"({self.secondary.hidden_size})")

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.torch_dtype]

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "format_version": self.format_version,
            "primary": self.primary.to_dict(),
            "secondary": self.secondary.to_dict(),
            "layer_map": list(self.layer_map),
            "train_block_length": self.train_block_length,
            "projection_bias": self.projection_bias,
            "drafter": self.drafter.to_dict() if self.drafter is not None else None,
            "router": self.router.to_dict() if self.router is not None else None,
            "torch_dtype": self.torch_dtype,
            **({"primary_source": dict(self.primary_source)} if self.primary_source is not None else {}),
            **({"shared_embeddings": list(self.shared_embeddings)} if self.shared_embeddings else {}),
            **({"train_boundary": self.train_boundary} if self.train_boundary != "training" else {}),
            **({"quantized": dict(self.quantized)} if self.quantized else {}),
            **({"feature_layer": self.feature_layer} if self.feature_layer is not None else {}),
            **({"feature_at": self.feature_at} if self.feature_at != "input" else {}),
            **({"feature_hidden": self.feature_hidden} if self.feature_hidden is not None else {}),
            **({"projection_embed": True} if self.projection_embed else {}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> "TandemConfig":
        _require(isinstance(data, dict), f"tandem_config.json must hold a JSON object, got {type(data).__name__}")
        expected = {"format", "format_version", "primary", "secondary", "layer_map",
                    "train_block_length", "projection_bias", "drafter", "router", "torch_dtype"}
        optional = {"primary_source", "shared_embeddings", "train_boundary", "quantized", "feature_layer", "feature_at",
                    "feature_hidden", "projection_embed"}
        missing = sorted(expected - set(data))
        unknown = sorted(set(data) - expected - optional)
        _require(not missing, f"tandem_config.json: missing key(s) {missing}")
        _require(not unknown, f"tandem_config.json: unknown key(s) {unknown}")
        _require(data["format"] == FORMAT_NAME, f"tandem_config.json: format must be {FORMAT_NAME!r}, got {data['format']!r}")
        _require(data["format_version"] == FORMAT_VERSION,
                 f"tandem_config.json: unknown format_version {data['format_version']!r} "
                 f"(this tandem_rt reads {FORMAT_VERSION})")
        kwargs = dict(data)
        kwargs["primary"] = ModelConfig.from_dict(data["primary"], "primary")
        kwargs["secondary"] = ModelConfig.from_dict(data["secondary"], "secondary")
        kwargs["drafter"] = None if data["drafter"] is None else ModelConfig.from_dict(data["drafter"], "drafter")
        kwargs["router"] = None if data["router"] is None else RouterConfig.from_dict(data["router"], "router")
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"tandem_config.json: {exc}") from None
