"""Fuzz tests (hypothesis) at the boundaries: the checkpoint loader on mutated safetensors headers,
configs and shard indexes; the ops' argument validation on mutated arguments; the engine's request
validation on arbitrary prompts, sampling parameters, modes and draft lengths.

Every case must either succeed or raise the boundary's named error (``CheckpointError``, or
``ValueError`` / ``TypeError`` whose message names the bad argument); a crash, a hang, or any other
exception type fails the test. The page manager's random operation sequences are fuzzed in
``test_page_manager.py`` (``PageManagerMachine``). Examples are derandomised, so the suite is
reproducible; the whole file runs in well under a minute.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import random_tandem_model
from tandem_rt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# any JSON value, including the awkward ones (huge and negative ints, NaN, nesting)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.integers(-3, 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8)


# ---------------------------------------------------------------------------- checkpoint loader

@pytest.fixture(scope="module")
def ckpt_dirs(tmp_path_factory):
    """A tiny checkpoint as one file and as an index + shards."""
    model = random_tandem_model(0, vocab_size=37)
    single = save_checkpoint(model, tmp_path_factory.mktemp("single") / "ckpt")
    sharded = save_checkpoint(model, tmp_path_factory.mktemp("sharded") / "ckpt", max_shard_bytes=20_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    return single, sharded


def fresh_copy(src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("fuzz") / "ckpt"
    shutil.copytree(src, dst)
    return dst


def load_or_named_error(path):
    """Load the checkpoint; only CheckpointError (with a message) may come out."""
    try:
        load_checkpoint(path)
    except CheckpointError as exc:
        assert str(exc)
        return False
    return True


def split_safetensors(raw: bytes):
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_safetensors(header, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


@FUZZ
@given(which=st.integers(0, 10 ** 6), field=st.sampled_from(["dtype", "shape", "data_offsets", "entry", "extra"]),
       value=JSON)
def test_loader_on_mutated_header_entries(ckpt_dirs, tmp_path_factory, which, field, value):
    path = fresh_copy(ckpt_dirs[0], tmp_path_factory)
    file = path / "model.safetensors"
    header, data = split_safetensors(file.read_bytes())
    names = sorted(n for n in header if n != "__metadata__")
    name = names[which % len(names)]
    if field == "entry":
        header[name] = value
    elif field == "extra":
        header[f"fuzz.{which}"] = value
    else:
        header[name][field] = value
    file.write_bytes(join_safetensors(header, data))
    load_or_named_error(path)


@FUZZ
@given(kind=st.sampled_from(["overwrite", "length", "truncate"]), pos=st.integers(0, 10 ** 6),
       payload=st.binary(min_size=1, max_size=16), length=st.integers(0, 2 ** 64 - 1))
def test_loader_on_corrupted_bytes(ckpt_dirs, tmp_path_factory, kind, pos, payload, length):
    path = fresh_copy(ckpt_dirs[0], tmp_path_factory)
    file = path / "model.safetensors"
    raw = bytearray(file.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    if kind == "overwrite":  # bytes of the header (framing and JSON)
        at = pos % header_end
        raw[at:at + len(payload)] = payload
    elif kind == "length":
        raw[:8] = length.to_bytes(8, "little")
    else:
        del raw[pos % len(raw):]
    file.write_bytes(bytes(raw))
    assert not load_or_named_error(path) or kind == "overwrite"


def config_paths(obj, prefix=()):
    """Every key path of a nested JSON object (the objects themselves included)."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append(prefix + (k,))
            out.extend(config_paths(v, prefix + (k,)))
    return out


@FUZZ
@given(which=st.integers(0, 10 ** 6), action=st.sampled_from(["set", "delete", "add"]), value=JSON)
def test_loader_on_mutated_configs(ckpt_dirs, tmp_path_factory, which, action, value):
    path = fresh_copy(ckpt_dirs[0], tmp_path_factory)
    file = path / "tandem_config.json"
    cfg = json.loads(file.read_text())
    paths = config_paths(cfg)
    key = paths[which % len(paths)]
    parent = cfg
    for k in key[:-1]:
        parent = parent[k]
    if action == "set":
        parent[key[-1]] = value
    elif action == "delete":
        del parent[key[-1]]
    else:
        parent[f"fuzz_{which}"] = value
    file.write_text(json.dumps(cfg))
    load_or_named_error(path)


