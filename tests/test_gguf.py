"""formats.read_gguf, our own GGUF reader, against llama.cpp's gguf-py (a test-only dependency) as the oracle:
files written by gguf-py's GGUFWriter, weights quantised by gguf-py's own quantisers (F32, F16, BF16, Q8_0, Q4_0,
Q4_1), every metadata value type; and damaged files (cut anywhere, lying counts, types we do not read) as one
UserError naming the file. Loading a GGUF as a model (config, Q/K order, tokenizer) is the real-model issue's
next step; until then load_model says so in one line."""
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import common as C
import formats
import model as M

gguf = pytest.importorskip("gguf", reason="gguf-py is not installed (pip install -r requirements-test.txt)")
Q = gguf.GGMLQuantizationType
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]


def quantised(values, qtype):
    """gguf-py's bytes for values (rows, 32 k) in qtype, and its own dequantisation of them."""
    raw = gguf.quants.quantize(values, qtype)
    return raw, gguf.quants.dequantize(raw, qtype)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.sampled_from(TYPES), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**16), st.floats(1e-3, 50))
def test_dequantize_equals_gguf_py(qtype, rows, blocks, seed, scale):
    values = (np.random.default_rng(seed).standard_normal((rows, 32 * blocks)) * scale).astype(np.float32)
    raw, want = quantised(values, qtype)
    got = formats.dequantize(np.ascontiguousarray(raw).view(np.uint8).reshape(-1), int(qtype), values.size)
    np.testing.assert_array_equal(got.reshape(want.shape), want.astype(np.float32))


def test_dequantize_hand_computed_blocks():
    """One block of each quantised type built by hand from the format's definition."""
    d, m = np.float16(0.5).tobytes(), np.float16(-1.0).tobytes()
    q8 = np.arange(-16, 16, dtype=np.int8)
    assert formats.dequantize(np.frombuffer(d + q8.tobytes(), np.uint8), 8, 32).tolist() == (0.5 * q8).tolist()
    nibbles = bytes((lo | hi << 4) for lo, hi in zip(range(16), range(15, -1, -1)))  # low 0..15, high 15..0
    q = list(range(16)) + list(range(15, -1, -1))
    assert formats.dequantize(np.frombuffer(d + nibbles, np.uint8), 2, 32).tolist() == [0.5 * (v - 8) for v in q]
    assert formats.dequantize(np.frombuffer(d + m + nibbles, np.uint8), 3, 32).tolist() == [0.5 * v - 1 for v in q]


def write_file(path, tensors, metadata=True):
    """A GGUF written by gguf-py: tensors {name: (values, qtype)} and one key of every metadata type."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    if metadata:
        w.add_uint32("test.u32", 7)
        w.add_int32("test.i32", -7)
        w.add_uint64("test.u64", 2**40)
        w.add_float32("test.f32", 0.25)
        w.add_float64("test.f64", 1e-300)
        w.add_bool("test.bool", True)
        w.add_string("test.str", "héllo <|im_end|>")
        w.add_array("test.strs", ["a", "", "ü"])
        w.add_array("test.ints", [1, 2, 3])
        w.add_uint8("test.u8", 255)
        w.add_int16("test.i16", -300)
    for name, (values, qtype) in tensors.items():
        raw = gguf.quants.quantize(values, qtype)
        w.add_tensor(name, raw, raw_dtype=qtype)  # gguf-py derives the weights' shape from the bytes' shape
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    rng = np.random.default_rng(0)
    tensors = {f"t.{t.name}": (rng.standard_normal((3, 64)).astype(np.float32), t) for t in TYPES}
    tensors["t.vector"] = (rng.standard_normal(96).astype(np.float32), Q.F32)
    tensors["t.cube"] = (rng.standard_normal((2, 3, 32)).astype(np.float32), Q.Q8_0)
    return write_file(tmp_path_factory.mktemp("gguf") / "good.gguf", tensors), tensors


def test_reads_what_gguf_py_reads(good):
    path, written = good
    meta, tensors = formats.read_gguf(path)
    reader = gguf.GGUFReader(path)
    for field in reader.fields.values():  # every key gguf-py sees, with the same value
        if field.name.startswith("GGUF."):  # its pseudo-fields for the header's counts
            continue
        want = field.contents()
        assert meta[field.name] == pytest.approx(want) if isinstance(want, float) else meta[field.name] == want
    assert meta["general.architecture"] == "llama" and meta["test.strs"] == ["a", "", "ü"]
    assert meta["test.f64"] == 1e-300 and meta["test.u64"] == 2**40 and meta["test.bool"] is True
    assert set(tensors) == set(written)
    for t in reader.tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(written[t.name][0].shape)
        np.testing.assert_array_equal(tensors[t.name], want)
        assert tensors[t.name].dtype == np.float32


def assert_user_error(path, *words):
    with pytest.raises(M.UserError) as e:
        formats.read_gguf(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg and all(w in msg for w in words), msg


def test_cut_anywhere_is_one_line(good, tmp_path):
    path, _ = good
    data = open(path, "rb").read()
    # the last 64 bytes hold tensor data (the last tensor, Q8_0, is 204 bytes; the padding after it under 32)
    for i, cut in enumerate(sorted({0, 3, 4, 8, 15, 24, 40, 100, 300, len(data) // 2, len(data) - 64})):
        p = tmp_path / f"cut{i}.gguf"
        p.write_bytes(data[:cut])
        assert_user_error(p)


def test_lying_counts_and_bad_headers_are_one_line(good, tmp_path):
    data = bytearray(open(good[0], "rb").read())

    def patched(name, offset, fmt, value):
        d = bytearray(data)
        struct.pack_into(fmt, d, offset, value)
        p = tmp_path / name
        p.write_bytes(bytes(d))
        return p

    assert_user_error(patched("magic.gguf", 0, "<4s", b"GGML"), "bad magic")
    assert_user_error(patched("version.gguf", 4, "<I", 99), "version 99")
    assert_user_error(patched("tensors.gguf", 8, "<Q", 2**40), "tensor count")
    assert_user_error(patched("kv.gguf", 16, "<Q", 2**62), "metadata count")
    first_key_length = 24
    assert_user_error(patched("keylen.gguf", first_key_length, "<Q", 2**30), "beyond any real file")


def test_unsupported_types_are_refused_by_name(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), arch="llama")
    w.add_tensor("blk.0.ffn_down.weight", np.zeros((1, 144), dtype=np.uint8), raw_dtype=Q.Q4_K)  # 256 weights
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_user_error(tmp_path / "k.gguf", "blk.0.ffn_down.weight is Q4_K", "Q8_0")


def test_load_model_names_gguf_in_one_line(good):
    with pytest.raises(M.UserError, match="a GGUF file"):
        C.load_model(good[0])
