"""gguf_file.write_gguf, our GGUF writer: its quantisers (Q8_0, Q4_0, Q4_1) against their error bounds and, byte for
byte, against llama.cpp's gguf-py (which reproduces ggml's reference quantisers); written files read back by our
reader and by gguf-py's GGUFReader alike; tiny Llama, Qwen2 and GPT-2 models written and loaded back with the
logits of the weights they carry; llama.cpp's Q/K row order against ggml's RoPE; the tokenizer in the metadata.
llama.cpp itself runs these files in tests/test_llama_cpp.py (slow, bench only).

    python -m pytest -q tests/test_gguf_write.py
"""
import base64
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import common as C
import formats
import gguf_file as G
import model as M

KINDS = ["f32", "f16", "q8_0", "q4_0", "q4_1"]
BLOCK_TYPES = {"q8_0": 8, "q4_0": 2, "q4_1": 3}
F16_REL = 2.0 ** -11  # float16's relative rounding error (10 stored mantissa bits, round to nearest)


def f16_error(d):
    """How far float16 rounding moves d at most: half a unit in the last place, relative for normal numbers and
    2^-25 for the subnormals below 2^-14."""
    return np.maximum(np.abs(d) * F16_REL, 2.0 ** -25)


def blocks(seed, n_blocks, scale, offset=0.0):
    """(n_blocks * 32,) float32 values: normal, times scale, plus offset."""
    return (np.random.default_rng(seed).standard_normal(32 * n_blocks) * scale + offset).astype(np.float32)


def round_trip(x, kind):
    return G.dequantize(G.QUANTIZERS[BLOCK_TYPES[kind]](x), BLOCK_TYPES[kind], x.size)


# ----------------------------------------------------------------------------- the quantisers


values = st.tuples(st.integers(0, 2**16), st.integers(1, 4), st.floats(1e-3, 100.0), st.floats(-3.0, 3.0))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(values)
def test_q8_0_error_is_half_a_step(v):
    """|w - dequant(quant(w))| <= d / 2 per block of 32, d = max|w| / 127, plus what the float16 scale rounds away
    (at most 127 times d's own rounding)."""
    seed, n, scale, offset = v
    x = blocks(seed, n, scale, offset * scale)
    err = np.abs(round_trip(x, "q8_0") - x).reshape(-1, 32)
    d = np.abs(x).reshape(-1, 32).max(1) / 127
    assert (err.max(1) <= (d / 2 + 127 * f16_error(d)) * (1 + 1e-6)).all()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(values)
def test_q4_0_error_is_half_a_step_but_at_the_far_end(v):
    """Q4_0's step is d = |m| / 8, m the block's largest-magnitude weight, which comes back exactly (up to the
    float16 scale). Weights up to 7.5 steps on the other side of zero are within half a step; beyond, q would be 16
    and is clamped to 15, so -m comes back a whole step short."""
    seed, n, scale, offset = v
    x = blocks(seed, n, scale, offset * scale).reshape(-1, 32)
    got = round_trip(x.reshape(-1), "q4_0").reshape(-1, 32)
    m = np.take_along_axis(x, np.abs(x).argmax(1)[:, None], 1)  # (n_blocks, 1)
    d = np.abs(m) / 8
    scale_error = 8 * f16_error(d) + np.abs(x).max() * 1e-6  # |d - float16(d)| times |q - 8| <= 8
    err = np.abs(got - x)
    assert (err <= d + scale_error).all()
    inside = -x / m * 8 < 7.5  # x / d_signed < 7.5: not clamped
    assert (err <= d / 2 + scale_error)[inside].all()
    assert (np.abs(np.take_along_axis(got, np.abs(x).argmax(1)[:, None], 1) - m) <= 8 * f16_error(d)).all()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(values)
def test_q4_1_error_is_half_a_step(v):
    """Q4_1's step is d = (max - min) / 15 from the block's minimum: |error| <= d / 2, plus the float16 rounding of
    d (times 15) and of the minimum."""
    seed, n, scale, offset = v
    x = blocks(seed, n, scale, offset * scale).reshape(-1, 32)
    err = np.abs(round_trip(x.reshape(-1), "q4_1").reshape(-1, 32) - x)
    lo, hi = x.min(1), x.max(1)
    d = (hi - lo) / 15
    bound = d / 2 + 15 * f16_error(d) + f16_error(lo) + np.abs(x).max(1) * 1e-6
    assert (err.max(1) <= bound).all()