@FUZZ
@given(action=st.sampled_from(["weight_map", "entry", "drop", "add", "top"]), which=st.integers(0, 10 ** 6),
       value=JSON, shard=st.sampled_from(["", "..", "../ckpt/model.safetensors", "/etc/passwd", ".",
                                          "model-00001-of-00099.safetensors", "tandem_config.json", "x" * 300]))
def test_loader_on_mutated_shard_index(ckpt_dirs, tmp_path_factory, action, which, value, shard):
    path = fresh_copy(ckpt_dirs[1], tmp_path_factory)
    file = path / "model.safetensors.index.json"
    index = json.loads(file.read_text())
    names = sorted(index["weight_map"])
    name = names[which % len(names)]
    if action == "weight_map":
        index["weight_map"] = value
    elif action == "entry":
        index["weight_map"][name] = shard if which % 2 else value
    elif action == "drop":
        del index["weight_map"][name]
    elif action == "add":
        index["weight_map"][f"fuzz.{which}"] = shard
    else:
        index = value
    file.write_text(json.dumps(index))
    assert not load_or_named_error(path) or action == "entry"


# ---------------------------------------------------------------------------- op arguments

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8, torch.bool]
NAMED = (ValueError, TypeError)


def random_tensor(draw, dtype, shape):
    n = 1
    for s in shape:
        n *= s
    if dtype.is_floating_point:
        vals = draw(st.lists(st.floats(-1e4, 1e4) | st.sampled_from([float("nan"), float("inf")]),
                             min_size=n, max_size=n))
    elif dtype == torch.bool:
        vals = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    else:
        hi = 255 if dtype == torch.uint8 else 2 ** 31 - 1
        lo = 0 if dtype == torch.uint8 else -2 ** 31
        vals = draw(st.lists(st.integers(lo, hi) | st.integers(-2, 40) if lo < 0 else st.integers(lo, hi),
                             min_size=n, max_size=n))
    return torch.tensor(vals, dtype=torch.float64 if dtype.is_floating_point else None).to(dtype).reshape(shape)


@st.composite
def mutated(draw, valid: dict, scalars: dict, optional=()):
    """``valid`` with one argument changed: a tensor's dtype, shape, values or strides, a scalar, or
    an ``optional`` tensor left out (None)."""
    args = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in valid.items()}
    names = sorted(valid)
    name = draw(st.sampled_from(names))
    v = args[name]
    if isinstance(v, torch.Tensor):
        how = draw(st.sampled_from(["dtype", "shape", "values", "strides"] + (["none"] if name in optional else [])))
        if how == "dtype":
            args[name] = v.to(draw(st.sampled_from(DTYPES)))
        elif how == "shape":
            shape = draw(st.lists(st.integers(0, 5), max_size=4))
            args[name] = random_tensor(draw, draw(st.sampled_from([v.dtype] * 3 + DTYPES)), shape)
        elif how == "values":
            args[name] = random_tensor(draw, v.dtype, list(v.shape))
        elif how == "strides" and v.dim() >= 1 and v.numel() > 1:
            args[name] = torch.cat([v, v], dim=0)[::2] if v.dim() == 1 else v.transpose(0, -1)
        elif how == "none":
            args[name] = None
    elif name in scalars:
        args[name] = draw(scalars[name])
    return args


FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -1.0, 1e-30, 1e30])
INTS = st.integers(-2 ** 40, 2 ** 40) | st.integers(-2, 40)


def paged_setup(seed=0, q_len=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    P, S, Hkv, D, Hq = 6, 4, 2, 16, 4
    k = torch.randn(P, S, Hkv, D, generator=g).to(dtype)
    return dict(
        q=torch.randn(2 * q_len, Hq, D, generator=g).to(dtype), k_cache=k, v_cache=k.clone(),
        block_tables=torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32),
        seq_lens=torch.tensor([9, 7], dtype=torch.int32),
        query_start_loc=torch.tensor([0, q_len, 2 * q_len], dtype=torch.int32))


