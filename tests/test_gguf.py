"""gguf_file.read_gguf, our own GGUF reader, against llama.cpp's gguf-py (a test-only dependency) as the oracle:
files written by gguf-py's GGUFWriter, weights quantised by gguf-py's own quantisers (F32, F16, BF16, Q8_0, Q4_0,
Q4_1) and the k-quants Q4_K / Q5_K / Q6_K against gguf-py's dequantisation, every metadata value type; and damaged
files (cut anywhere, lying counts, types we do not read) as one UserError naming the file. Then a GGUF as a model:
config from the metadata, llama.cpp's Q/K row order undone, the logits against transformers' own GGUF load, and
the tokenizer from the metadata against transformers' GGUF tokenizer."""
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import common as C
import formats
import gguf_file
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
    got = gguf_file.dequantize(np.ascontiguousarray(raw).view(np.uint8).reshape(-1), int(qtype), values.size)
    np.testing.assert_array_equal(got.reshape(want.shape), want.astype(np.float32))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.sampled_from([Q.Q4_K, Q.Q5_K, Q.Q6_K]), st.integers(1, 3), st.integers(0, 2**16))
def test_k_quants_equal_gguf_py(qtype, n_blocks, seed):
    """Q4_K / Q5_K / Q6_K super-blocks of random bytes (their float16 scales set to finite values) dequantise as
    gguf-py dequantises them."""
    rng = np.random.default_rng(seed)
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    scales = rng.uniform(-2, 2, (n_blocks, 2)).astype(np.float16).view(np.uint8)  # (n, 4): d and dmin / d
    if qtype == Q.Q6_K:
        raw[:, -2:] = scales[:, :2]
    else:
        raw[:, :4] = scales
    want = gguf.quants.dequantize(raw, qtype).reshape(-1)
    got = gguf_file.dequantize(raw.reshape(-1), int(qtype), n_blocks * 256)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_dequantize_hand_computed_blocks():
    """One block of each quantised type built by hand from the format's definition."""
    d, m = np.float16(0.5).tobytes(), np.float16(-1.0).tobytes()
    q8 = np.arange(-16, 16, dtype=np.int8)
    assert gguf_file.dequantize(np.frombuffer(d + q8.tobytes(), np.uint8), 8, 32).tolist() == (0.5 * q8).tolist()
    nibbles = bytes((lo | hi << 4) for lo, hi in zip(range(16), range(15, -1, -1)))  # low 0..15, high 15..0
    q = list(range(16)) + list(range(15, -1, -1))
    assert gguf_file.dequantize(np.frombuffer(d + nibbles, np.uint8), 2, 32).tolist() == [0.5 * (v - 8) for v in q]
    assert gguf_file.dequantize(np.frombuffer(d + m + nibbles, np.uint8), 3, 32).tolist() == [0.5 * v - 1 for v in q]


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
    meta, tensors = gguf_file.read_gguf(path)
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
        gguf_file.read_gguf(path)
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
    w.add_tensor("blk.0.ffn_down.weight", np.zeros((1, 84), dtype=np.uint8), raw_dtype=Q.Q2_K)  # 256 weights
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_user_error(tmp_path / "k.gguf", "blk.0.ffn_down.weight is Q2_K", "Q8_0")


def test_a_gguf_without_a_model_is_one_line(good):
    with pytest.raises(M.UserError, match="good.gguf: GGUF has no token_embd.weight"):
        C.load_model(good[0])


# ----------------------------------------------------------------------------- a GGUF as a model