def test_quantisers_by_hand():
    """One block each, its bytes worked out from the format: the scales, C's rounding (halves away from zero,
    truncation after + 8.5 / + 0.5), the nibble order (low nibble weight j, high weight j + 16)."""
    x = np.arange(32, dtype=np.float32) - 16  # -16 .. 15
    q8 = G.quantize_q8_0(x)
    assert q8[:2].view("<f2")[0] == np.float16(16 / 127)
    assert q8[2:].view(np.int8).tolist() == [int(math.copysign(math.floor(abs(v) * 127 / 16 + 0.5), v)) for v in x]
    q4 = G.quantize_q4_0(x)  # m = -16, d = 2: q = trunc(x / 2 + 8.5)
    assert q4[:2].view("<f2")[0] == 2.0
    q = [min(15, int(v / 2 + 8.5)) for v in x]
    assert q4[2:].tolist() == [q[j] | q[j + 16] << 4 for j in range(16)]
    q41 = G.quantize_q4_1(x)  # d = 31 / 15, m = -16
    assert q41[:4].view("<f2").tolist() == [np.float16(np.float32(31) / 15), -16.0]
    assert G.quantize_q8_0(np.zeros(32, np.float32)).tolist() == [0] * 34  # a zero block: d = 0, every q = 0
    halves = np.array([0.5, 1.5, 2.5, -0.5, -2.5] + [0] * 26 + [127], np.float32)  # d = 1: roundf, not banker's
    assert G.quantize_q8_0(halves)[2:7].view(np.int8).tolist() == [1, 2, 3, -1, -3]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.sampled_from(sorted(BLOCK_TYPES)), values)
def test_quantisers_equal_gguf_py_bytes(kind, v):
    """The same bytes as gguf-py's numpy quantisers, llama.cpp's own Python twin of ggml-quants.c."""
    gguf = pytest.importorskip("gguf")
    seed, n, scale, offset = v
    x = blocks(seed, n, scale, offset * scale).reshape(-1, 32)
    want = gguf.quants.quantize(x, gguf.GGMLQuantizationType(BLOCK_TYPES[kind]))
    assert G.QUANTIZERS[BLOCK_TYPES[kind]](x.reshape(-1)).tobytes() == np.ascontiguousarray(want).tobytes()


# ----------------------------------------------------------------------------- Q/K rows and RoPE


def ggml_rope_pairs(x, positions, theta):
    """ggml's RoPE for the llama architecture (mode 0, "norm"): rows (..., T, hd) rotated by adjacent pairs
    (2i, 2i + 1), angle pos * theta^(-2i / hd)."""
    hd = x.shape[-1]
    angle = positions[:, None].double() * theta ** (-torch.arange(0, hd, 2).double() / hd)  # (T, hd/2)
    a, b = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.stack([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], dim=-1)
    return out.flatten(-2)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 4), st.sampled_from([2, 4, 8, 16]), st.integers(1, 5), st.integers(0, 2**16))