def call_named(fn, args):
    """Call; only ValueError / TypeError with a message may come out."""
    try:
        fn(**args)
    except NAMED as exc:
        assert str(exc)


@FUZZ
@given(data=st.data())
def test_paged_attention_arguments(data):
    valid = paged_setup()
    valid.update(out=torch.empty_like(valid["q"]), scale=0.25, max_q_len=3, max_seq_len=9)
    args = data.draw(mutated(valid, dict(scale=FLOATS, max_q_len=INTS, max_seq_len=INTS)))
    if args["out"] is None:
        args["out"] = torch.empty_like(valid["q"])
    call_named(lambda **a: torch.ops.tandem_rt.paged_attention(
        a["out"], a["q"], a["k_cache"], a["v_cache"], a["block_tables"], a["seq_lens"], a["query_start_loc"],
        a["scale"], a["max_q_len"], a["max_seq_len"]), args)
    from tandem_rt.ops import paged_attention

    call_named(paged_attention, args)


@FUZZ
@given(data=st.data())
def test_rope_cache_write_arguments(data):
    s = paged_setup()
    T = 5
    valid = dict(k=torch.randn(T, 2, 16), v=torch.randn(T, 2, 16), positions=torch.arange(T),
                 slot_mapping=torch.tensor([0, 1, 2, 7, 23]), k_cache=s["k_cache"], v_cache=s["v_cache"],
                 rope_theta=10000.0, q=torch.randn(T, 4, 16))
    args = data.draw(mutated(valid, dict(rope_theta=FLOATS), optional=("q",)))
    call_named(lambda **a: torch.ops.tandem_rt.rope_cache_write(
        a["k"], a["v"], a["positions"], a["slot_mapping"], a["k_cache"], a["v_cache"], a["rope_theta"], a["q"]), args)
    from tandem_rt.ops import rope_cache_write

    call_named(rope_cache_write, args)


@FUZZ
@given(data=st.data())
def test_copy_pages_arguments(data):
    s = paged_setup()
    valid = dict(k=s["k_cache"], v=s["v_cache"], src_pages=torch.tensor([0, 1], dtype=torch.int32),
                 dst_pages=torch.tensor([4, 5], dtype=torch.int32))
    args = data.draw(mutated(valid, {}))
    from tandem_rt.ops import copy_pages

    call_named(lambda **a: torch.ops.tandem_rt.copy_pages([a["k"], a["v"]], a["src_pages"], a["dst_pages"]), args)
    call_named(lambda **a: copy_pages([a["k"], a["v"]], a["src_pages"], a["dst_pages"]), args)


def row_params(B):
    from tandem_rt.ops import make_rng_state

    return dict(temperature=torch.full((B,), 0.7), top_k=torch.zeros(B, dtype=torch.int32),
                top_p=torch.ones(B), rng_state=make_rng_state(3))


@FUZZ
@given(data=st.data())
def test_sample_arguments(data):
    from tandem_rt.ops import sample

    valid = dict(logits=torch.randn(3, 11), **row_params(3))
    args = data.draw(mutated(valid, {}))
    call_named(lambda **a: torch.ops.tandem_rt.sample(a["logits"], a["temperature"], a["top_k"], a["top_p"],
                                                      a["rng_state"], None), args)
    call_named(sample, args)


@FUZZ
@given(data=st.data())
def test_verify_arguments(data):
    from tandem_rt.ops import verify

    B, G, V = 2, 3, 11
    probs = torch.softmax(torch.randn(B, G, V), -1)
    valid = dict(draft_tokens=torch.randint(0, V, (B, G)), draft_lens=torch.tensor([3, 1], dtype=torch.int32),
                 draft_probs=probs, target_logits=torch.randn(B, G + 1, V), **row_params(B))
    args = data.draw(mutated(valid, {}, optional=("draft_probs",)))
    call_named(verify, args)