def llama_cpp_permute(w, n_heads):
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute): each head's rows from halves to pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gpt2_gguf_vocab():
    """GPT-2's vocabulary (data/gpt2.tiktoken) as llama.cpp stores a byte-level BPE tokenizer: tokens in GPT-2's
    printable-byte alphabet, their types, and the merge list (each token's last merge, found by running BPE on its
    bytes with only the tokens ranked before it)."""
    enc = C.get_tokenizer("gpt2")
    ranks = C.read_ranks(f"{C.HERE}/data/gpt2.tiktoken")
    to_char = formats._byte_encoder()

    def text(bs):
        return "".join(to_char[b] for b in bs)

    def last_merge(token, rank):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(parts[i] + parts[i + 1], 1 << 30), i) for i in range(len(parts) - 1)]
            r, i = min(pairs)
            assert r < rank
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    merges = [" ".join(text(p) for p in last_merge(tok, r)) for tok, r in by_rank if len(tok) > 1]
    tokens = [text(tok) for tok, _ in by_rank] + ["<|endoftext|>"]
    types = [1] * len(by_rank) + [3]
    assert len(tokens) == 50257 and enc.encode_single_token("<|endoftext|>") == 50256
    return tokens, types, merges


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny random Llama with GPT-2's vocabulary written as llama.cpp writes a GGUF (F32 and Q8_0 tensors, Q/K
    rows permuted, the tokenizer in the metadata), and the model it came from."""
    tmp = tmp_path_factory.mktemp("tiny_gguf")
    enc = C.get_tokenizer("gpt2")
    M.torch.manual_seed(0)
    model = M.build_model("tiny", enc, vocab_size=50257, n_layer=2, d_model=64, d_ff=128, n_head=4, n_kv_head=2,
                          max_seq_len=128, tie_embeddings=False).eval()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    tokens, types, merges = gpt2_gguf_vocab()
    w = gguf.GGUFWriter(str(tmp / "tiny.gguf"), arch="llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(model.cfg.rope_theta)
    w.add_layer_norm_rms_eps(model.cfg.norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(50256)
    names = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    ours = {v: k for k, v in gguf_file.GGUF_NAMES.items()}
    for name, t in sd.items():
        if name.startswith("blocks."):
            _, i, *rest = name.split(".")
            *module, suffix = rest
            gname = f"blk.{i}.{ours['.'.join(module)]}.{suffix}"
            if module == ["attn", "q"]:
                t = llama_cpp_permute(t, 4)
            elif module == ["attn", "k"]:
                t = llama_cpp_permute(t, 2)
        else:
            gname = names[name]
        qtype = Q.Q8_0 if t.ndim == 2 and name != "embed.weight" else Q.F32
        w.add_tensor(gname, gguf.quants.quantize(np.ascontiguousarray(t), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(tmp / "tiny.gguf"), model


def test_gguf_loads_as_the_model_it_was_written_from(tiny_gguf):
    """load_model(x.gguf): the config from the metadata, llama.cpp's Q/K order undone, Q8_0 dequantised: the
    logits equal those of the original weights with the Q8_0 matrices replaced by their dequantisation."""
    path, original = tiny_gguf
    model, enc, ckpt = C.load_model(path)
    assert (model.cfg.n_layer, model.cfg.n_head, model.cfg.n_kv_head, model.cfg.d_model) == (2, 4, 2, 64)
    assert ckpt["lineage"] == ["gguf:tiny.gguf"] and enc.name == path and not model.cfg.tie_embeddings
    assert model.cfg.vocab_size == 50257 + 3  # GPT-2 has <|endoftext|>; <|im_start|>, <|im_end|>, <|pad|> are new
    want = {}
    for k, v in original.state_dict().items():
        t = v.numpy()
        if t.ndim == 2 and k != "embed.weight":
            t = gguf.quants.dequantize(gguf.quants.quantize(t, Q.Q8_0), Q.Q8_0)
        want[k] = M.torch.from_numpy(np.ascontiguousarray(t))
    reference = M.Transformer(original.cfg)
    reference.load_state_dict(want)
    ids = M.torch.tensor([enc.encode_ordinary("The quick brown fox jumps over the lazy dog.")])
    with M.torch.no_grad():
        got, expected = model.eval()(ids)[..., :50257], reference.eval()(ids)
    M.torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gguf_logits_equal_transformers_gguf_load(tiny_gguf):
    """transformers' own GGUF loader (its dequantisation and Q/K un-permutation) on the same file: equal logits."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers reads GGUF only with accelerate (requirements-test.txt)")
    path = tiny_gguf[0]
    folder, name = path.rsplit("/", 1)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    model, enc, _ = C.load_model(path)
    ids = M.torch.tensor([enc.encode_ordinary("The quick brown fox jumps over the lazy dog, 12 times.")])
    with M.torch.no_grad():
        M.torch.testing.assert_close(model.eval()(ids)[..., :50257], theirs(ids).logits, rtol=1e-4, atol=1e-4)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
       | st.text(alphabet=" \t\n0123456789abc'sé日", max_size=40)
       | st.lists(st.sampled_from(["<|endoftext|>", "<|im_start|>", " ", "  ", "\n", "12", "'s", "a"]), max_size=8)
       .map("".join))
def test_gguf_tokenizer_equals_transformers(gguf_tokenizers, text):
    """The tokenizer read from the GGUF metadata gives the ids transformers' GGUF tokenizer gives, on random text
    (any unicode, whitespace runs, digits, text that spells special tokens, which stays text)."""
    ours, theirs = gguf_tokenizers
    assert ours.encode_ordinary(text) == theirs.encode(text, add_special_tokens=False, split_special_tokens=True)


@pytest.fixture(scope="module")
def gguf_tokenizers(tiny_gguf):
    transformers = pytest.importorskip("transformers")
    path = tiny_gguf[0]
    folder, name = path.rsplit("/", 1)
    return C.get_tokenizer(path), transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_gguf_tokenizers_we_do_not_read_are_one_line(tmp_path):
    for model_name, pre, words in [("llama", "default", "SentencePiece"), ("gpt2", "deepseek-coder", "deepseek-coder")]:
        w = gguf.GGUFWriter(str(tmp_path / f"{pre}.gguf"), arch="llama")
        w.add_tokenizer_model(model_name)
        w.add_tokenizer_pre(pre)
        w.add_token_list(["a", "b"])
        w.add_token_types([1, 1])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(M.UserError, match=words):
            C.get_tokenizer(str(tmp_path / f"{pre}.gguf"))