def test_qk_permutation(n_heads, head_dim, d_in, seed):
    """permute_qk is llama.cpp's converter (LlamaModel.permute), unpermute_qk undoes it, and under it ggml's
    adjacent-pair RoPE of the permuted rows equals our rotate-half RoPE of ours: q.k scores agree."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_heads * head_dim, d_in, generator=g).numpy()
    theirs = w.reshape(n_heads, 2, head_dim // 2, d_in).swapaxes(1, 2).reshape(w.shape)  # convert_hf_to_gguf.py
    np.testing.assert_array_equal(G.permute_qk(w, n_heads), theirs)
    np.testing.assert_array_equal(G.unpermute_qk(G.permute_qk(w, n_heads), n_heads), w)
    np.testing.assert_array_equal(G.unpermute_qk(G.permute_qk(w[:, 0], n_heads), n_heads), w[:, 0])  # a bias
    x = torch.randn(3, d_in, generator=g)
    pos = torch.arange(3)
    ours = (x @ torch.from_numpy(w).T).view(3, n_heads, head_dim).transpose(0, 1)  # (nh, T, hd)
    cos, sin = M.rope_cos_sin(pos[None], M.rope_inv_freq(head_dim, 10000.0))
    ours = M.apply_rope(ours.double(), cos[0].double(), sin[0].double())
    pairs = (x @ torch.from_numpy(G.permute_qk(w, n_heads)).T).view(3, n_heads, head_dim).transpose(0, 1)
    pairs = ggml_rope_pairs(pairs, pos, 10000.0)
    # the same vectors, their components in another order: every dot product (attention score) is the same
    torch.testing.assert_close(ours @ ours.transpose(-1, -2), pairs @ pairs.transpose(-1, -2), rtol=1e-5, atol=1e-5)


def test_llama3_rope_freqs_are_llama_cpp_converters():
    """rope_freqs: the divisors llama.cpp's converter computes for Llama-3 RoPE scaling (LlamaModel's
    generate_extra_tensors, written out here), and base / divisor is our scaled frequency."""
    cfg = M.Config(vocab_size=260, n_layer=1, d_model=256, n_head=2, n_kv_head=2, d_ff=64, rope_theta=500000.0,
                   rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                   rope_original_max_len=8192)
    freqs = 1.0 / (500000.0 ** (np.arange(0, 128, 2, dtype=np.float32) / 128))
    want = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            want.append(1.0)
        elif wavelen > 8192 / 1:
            want.append(8.0)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            want.append(1 / ((1 - smooth) / 8 + smooth))
    got = G.rope_freq_factors(cfg)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    base = M.rope_inv_freq(128, 500000.0)
    torch.testing.assert_close(base / torch.from_numpy(got), M.llama3_inv_freq(base, 8.0, 1.0, 4.0, 8192))


# ----------------------------------------------------------------------------- files


def tiny(preset, enc, seed=0, **overrides):
    torch.manual_seed(seed)
    shape = dict(n_layer=2, d_model=64, d_ff=128, n_head=4, max_seq_len=64)
    shape.update({"n_kv_head": 4 if preset == "tiny-gpt2" else 2}, **overrides)
    model = M.build_model(preset, enc, **shape).eval()
    for p in model.parameters():  # past the init's scale, so a wrong row or sign shows in the logits
        torch.nn.init.normal_(p, std=0.2)
    return model


def quantised_twin(model, kind):
    """The model with every weight matrix (linears and the token embedding; not GPT-2's position table) replaced by
    its dequantised `kind` bytes: the weights a file of that kind carries. Blocks run along rows, so fusing q, k, v
    or permuting Q/K rows commutes with this."""
    twin = M.Transformer(model.cfg).eval()
    sd = {}
    for k, v in model.state_dict().items():
        if v.ndim == 2 and k != "pos_embed.weight" and kind != "f32":
            x = v.numpy().reshape(-1)
            v = torch.from_numpy(x.astype(np.float16).astype(np.float32) if kind == "f16" else round_trip(x, kind))
        sd[k] = v.reshape(model.state_dict()[k].shape)
    twin.load_state_dict(sd)
    return twin


MODELS = {"llama": ("tiny", {}), "llama-untied-head_dim": ("tiny", dict(tie_embeddings=False, head_dim=32)),
          "qwen2": ("tiny", dict(qkv_bias=True)), "gpt2": ("tiny-gpt2", {}),
          "gpt2-untied": ("tiny-gpt2", dict(tie_embeddings=False))}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{(model name, kind): (path, model)} for every MODELS entry in f32, q8_0 and q4_0 (and the others for llama)."""
    out, enc = tmp_path_factory.mktemp("gguf_write"), C.get_tokenizer("byte")
    files = {}
    for name, (preset, overrides) in MODELS.items():
        model = tiny(preset, enc, **overrides)
        for kind in KINDS if name == "llama" else ["f32", "q8_0", "q4_0"]:
            path = str(out / f"{name}.{kind}.gguf")
            sd = model.state_dict()
            if model.cfg.tie_embeddings and name == "gpt2":
                sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}  # tied: lm_head may be left out
            G.write_gguf(path, sd, model.cfg, enc, kind)
            files[name, kind] = path, model
    return files


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kind", ["f32", "q8_0", "q4_0"])
def test_written_model_loads_back_with_its_logits(written, name, kind):
    """load_model on a written file: the same config, and the logits of the weights the file carries (f32: the
    model's own, bit for bit)."""
    path, model = written[name, kind]
    loaded, enc, ckpt = C.load_model(path)
    assert loaded.cfg == model.cfg and ckpt["tokenizer"] == path
    ids = torch.tensor([enc.encode("<|im_start|>user\nhello, world 123<|im_end|>\n", allowed_special="all")])
    with torch.no_grad():
        got = loaded.eval()(ids)
        if kind == "f32":
            assert torch.equal(got, model(ids))
        else:
            torch.testing.assert_close(got, quantised_twin(model, kind)(ids), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(got, model(ids), atol=1e-4)  # the quantisation did change the weights


@pytest.mark.parametrize("kind", KINDS)
def test_written_file_reads_the_same_in_gguf_py(written, kind):
    """Our reader and gguf-py's GGUFReader on one written file: the same metadata, tensor types and dequantised
    tensors; the types are llama.cpp's (1-D F32, matrices `kind`), and the values those of our weights in llama.cpp's
    names and row order."""
    gguf = pytest.importorskip("gguf")
    path, model = written["llama", kind]
    meta, tensors = G.read_gguf(path)
    reader = gguf.GGUFReader(path)
    for field in reader.fields.values():
        if not field.name.startswith("GGUF."):
            want = field.contents()
            assert meta[field.name] == (pytest.approx(want) if isinstance(want, float) else want), field.name
    assert {t.name for t in reader.tensors} == set(tensors)
    expected = G.gguf_tensors(model.state_dict(), model.cfg)
    assert set(expected) == set(tensors) and "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    for t in reader.tensors:
        want = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(tensors[t.name].shape)
        np.testing.assert_array_equal(tensors[t.name], want)
        e = expected[t.name]
        if e.ndim == 1 or kind == "f32":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(tensors[t.name], e)
        else:
            assert t.tensor_type.name == kind.upper()
            x = e.reshape(-1)
            deq = x.astype(np.float16).astype(np.float32) if kind == "f16" else round_trip(x, kind)
            np.testing.assert_array_equal(tensors[t.name], deq.reshape(e.shape))
    cfg = model.cfg
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == cfg.n_layer
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (cfg.n_head, cfg.n_kv_head)
    assert meta["llama.rope.dimension_count"] == cfg.head_size and meta["llama.context_length"] == cfg.max_seq_len
    assert meta["general.file_type"] == G.GGUF_KINDS[kind][1]


def test_metadata_of_each_architecture(written):
    """gpt2: fused attn_qkv with its bias, position_embd in F32 even in Q4_0, LayerNorm's epsilon key; qwen2: q/k/v
    biases, rows not permuted (its RoPE rotates halves, as ours); head_dim as key_length / value_length."""
    meta, tensors = G.read_gguf(written["gpt2", "q4_0"][0])
    cfg = written["gpt2", "q4_0"][1].cfg
    assert meta["general.architecture"] == "gpt2" and "gpt2.attention.layer_norm_epsilon" in meta
    assert tensors["blk.0.attn_qkv.weight"].shape == (3 * cfg.d_model, cfg.d_model)
    assert tensors["blk.1.attn_qkv.bias"].shape == (3 * cfg.d_model,) and "blk.0.ffn_gate.weight" not in tensors
    assert tensors["position_embd.weight"].shape == (cfg.max_seq_len, cfg.d_model)
    pos = written["gpt2", "q4_0"][1].state_dict()["pos_embed.weight"].numpy()
    np.testing.assert_array_equal(tensors["position_embd.weight"], pos)  # kept F32
    meta, tensors = G.read_gguf(written["qwen2", "f32"][0])
    q = written["qwen2", "f32"][1].state_dict()["blocks.0.attn.q.weight"].numpy()
    assert meta["general.architecture"] == "qwen2" and "blk.0.attn_k.bias" in tensors
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"], q)
    meta, tensors = G.read_gguf(written["llama-untied-head_dim", "f32"][0])
    assert meta["llama.attention.key_length"] == meta["llama.attention.value_length"] == 32
    assert tensors["blk.0.attn_q.weight"].shape == (4 * 32, 64) and "output.weight" in tensors


def test_byte_tokenizer_metadata(written):
    """The byte tokenizer: 256 byte tokens in GPT-2's printable alphabet, the specials as control tokens, no
    merges, and the ids of its template's tokens; read back, the same Encoding."""
    path, model = written["llama", "f32"]
    meta, _ = G.read_gguf(path, tensors=False)
    enc = C.get_tokenizer("byte")
    assert len(meta["tokenizer.ggml.tokens"]) == model.cfg.vocab_size == 260 and meta["tokenizer.ggml.merges"] == []
    assert meta["tokenizer.ggml.tokens"][:3] == ["Ā", "ā", "Ă"] and meta["tokenizer.ggml.tokens"][65] == "A"
    assert meta["tokenizer.ggml.tokens"][256:] == C.SPECIAL_TOKENS and meta["tokenizer.ggml.token_type"][256:] == [3] * 4
    assert meta["tokenizer.ggml.eos_token_id"] == C.end_id(enc) and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.padding_token_id"] == C.special_id(enc, "<|pad|>")
    assert meta["tokenizer.chat_template"] == formats.TEMPLATE_JINJA["chatml"]
    back = C.get_tokenizer(path)
    text = "<|im_start|>user\nhé 12 <|im_end|> 日本\n"
    assert back.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    assert back.chat_template == "chatml" and back.n_vocab == enc.n_vocab


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    """A small real BPE (GPT-2's first 1000 ranks as a .tiktoken file: the cl100k split, llama.cpp's llama-bpe) in a
    model with 40 more rows than ids, written as Q8_0."""
    out = tmp_path_factory.mktemp("bpe")
    ranks = sorted(C.read_ranks(f"{C.HERE}/data/gpt2.tiktoken").items(), key=lambda kv: kv[1])[:1000]
    with open(out / "small.tiktoken", "w") as f:
        f.writelines(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in ranks)
    enc = C.get_tokenizer(str(out / "small.tiktoken"))
    model = tiny("tiny", enc, n_layer=1, vocab_size=enc.n_vocab + 40)
    G.write_gguf(str(out / "bpe.gguf"), model.state_dict(), model.cfg, enc, "q8_0")
    return str(out / "bpe.gguf"), enc, model


def test_bpe_tokenizer_metadata(bpe_file):
    """Merges (every split of a token into two, in the merged token's id order), the llama-bpe pre-tokenizer, rows
    beyond the tokenizer as unused placeholders that reading back leaves out."""
    path, enc, model = bpe_file
    meta, _ = G.read_gguf(path, tensors=False)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert meta["tokenizer.ggml.pre"] == "llama-bpe" and len(tokens) == model.cfg.vocab_size == enc.n_vocab + 40
    assert tokens[-1] == f"[PAD{model.cfg.vocab_size - 1}]" and types[enc.n_vocab:] == [5] * 40
    assert tokens[enc.encode_single_token(b" t")] == "Ġt" and "Ġ t" in meta["tokenizer.ggml.merges"]
    loaded, back, _ = C.load_model(path)
    assert back.n_vocab == enc.n_vocab and loaded.cfg == model.cfg


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
       | st.text(alphabet=" \t\nthe quick 0123'sé", max_size=40)
       | st.lists(st.sampled_from(["<|im_start|>", "<|im_end|>", " the", "  ", "\n", "123", "'s"]), max_size=8)
       .map("".join))