@FUZZ
@given(data=st.data())
def test_layer_math_arguments(data):
    from tandem_rt.ops import linear_rows, rms_norm, silu_and_mul

    valid = dict(x=torch.randn(3, 8).bfloat16(), w=torch.randn(5, 8).bfloat16(), add=torch.randn(3, 5).bfloat16(),
                 weight=torch.ones(8).bfloat16(), eps=1e-6)
    args = data.draw(mutated(valid, dict(eps=FLOATS), optional=("add",)))
    call_named(lambda **a: torch.ops.tandem_rt.linear_rows(a["x"], a["w"], a["add"]), args)
    call_named(lambda **a: linear_rows(a["x"], a["w"], a["add"]), args)
    call_named(lambda **a: torch.ops.tandem_rt.rms_norm(a["x"], a["weight"], a["eps"]), args)
    call_named(lambda **a: rms_norm(a["x"], a["weight"], a["eps"]), args)
    call_named(lambda **a: torch.ops.tandem_rt.silu_and_mul(a["x"]), args)
    call_named(lambda **a: silu_and_mul(a["x"]), args)


# ---------------------------------------------------------------------------- engine requests

@pytest.fixture(scope="module")
def fuzz_engine():
    from engine_models import agreeing_tandem_model
    from tandem_rt import Engine

    return Engine(agreeing_tandem_model(seed=1, max_position_embeddings=64), num_pages=64, page_size=4)


PROMPTS = (st.text(max_size=5) | st.lists(st.integers(-3, 70) | st.integers(-2 ** 70, 2 ** 70), max_size=6)
           | st.lists(st.floats() | st.booleans() | st.none() | st.text(max_size=2), max_size=3)
           | st.lists(st.lists(st.integers(-1, 62), max_size=4), max_size=3)
           | st.builds(lambda n, d: torch.arange(n).to(d), st.integers(0, 4), st.sampled_from(DTYPES))
           | st.builds(lambda n: torch.zeros(n, 2, dtype=torch.int64), st.integers(0, 3))
           | JSON)
PARAM_VALUES = dict(
    max_new_tokens=st.integers(-2, 12) | st.integers(-2 ** 70, 2 ** 70) | FLOATS | st.none() | st.text(max_size=2),
    temperature=FLOATS | st.integers(-2, 3) | st.none() | st.text(max_size=2),
    top_k=INTS | FLOATS | st.none(),
    top_p=FLOATS | st.integers(-1, 2) | st.none(),
    seed=INTS | st.none() | FLOATS | st.text(max_size=2),
    stop_token_ids=st.lists(st.integers(-2, 70) | st.floats(), max_size=3) | st.integers(0, 5) | st.none(),
    n=st.integers(-1, 3) | FLOATS,
    ignore_eos=st.booleans() | st.integers(0, 2) | st.none())


@st.composite
def sampling_kwargs(draw):
    keys = draw(st.lists(st.sampled_from(sorted(PARAM_VALUES)), unique=True, max_size=4))
    kw = {k: draw(PARAM_VALUES[k]) for k in keys}
    kw.setdefault("max_new_tokens", draw(st.integers(1, 6)))
    return kw


@FUZZ
@given(prompts=PROMPTS, kw=sampling_kwargs(),
       mode=st.sampled_from(["primary", "secondary", "speed", "tandem", "tandem-speed"]) | st.text(max_size=6),
       gamma=st.integers(-2, 40) | st.just("auto") | FLOATS | st.none() | st.text(max_size=3))
def test_engine_requests(fuzz_engine, prompts, kw, mode, gamma):
    from tandem_rt import SamplingParams

    try:
        params = SamplingParams(**kw)
    except NAMED as exc:
        assert str(exc)
        return
    try:
        results = fuzz_engine.generate(prompts, params, mode=mode, gamma=gamma)
    except NAMED as exc:
        assert str(exc)
    else:
        for r in (results if isinstance(results, list) else [results]):
            assert all(0 <= t < fuzz_engine.vocab_size for t in r.token_ids)
    pm = fuzz_engine.page_manager
    pm.check_invariants()
    assert pm.num_free_pages == pm.num_pages and pm.num_sequences == 0  # nothing leaked
