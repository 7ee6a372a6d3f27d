"""``tandem-rt import-hf`` / ``import-gguf``: checkpoints that ``load_checkpoint`` loads and whose
primary (and imported secondary / drafter) reproduce the source models' logits."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tiny_ecosystem_models import hf_logits, save_hf, tiny_hf_model, write_llama_gguf
import tandem_rt
from tandem_rt.cli import main

TOL = 1e-4


def _ids(vocab=101, seed=1):
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))


def _toy_tokenizer_json(vocab: int) -> str:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = Whitespace()
    return tok.to_str()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    primary = tiny_hf_model("qwen2", tie=False, layers=4, hidden=64, seed=1)
    secondary = tiny_hf_model("llama", tie=True, layers=2, hidden=32, heads=4, kv_heads=1, intermediate=48, seed=2)
    drafter = tiny_hf_model("llama", tie=False, layers=1, hidden=32, heads=2, kv_heads=2, intermediate=48, seed=3)
    other_vocab = tiny_hf_model("llama", tie=True, layers=1, hidden=32, vocab=103, seed=4)
    dirs = {name: save_hf(m, root / name) for name, m in
            [("primary", primary), ("secondary", secondary), ("drafter", drafter), ("other_vocab", other_vocab)]}
    (dirs["primary"] / "tokenizer.json").write_text(_toy_tokenizer_json(101))
    return dirs, {"primary": primary, "secondary": secondary, "drafter": drafter}


def test_import_hf_full_pair(hf_dirs, tmp_path, capsys):
    dirs, models = hf_dirs
    out = tmp_path / "ckpt"
    rc = main(["import-hf", "--primary", str(dirs["primary"]), "--secondary", str(dirs["secondary"]),
               "--drafter", str(dirs["drafter"]), "--out", str(out), "--dtype", "float32", "--layer-map", "2,4",
               "--quiet"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    model = tandem_rt.load_checkpoint(out)
    assert model.config.layer_map == [2, 4] and model.config.torch_dtype == "float32"
    assert model.config.primary.attention_bias and model.config.secondary.tie_word_embeddings
    ids = _ids()
    with torch.no_grad():
        for part in ("primary", "secondary", "drafter"):
            got = getattr(model, part)(ids)
            assert (got - hf_logits(models[part], ids)).abs().max().item() <= TOL, part
        out_logits = model(ids, block_length=2)
        assert (out_logits.primary_logits - hf_logits(models["primary"], ids)).abs().max().item() <= TOL
        assert torch.isfinite(out_logits.secondary_logits).all()
    assert (out / "tokenizer.json").read_text() == (dirs["primary"] / "tokenizer.json").read_text()
    # fresh projections: zero bias, weight ~ normal(0, 1/sqrt(d_L))
    for proj in model.tandem.proj:
        assert torch.count_nonzero(proj.bias) == 0
        assert proj.weight.std().item() == pytest.approx(1 / math.sqrt(64), rel=0.2)


def test_import_hf_fresh_secondary_from_config(hf_dirs, tmp_path):
    dirs, models = hf_dirs
    spec = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2}
    spec_file = tmp_path / "secondary.json"
    spec_file.write_text(json.dumps(spec))
    for i, arg in enumerate([str(spec_file), json.dumps(spec)]):  # a file or inline JSON
        out = tmp_path / f"ckpt{i}"
        assert main(["import-hf", "--primary", str(dirs["primary"]), "--secondary-config", arg,
                     "--out", str(out), "--quiet"]) == 0
        cfg = tandem_rt.checkpoint.read_config(out)
        assert cfg.torch_dtype == "bfloat16"
        assert cfg.secondary.vocab_size == 101 and cfg.secondary.hidden_size == 32
        assert cfg.secondary.eos_token_id == cfg.primary.eos_token_id
        assert cfg.layer_map == [2, 4]  # default round((j+1) * 4 / 2)
    model = tandem_rt.load_checkpoint(out, dtype=torch.float32)
    ids = _ids(seed=5)
    expected = hf_logits(models["primary"], ids)
    # stored in bfloat16: the primary's logits agree to bfloat16 accuracy
    assert (model.primary(ids) - expected).abs().max().item() < 0.05 * expected.abs().max().item()
    emb = model.secondary.model.embed_tokens.weight
    assert emb.std().item() == pytest.approx(0.02, rel=0.2)


def test_vocab_mismatch_exits_2_with_one_line(hf_dirs, tmp_path, capsys):
    dirs, _ = hf_dirs
    rc = main(["import-hf", "--primary", str(dirs["primary"]), "--secondary", str(dirs["other_vocab"]),
               "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1
    assert "101" in err and "103" in err and "vocabulary sizes differ" in err
    assert not (tmp_path / "x" / "tandem_config.json").exists()


def test_secondary_and_secondary_config_are_exclusive(hf_dirs, tmp_path, capsys):
    dirs, _ = hf_dirs
    with pytest.raises(SystemExit) as exc:
        main(["import-hf", "--primary", str(dirs["primary"]), "--secondary", str(dirs["secondary"]),
              "--secondary-config", "{}", "--out", str(tmp_path)])
    assert exc.value.code == 2


def test_bad_layer_map_is_one_line_error(hf_dirs, tmp_path, capsys):
    dirs, _ = hf_dirs
    rc = main(["import-hf", "--primary", str(dirs["primary"]), "--secondary", str(dirs["secondary"]),
               "--out", str(tmp_path / "x"), "--layer-map", "2,9", "--quiet"])
    assert rc == 2 and "layer_map" in capsys.readouterr().err


def test_import_gguf(tmp_path, capsys):
    primary = tiny_hf_model("llama", tie=False, layers=3, seed=7)
    secondary = tiny_hf_model("llama", tie=True, layers=1, hidden=32, heads=2, kv_heads=1, seed=8)
    p = write_llama_gguf(primary, tmp_path / "primary.gguf")
    s = write_llama_gguf(secondary, tmp_path / "secondary.gguf")
    out = tmp_path / "ckpt"
    assert main(["import-gguf", "--primary", str(p), "--secondary", str(s), "--out", str(out),
                 "--dtype", "float32", "--quiet"]) == 0
    model = tandem_rt.load_checkpoint(out)
    ids = _ids(seed=2)
    with torch.no_grad():
        assert (model.primary(ids) - hf_logits(primary, ids)).abs().max().item() <= TOL
        assert (model.secondary(ids) - hf_logits(secondary, ids)).abs().max().item() <= TOL
    assert model.config.layer_map == [3]

    out2 = tmp_path / "ckpt2"
    assert main(["import-gguf", "--primary", str(p), "--secondary-config",
                 '{"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 3, '
                 '"num_attention_heads": 2, "num_key_value_heads": 1}', "--out", str(out2), "--quiet"]) == 0
    assert tandem_rt.checkpoint.read_config(out2).layer_map == [1, 2, 3]


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_import_hf_quantize_stores_blocks(hf_dirs, tmp_path, capsys, qtype):
    """``--quantize``: the primary's matrices are stored as GGUF blocks (U8 ``.qblocks``), the loaded
    dense weights are exactly their dequantisation (and close to the source's), the quantized engine
    serves them as blocks, and tandem-speed reproduces that quantized primary."""
    from safetensors import safe_open

    from tandem_rt.checkpoint import quantized_matrices
    from tandem_rt.engine import Engine, SamplingParams
    from tandem_rt.quantized import dequantize

    dirs, models = hf_dirs
    out = tmp_path / "q"
    assert main(["import-hf", "--primary", str(dirs["primary"]), "--secondary", str(dirs["secondary"]),
                 "--drafter", str(dirs["drafter"]), "--out", str(out), "--dtype", "float32",
                 "--quantize", qtype, "--quiet"]) == 0
    assert f"as {qtype} blocks" in capsys.readouterr().out
    cfg = json.loads((out / "tandem_config.json").read_text())
    assert cfg["quantized"] and set(cfg["quantized"].values()) == {qtype}
    assert "primary.model.layers.0.self_attn.q_proj.weight" in cfg["quantized"]
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        assert "primary.model.layers.0.mlp.down_proj.weight.qblocks" in keys
        assert "primary.model.layers.0.mlp.down_proj.weight" not in keys
        assert fh.get_tensor("primary.model.layers.0.mlp.down_proj.weight.qblocks").dtype == torch.uint8
    model = tandem_rt.load_checkpoint(out)
    mats = quantized_matrices(out)
    src = dict(models["primary"].named_parameters())
    for name, qm in mats.items():
        w = dict(model.primary.named_parameters())[name].detach()
        assert torch.equal(w, dequantize(qm, w.dtype))
        ref = src[name].detach().float()
        step = 1 / 127 if qtype == "Q8_0" else 1 / 15
        assert float((w - ref).abs().max()) <= step * float(ref.abs().max()) * 1.01 + 1e-6
    engine = Engine.from_pretrained(out, dtype="float32", quantized=True, num_pages=64, page_size=8)
    sp = SamplingParams(max_new_tokens=10, ignore_eos=True)
    want = engine.generate([[3, 4, 5, 6]], sp, mode="primary")[0].token_ids
    assert engine.generate([[3, 4, 5, 6]], sp, mode="tandem-speed", gamma=3)[0].token_ids == want
    assert engine.primary.quantized_bytes > 0


def test_malformed_quantized_checkpoints_are_refused(hf_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    from tandem_rt.checkpoint import CheckpointError

    dirs, _ = hf_dirs
    out = tmp_path / "q"
    main(["import-hf", "--primary", str(dirs["primary"]), "--secondary", str(dirs["secondary"]), "--out", str(out),
          "--dtype", "float32", "--quantize", "Q8_0", "--quiet"])
    tensors = load_file(str(out / "model.safetensors"))
    key = "primary.model.layers.1.self_attn.o_proj.weight.qblocks"
    good = tensors[key].clone()
    tensors[key] = good[:, :-2].contiguous()                        # a truncated block row
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="o_proj.weight.qblocks.*shape"):
        tandem_rt.load_checkpoint(out)
    tensors[key] = good.to(torch.int16)                              # not bytes
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="expected U8 Q8_0 blocks"):
        tandem_rt.load_checkpoint(out)
    bad = good.clone()
    bad[0, 0:2] = torch.tensor([0x00, 0x7C], dtype=torch.uint8)     # fp16 +inf block scale
    tensors[key] = bad
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="NaN or infinite scales"):
        tandem_rt.load_checkpoint(out)
    tensors[key] = good
    save_file(tensors, str(out / "model.safetensors"))
    cfg = json.loads((out / "tandem_config.json").read_text())
    cfg["quantized"]["primary.model.layers.9.mlp.up_proj.weight"] = "Q8_0"
    (out / "tandem_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a stored parameter"):
        tandem_rt.load_checkpoint(out)
    cfg["quantized"] = {"primary.model.layers.0.mlp.up_proj.weight": "Q5_K"}
    (out / "tandem_config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="quantized must map"):
        tandem_rt.load_checkpoint(out)


def test_quantized_load_does_not_read_the_dense_matrices(hf_dirs, tmp_path, monkeypatch):
    """``Engine.from_pretrained(quantized=True)`` never dequantises the matrices it serves as blocks
    (``load_checkpoint(skip_values=...)``), and gives the tokens of an engine built on a fully
    loaded model with the same blocks."""
    import tandem_rt.checkpoint as ckpt
    from tandem_rt.engine import Engine, SamplingParams

    dirs, _ = hf_dirs
    out = tmp_path / "q"
    main(["import-hf", "--primary", str(dirs["primary"]), "--secondary", str(dirs["secondary"]), "--out", str(out),
          "--dtype", "float32", "--quantize", "Q4_1", "--quiet"])
    full = tandem_rt.load_checkpoint(out)
    ref = Engine(full, num_pages=64, page_size=8, quantized_primary=ckpt.quantized_matrices(out))
    sp = SamplingParams(max_new_tokens=8, ignore_eos=True)
    want = ref.generate([[3, 4, 5]], sp, mode="tandem-speed", gamma=2)[0].token_ids
    read = []
    real = ckpt._dequantize_blocks
    monkeypatch.setattr(ckpt, "_dequantize_blocks", lambda t, name, *a: (read.append(name), real(t, name, *a))[1])
    engine = Engine.from_pretrained(out, quantized=True, num_pages=64, page_size=8)
    assert read == []                       # every stored block matrix is served as blocks
    assert engine.generate([[3, 4, 5]], sp, mode="tandem-speed", gamma=2)[0].token_ids == want
    tandem_rt.load_checkpoint(out, skip_values={"primary.model.layers.0.self_attn.q_proj.weight"})
    assert "primary.model.layers.0.self_attn.q_proj.weight.qblocks" not in read and len(read) > 0


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_auto_quantized_primary(hf_dirs, tmp_path, monkeypatch, qtype):
    """``Engine.from_pretrained(quantized="auto")`` (the default) serves the stored blocks on a CPU
    that runs ``linear_rows_q16``'s int8 kernels (bf16 / fp32), the dense weights on one without them
    or in fp16; ``quantized=False`` always the dense weights; anything but True / False / "auto" is
    refused. (A GGUF reference with Q4_0 matrices: test_quantized_engine.py.)"""
    import tandem_rt.quantized as quantized
    from tandem_rt.engine import Engine, SamplingParams

    dirs, _ = hf_dirs
    out = tmp_path / "q"
    main(["import-hf", "--primary", str(dirs["primary"]), "--secondary", str(dirs["secondary"]), "--out", str(out),
          "--dtype", "float32", "--quantize", qtype, "--quiet"])
    kw = dict(num_pages=64, page_size=8)
    monkeypatch.setattr(quantized, "packs16", lambda: True)
    auto = Engine.from_pretrained(out, **kw)
    assert auto.primary.quantized_bytes > 0
    forced = Engine.from_pretrained(out, quantized=True, **kw)
    assert forced.primary.quantized_bytes > 0
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
    assert auto.generate([[3, 4, 5]], sp, mode="primary")[0].token_ids == \
        forced.generate([[3, 4, 5]], sp, mode="primary")[0].token_ids
    assert Engine.from_pretrained(out, quantized=False, **kw).primary.quantized_bytes == 0
    assert Engine.from_pretrained(out, device="cpu", dtype="float16", **kw).primary.quantized_bytes == 0
    monkeypatch.setattr(quantized, "packs16", lambda: False)
    assert Engine.from_pretrained(out, **kw).primary.quantized_bytes == 0
    with pytest.raises(ValueError, match="quantized must be True, False or 'auto', got 'yes'"):
        Engine.from_pretrained(out, quantized="yes", **kw)