def test_bpe_tokenizer_reads_back_the_same(bpe_tokenizers, text):
    enc, back = bpe_tokenizers
    assert back.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")


@pytest.fixture(scope="module")
def bpe_tokenizers(bpe_file):
    return bpe_file[1], C.get_tokenizer(bpe_file[0])


def test_refusals_are_one_line(tmp_path):
    enc = C.get_tokenizer("byte")
    model = tiny("tiny", enc, n_layer=1)
    sd, cfg = model.state_dict(), model.cfg
    cases = [(dict(kind="q5_k"), "choose from f32, f16"),
             (dict(cfg=M.Config(**{**cfg.__dict__, "head": "scalar"})), "scalar head"),
             (dict(sd={**sd, "blocks.0.mlp.up.weight": sd["blocks.0.mlp.up.weight"] * float("inf")}),
              "blk.0.ffn_up.weight holds non-finite"),
             (dict(sd={k: v for k, v in sd.items() if k != "blocks.0.attn.v.weight"}), "blocks.0.attn.v.weight"),
             (dict(sd={**sd, "norm.weight": sd["norm.weight"].to(torch.int64)}), "norm.weight is not a float"),
             (dict(sd={**sd, "embed.weight": sd["embed.weight"] * 1e5}, kind="f16"), "write --gguf-type f32")]
    for change, message in cases:
        args = {**dict(sd=sd, cfg=cfg, enc=enc, kind="q4_0"), **change}
        with pytest.raises(M.UserError) as e:
            G.write_gguf(str(tmp_path / "x.gguf"), args["sd"], args["cfg"], args["enc"], args["kind"])
        assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "x.gguf").exists()
