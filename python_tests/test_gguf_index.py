"""``tandem_rt.gguf_index.read_tensor_index``: the tensor infos of GGUF files equal those the
``gguf`` package's reader finds (names, shapes, types, absolute data offsets) for files with string
arrays, nested arrays, every scalar type and a custom alignment; malformed files give a ValueError
naming the file and the cause."""
from __future__ import annotations

import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")

from tandem_rt.gguf_index import read_index, read_tensor_index  # noqa: E402

Q = gguf.GGMLQuantizationType


def write_file(path, alignment=None, seed=0):
    """A GGUF file with metadata of every value kind and F32 / F16 / Q8_0 / Q4_1 tensors."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 7)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 700)
    w.add_int16("t.i16", -700)
    w.add_uint32("t.u32", 70000)
    w.add_int32("t.i32", -70000)
    w.add_float32("t.f32", 1.5)
    w.add_uint64("t.u64", 2 ** 40)
    w.add_int64("t.i64", -(2 ** 40))
    w.add_float64("t.f64", 2.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    w.add_array("t.strings", ["", "a", "ünïcode", "x" * 300] * 50)
    w.add_array("t.ints", list(range(1000)))
    w.add_array("t.nested", [[1, 2, 3], [4, 5]])
    w.add_token_list([f"<t{i}>" for i in range(500)])
    w.add_tensor("a.f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("b.f16", rng.standard_normal((7,)).astype(np.float16))
    for name, qt, shape in (("c.q8", Q.Q8_0, (16, 64)), ("d.q41", Q.Q4_1, (8, 96)), ("e.q8", Q.Q8_0, (2, 32))):
        data = gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), qt)
        w.add_tensor(name, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64, 256])
def test_index_equals_the_gguf_reader(tmp_path, alignment):
    path = write_file(tmp_path / "f.gguf", alignment)
    ref = gguf.GGUFReader(str(path))
    got = read_tensor_index(path)
    assert [t.name for t in got] == [t.name for t in ref.tensors] == ["a.f32", "b.f16", "c.q8", "d.q41", "e.q8"]
    for a, b in zip(got, ref.tensors):
        assert a.shape == tuple(int(v) for v in b.shape), a.name
        assert a.ggml_type == int(b.tensor_type), a.name
        assert a.offset == int(b.data_offset), a.name
        if alignment is not None:
            assert a.offset % alignment == 0
    raw = path.read_bytes()
    for a, b in zip(got, ref.tensors):   # the bytes at the offset are the tensor's
        assert raw[a.offset:a.offset + b.n_bytes] == b.data.tobytes(), a.name


def test_index_of_the_llama_fixture_equals_the_reader(tmp_path):
    from tiny_ecosystem_models import tiny_hf_model, write_llama_gguf

    ref_model = tiny_hf_model("llama", tie=False, vocab=96, hidden=64, layers=2, heads=4, kv_heads=2,
                              intermediate=96, seed=3)
    path = write_llama_gguf(ref_model, tmp_path / "tiny.gguf", quant={"blk.0.attn_q.weight": Q.Q4_1,
                                                                     "blk.1.ffn_down.weight": Q.Q8_0})
    ref = gguf.GGUFReader(str(path))
    got = read_tensor_index(path)
    assert [(t.name, t.shape, t.ggml_type, t.offset) for t in got] == \
        [(t.name, tuple(int(v) for v in t.shape), int(t.tensor_type), int(t.data_offset)) for t in ref.tensors]


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_tensor_index(tmp_path / "none.gguf")


def test_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ValueError, match=r"x\.gguf is not a readable GGUF file: magic"):
        read_tensor_index(p)


def test_big_endian_and_unknown_versions(tmp_path):
    good = write_file(tmp_path / "f.gguf").read_bytes()
    p = tmp_path / "be.gguf"
    p.write_bytes(good[:4] + struct.pack(">I", 3) + good[8:])
    with pytest.raises(ValueError, match="big-endian GGUF files are not supported"):
        read_tensor_index(p)
    p.write_bytes(good[:4] + struct.pack("<I", 1) + good[8:])
    with pytest.raises(ValueError, match="version 1 GGUF files are not supported"):
        read_tensor_index(p)


@pytest.mark.parametrize("keep", [30, 200, 2000, 6000])
def test_truncated_header(tmp_path, keep):
    good = write_file(tmp_path / "f.gguf").read_bytes()
    end_of_infos = min(t.offset for t in read_tensor_index(tmp_path / "f.gguf"))
    assert keep < end_of_infos
    p = tmp_path / "cut.gguf"
    p.write_bytes(good[:keep])
    with pytest.raises(ValueError, match=r"cut\.gguf"):
        read_tensor_index(p)


def test_tensor_past_the_end(tmp_path):
    path = write_file(tmp_path / "f.gguf")
    infos = read_tensor_index(path)
    p = tmp_path / "short.gguf"
    p.write_bytes(path.read_bytes()[:infos[-1].offset - 1])
    with pytest.raises(ValueError, match="'e.q8' starts at byte .* past the end of the file"):
        read_tensor_index(p)


def test_unknown_value_type(tmp_path):
    good = bytearray(write_file(tmp_path / "f.gguf").read_bytes())
    # the first metadata pair: key string (u64 length + bytes), then its u32 value type
    klen = struct.unpack_from("<Q", good, 24)[0]
    struct.pack_into("<I", good, 24 + 8 + klen, 99)
    p = tmp_path / "bad.gguf"
    p.write_bytes(bytes(good))
    with pytest.raises(ValueError, match="unknown metadata value type 99"):
        read_tensor_index(p)


def test_read_gguf_matrices_refuses_a_truncated_tensor(tmp_path):
    from tiny_ecosystem_models import tiny_hf_model, write_llama_gguf

    from tandem_rt.gguf import gguf_model_config
    from tandem_rt.quantized import read_gguf_matrices

    ref_model = tiny_hf_model("llama", tie=False, vocab=96, hidden=64, layers=1, heads=4, kv_heads=2,
                              intermediate=96, seed=3)
    path = write_llama_gguf(ref_model, tmp_path / "tiny.gguf", quant={"output.weight": Q.Q8_0})
    last = max(read_tensor_index(path), key=lambda t: t.offset)
    assert last.name == "output.weight"
    p = tmp_path / "cut.gguf"
    p.write_bytes(path.read_bytes()[:last.offset + 10])
    with pytest.raises(ValueError, match="'output.weight' .* runs past the end of the file"):
        read_gguf_matrices(p, gguf_model_config(path))   # the config of the intact file: only the index is read


def test_fields_equal_the_gguf_reader(tmp_path):
    """Scalars and strings decode to GGUFReader's contents, scalar arrays to its lists; string
    arrays are counted (their length is len(field.data)) but not decoded."""
    path = write_file(tmp_path / "f.gguf")
    ref = gguf.GGUFReader(str(path))
    index = read_index(path)
    assert list(index.fields) == [k for k in ref.fields if not k.startswith("GGUF.")]   # the reader's own header keys
    for key, field in index.fields.items():
        want = ref.fields[key]
        if key == "t.nested":   # GGUFReader lists a nested array's leaves; the index its 2 elements
            assert field.count == len(field.data) == 2
        else:
            assert len(field.data) == len(want.data), key
        if key in ("t.strings", "t.nested", "tokenizer.ggml.tokens"):
            with pytest.raises(ValueError, match="not decoded"):
                field.contents()
            continue
        got = field.contents()
        expect = want.contents()
        if isinstance(expect, float):
            assert got == pytest.approx(expect), key
        else:
            assert got == expect, key
    assert index.fields["t.str"].contents() == "héllo" and index.fields["t.ints"].contents() == list(range(1000))


def test_duplicate_tensor_names_are_refused(tmp_path):
    path = write_file(tmp_path / "f.gguf")
    raw = bytearray(path.read_bytes())
    # rename the second tensor ("b.f16") to the first's name ("a.f32"): same length
    i = raw.index(b"b.f16")
    raw[i:i + 5] = b"a.f32"
    p = tmp_path / "dup.gguf"
    p.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="tensor 'a.f32' appears twice"):
        read_index(p)


def test_chat_template_of_a_referenced_gguf(tmp_path):
    """``tandem_rt.chat.load_chat_template`` reads ``tokenizer.chat_template`` of the GGUF file a
    checkpoint references (through the index) when the checkpoint ships no template."""
    import json

    from tandem_rt.chat import load_chat_template

    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_token_list(["a", "b"])
    w.add_chat_template(template)
    w.add_tensor("x", np.zeros((2, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "tandem_config.json").write_text(json.dumps(
        {"primary_source": {"kind": "gguf", "path": str(tmp_path / "t.gguf"), "sha256": "0" * 64}}))
    assert load_chat_template(ckpt) == template
    (ckpt / "tandem_config.json").write_text(json.dumps(
        {"primary_source": {"kind": "gguf", "path": str(tmp_path / "missing.gguf"), "sha256": "0" * 64}}))
    assert load_chat_template(ckpt) is None
