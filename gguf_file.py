"""
gguf_file.py: llama.cpp's single-file format in, read with numpy and struct. Imported lazily (through
common.load_checkpoint and formats.file_vocab) when a .gguf file is met.

  `read_gguf` -> metadata and dequantised tensors (F32, F16, BF16, Q8_0, Q4_0, Q4_1, and the k-quants Q4_K, Q5_K,
  Q6_K; any other type is refused by name); `load_gguf` -> our checkpoint (llama / qwen2 / gpt2 architectures,
  llama.cpp's Q/K row order undone); `gguf_vocab` -> the file's byte-level BPE tokenizer and chat template
  (SentencePiece vocabularies are refused). Every count, offset and size in the file is bounds-checked before it is
  used.

  `write_gguf` -> a GGUF v3 file llama.cpp runs: our weights in llama.cpp's names and layouts (arch llama, qwen2 when
  qkv_bias, gpt2 with its fused attn_qkv), the 2-D weights as F32, F16, Q8_0, Q4_0 or Q4_1 (the quantisers below
  give the bytes of ggml's reference quantisers), the tokenizer and chat template as llama.cpp's metadata.
  tests/test_gguf_write.py reads the files back; tests/test_llama_cpp.py (slow) runs them in llama.cpp.
"""

import os
import struct
from dataclasses import asdict

import numpy as np
import torch

from common import (CL100K_PATTERN, GPT2_PATTERN, SIZE_LIMITS, UserError, _check_size, _layer_ids, _show,
                    _tokenizer_of, atomic_write, config_from_dict, end_id, special_id)
from formats import (SMOLLM_PATTERN, TEMPLATE_JINJA, _bos_token, _byte_encoder, add_special_rows, bpe_ranks,
                     tokenizer_json)
from model import llama3_inv_freq, rope_inv_freq


# -----------------------------------------------------------------------------
# The format: a header (magic b"GGUF", version, tensor and metadata counts), typed key-value metadata, tensor infos
# (name, dims innermost first, type, offset), then the tensor data, aligned to general.alignment (32). Quantised
# types are blocks of 32 (or 256, the k-quants) weights sharing a scale.

GGUF_VALUE = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
# ggml type id -> (name, weights per block, bytes per block); other types are refused by name
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
              8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210)}
GGML_NAMES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
              18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
              26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}
GGUF_MAX_COUNT = 1 << 24  # tensors, metadata keys or array items: far above any real file; beyond it, a lying header


def dequantize(raw, type_id, n):
    """n weights of ggml type type_id from their bytes (a numpy uint8 array) -> float32 (n,).
      F32, F16, BF16  the values themselves
      Q8_0   blocks of 32: a float16 scale d, 32 int8 q;              w = d q
      Q4_0   blocks of 32: d, 16 bytes of two 4-bit q (low nibbles are weights 0-15, high nibbles 16-31);
             w = d (q - 8)
      Q4_1   blocks of 32: d, a float16 minimum m, the same nibbles;  w = d q + m
      Q4_K, Q5_K, Q6_K  "k-quants", super-blocks of 256: see _dequantize_k"""
    name = GGML_TYPES[type_id][0]
    if name == "F32":
        return raw.view("<f4").astype(np.float32)
    if name == "F16":
        return raw.view("<f2").astype(np.float32)
    if name == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    _, per_block, block_bytes = GGML_TYPES[type_id]
    blocks = raw.reshape(n // per_block, block_bytes)
    if name.endswith("_K"):
        return _dequantize_k(blocks, name)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (n_blocks, 1)
    if name == "Q8_0":
        return (d * blocks[:, 2:].copy().view(np.int8).astype(np.float32)).reshape(-1)
    q = blocks[:, -16:]
    q = np.concatenate([q & 0x0F, q >> 4], axis=1).astype(np.float32)  # (n_blocks, 32)
    if name == "Q4_0":
        return (d * (q - 8)).reshape(-1)
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
    return (d * q + m).reshape(-1)


def _f16(blocks, start):
    """The float16 at byte `start` of every block -> (n_blocks, 1) float32."""
    return blocks[:, start:start + 2].copy().view("<f2").astype(np.float32)


def _dequantize_k(blocks, name):
    """llama.cpp's k-quants, super-blocks of 256 weights in 8 (Q4_K, Q5_K) or 16 (Q6_K) sub-blocks:
      Q4_K  d, dmin (float16), 12 bytes holding 8 six-bit scales s_j and 8 six-bit mins m_j, 128 bytes of 4-bit q;
            w = d s_j q - dmin m_j. Each 64 weights are 32 low nibbles (sub-block 2i) then the same 32 bytes' high
            nibbles (sub-block 2i + 1).
      Q5_K  as Q4_K, plus 32 bytes of fifth bits: bit 2i of byte l tops up weight l of sub-block 2i, bit 2i + 1
            weight l of sub-block 2i + 1; w = d s_j (q + 16 h) - dmin m_j
      Q6_K  128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8 scales, d; w = d s_j (q - 32). Each half of
            128 weights: its 64 low-bit bytes l give weights l (low nibble) and l + 64 (high nibble), its 32
            high-bit bytes give 2 bits to each of weights l, l + 32, l + 64, l + 96.
    blocks (n, block bytes) uint8 -> (n * 256,) float32."""
    n = len(blocks)
    if name == "Q6_K":
        ql, qh = blocks[:, :128].astype(np.int32), blocks[:, 128:192].astype(np.int32)
        scales = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)  # (n, 16)
        d = _f16(blocks, 208)
        out = np.empty((n, 256), np.float32)
        for half in range(2):
            lo, hi = ql[:, 64 * half:64 * half + 64], qh[:, 32 * half:32 * half + 32]
            quarters = [(lo[:, :32] & 15) | ((hi & 3) << 4), (lo[:, 32:] & 15) | (((hi >> 2) & 3) << 4),
                        (lo[:, :32] >> 4) | (((hi >> 4) & 3) << 4), (lo[:, 32:] >> 4) | (((hi >> 6) & 3) << 4)]
            for k, q in enumerate(quarters):  # weights 32k..32k+31 of this half, two scales of 16 each
                sc = np.repeat(scales[:, 8 * half + 2 * k:8 * half + 2 * k + 2], 16, axis=1)
                out[:, 128 * half + 32 * k:128 * half + 32 * k + 32] = d * sc * (q - 32)
        return out.reshape(-1)
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    raw = blocks[:, 4:16].astype(np.int32)  # (n, 12): the packed scales and mins
    sc, mn = np.empty((n, 8), np.int32), np.empty((n, 8), np.int32)
    sc[:, :4], mn[:, :4] = raw[:, :4] & 63, raw[:, 4:8] & 63
    sc[:, 4:] = (raw[:, 8:12] & 15) | ((raw[:, :4] >> 6) << 4)
    mn[:, 4:] = (raw[:, 8:12] >> 4) | ((raw[:, 4:8] >> 6) << 4)
    qs = blocks[:, -128:].astype(np.int32).reshape(n, 4, 32)
    q = np.stack([qs & 15, qs >> 4], axis=2).reshape(n, 8, 32)  # sub-block j: low nibbles of chunk j // 2, or high
    if name == "Q5_K":
        qh = blocks[:, 16:48].astype(np.int32)  # (n, 32)
        q = q + 16 * np.stack([(qh >> j) & 1 for j in range(8)], axis=1)
    w = d[:, :, None] * sc[:, :, None] * q - dmin[:, :, None] * mn[:, :, None]
    return w.astype(np.float32).reshape(-1)


class _Bytes:
    """A cursor over a file's bytes whose every read is bounds-checked: a lying count or a cut file is a
    UserError naming the file and the offset, never a struct.error or an allocation of the claimed size."""

    def __init__(self, data, path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n, what):
        if n < 0 or self.pos + n > len(self.data):
            raise UserError(f"{self.path}: truncated GGUF: {what} at byte {self.pos} needs {n} bytes, the file "
                            f"has {len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt, what):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what):
        n = self.scalar("<Q", what)
        if n > GGUF_MAX_COUNT:
            raise UserError(f"{self.path}: not a usable GGUF: {what} is {n}, beyond any real file")
        return n

    def string(self, what):
        raw = bytes(self.take(self.count(what + " length"), what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{self.path}: GGUF {what} is not UTF-8 text")

    def value(self, vtype, what, depth=0):
        if vtype in GGUF_VALUE:
            return self.scalar(GGUF_VALUE[vtype], what)
        if vtype == GGUF_STRING:
            return self.string(what)
        if vtype == GGUF_ARRAY and depth == 0:
            item = self.scalar("<I", what + " item type")
            return [self.value(item, what, 1) for _ in range(self.count(what + " array length"))]
        raise UserError(f"{self.path}: GGUF {what} has value type {vtype}, not one the format defines")


def read_gguf(path, tensors=True):
    """A GGUF file -> (metadata {key: value}, tensors {name: float32 numpy array in numpy's dim order}).

    Every count, offset and size is checked against the file before it is used; a tensor type we do not read is
    refused by name, with the types we do."""
    with open(path, "rb") as f:
        data = memoryview(f.read())
    r = _Bytes(data, path)
    if bytes(r.take(4, "magic")) != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (bad magic {bytes(data[:4])!r}, expected b'GGUF')")
    version = r.scalar("<I", "version")
    if version not in (2, 3):
        raise UserError(f"{path}: GGUF version {version}; this reader knows versions 2 and 3")
    n_tensors, n_kv = r.count("tensor count"), r.count("metadata count")
    meta = {}
    for _ in range(n_kv):
        key = r.string("metadata key")
        meta[key] = r.value(r.scalar("<I", f"type of {key}"), key)
    infos = []
    for _ in range(n_tensors):
        name = r.string("tensor name")
        n_dims = r.scalar("<I", f"{name} dims")
        if not 1 <= n_dims <= 4:
            raise UserError(f"{path}: GGUF tensor {name} has {n_dims} dimensions (1 to 4 expected)")
        dims = [r.scalar("<Q", f"{name} size") for _ in range(n_dims)]
        type_id, offset = r.scalar("<I", f"{name} type"), r.scalar("<Q", f"{name} offset")
        infos.append((name, dims, type_id, offset))
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align < 1 or align & (align - 1):
        raise UserError(f"{path}: GGUF general.alignment {_show(align)} is not a power of two")
    start = -(-r.pos // align) * align
    if not tensors:  # the metadata only (a tokenizer)
        return meta, {}
    tensors = {}
    for name, dims, type_id, offset in infos:
        if type_id not in GGML_TYPES:
            kind = GGML_NAMES.get(type_id, f"type id {type_id}")
            raise UserError(f"{path}: tensor {name} is {kind}, a GGUF type this reader does not dequantise (it reads "
                            f"{', '.join(t[0] for t in GGML_TYPES.values())})")
        _, per_block, block_bytes = GGML_TYPES[type_id]
        n = 1
        for d in dims:
            n *= d
        if n == 0 or n % per_block or n > SIZE_LIMITS["vocab_size"] * SIZE_LIMITS["d_model"]:
            raise UserError(f"{path}: GGUF tensor {name} of shape {dims} cannot hold {GGML_TYPES[type_id][0]} "
                            f"blocks of {per_block}")
        size = n // per_block * block_bytes
        if start + offset + size > len(data):
            raise UserError(f"{path}: truncated GGUF: tensor {name} needs bytes {start + offset} to "
                            f"{start + offset + size}, the file has {len(data)}")
        raw = np.frombuffer(data, dtype=np.uint8, count=size, offset=start + offset)
        tensors[name] = dequantize(raw, type_id, n).reshape(dims[::-1])
    return meta, tensors


GGUF_NAMES = {"attn_norm": "norm1", "ffn_norm": "norm2", "attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v",
              "attn_output": "attn.o", "ffn_gate": "mlp.gate", "ffn_up": "mlp.up", "ffn_down": "mlp.down"}


def unpermute_qk(w, n_heads):
    """Undo llama.cpp's Q/K row order for the llama architecture. Its converter stores each head's rows as
    (pairs, 2) interleaved, for ggml's rotate-adjacent-pairs RoPE; our RoPE (and transformers') rotates the two
    halves of a head, rows (2, pairs). w (n_heads * head_dim, ...) -> the same shape in our order."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_int(path, meta, key, limit, default=None):
    value = meta.get(key, default)
    if value is None:
        raise UserError(f"{path}: GGUF metadata has no {key!r}")
    _check_size(path, key, value, limit)
    return value


def _float32_decimal(value):
    """A float32 from the metadata as the shortest decimal that is that float32 (1e-05, not 9.99999974738e-06): the
    number it was written from, most likely, and the same float32 in every fp32 computation. Other values as they
    are, for config_from_dict to judge."""
    return float(str(np.float32(value))) if isinstance(value, float) else value


def load_gguf(path):
    """A llama.cpp GGUF file of the llama, qwen2 or gpt2 architecture -> our checkpoint dict, weights dequantised to
    fp32; the tokenizer is the file's own (its spec is the path: `gguf_vocab`)."""
    meta, tensors = read_gguf(path)
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2", "gpt2"):
        raise UserError(f"{path}: GGUF architecture {_show(arch)} is not one we load (llama, qwen2, gpt2)")
    if meta.get(f"{arch}.rope.scaling.type", "none") not in ("none", "linear") or \
            meta.get(f"{arch}.rope.scaling.factor", 1.0) != 1.0:
        raise UserError(f"{path}: RoPE scaling {_show(meta.get(f'{arch}.rope.scaling.type'))} is not implemented")
    if "token_embd.weight" not in tensors:
        raise UserError(f"{path}: GGUF has no token_embd.weight")
    n_layer = _gguf_int(path, meta, f"{arch}.block_count", SIZE_LIMITS["n_layer"])
    d = _gguf_int(path, meta, f"{arch}.embedding_length", SIZE_LIMITS["d_model"])
    n_head = _gguf_int(path, meta, f"{arch}.attention.head_count", SIZE_LIMITS["n_head"])
    n_kv = _gguf_int(path, meta, f"{arch}.attention.head_count_kv", SIZE_LIMITS["n_kv_head"], n_head)
    head_dim = _gguf_int(path, meta, f"{arch}.attention.key_length", SIZE_LIMITS["d_model"], d // n_head)
    if meta.get(f"{arch}.attention.value_length", head_dim) != head_dim:
        raise UserError(f"{path}: key and value head sizes differ; not implemented")
    if "rope_freqs.weight" in tensors:  # llama.cpp's form of Llama-3 RoPE scaling: per-frequency divisors
        raise UserError(f"{path}: RoPE frequency factors (rope_freqs, Llama-3.1+) are not implemented for GGUF; "
                        f"load the Hugging Face directory, which we read with its rope_scaling")
    gpt2 = arch == "gpt2"
    cfg = config_from_dict(dict(
        arch="gpt2" if gpt2 else "llama", vocab_size=tensors["token_embd.weight"].shape[0], n_layer=n_layer,
        n_head=n_head, n_kv_head=n_kv, d_model=d,
        d_ff=_gguf_int(path, meta, f"{arch}.feed_forward_length", SIZE_LIMITS["d_ff"]),
        max_seq_len=_gguf_int(path, meta, f"{arch}.context_length", SIZE_LIMITS["max_seq_len"], 2048),
        norm_eps=_float32_decimal(meta.get(f"{arch}.attention.layer_norm_{'' if gpt2 else 'rms_'}epsilon", 1e-5)),
        rope_theta=_float32_decimal(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        qkv_bias="blk.0.attn_q.bias" in tensors,
        head_dim=0 if head_dim * n_head == d else head_dim,
        tie_embeddings="output.weight" not in tensors), path)
    if len(_layer_ids(tensors, "blk")) != cfg.n_layer:
        raise UserError(f"{path}: block_count is {cfg.n_layer} but the file holds {len(_layer_ids(tensors, 'blk'))} "
                        f"blocks")
    sd = {"embed.weight": tensors["token_embd.weight"], "norm.weight": tensors.get("output_norm.weight"),
          "norm.bias": tensors.get("output_norm.bias"), "pos_embed.weight": tensors.get("position_embd.weight")}
    sd["lm_head.weight"] = tensors.get("output.weight", sd["embed.weight"])
    for name, t in tensors.items():
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] == "attn_qkv" and t.shape[0] % 3 == 0:
            for ours, part in zip("qkv", np.split(t, 3)):  # gpt2's fused rows: q, then k, then v
                sd[f"blocks.{parts[1]}.attn.{ours}.{parts[3]}"] = part
        elif parts[0] == "blk" and len(parts) == 4 and parts[2] in GGUF_NAMES:
            heads = {"attn_q": n_head, "attn_k": n_kv}.get(parts[2])
            if arch == "llama" and heads and t.shape[0] % (2 * heads) == 0:
                t = unpermute_qk(t, heads)
            sd[f"blocks.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"] = t
    sd = {k: torch.from_numpy(v.copy()) for k, v in sd.items() if v is not None}
    sd, cfg = add_special_rows(sd, cfg, _tokenizer_of(os.path.abspath(path), path))
    return {"model": sd, "config": asdict(cfg), "tokenizer": os.path.abspath(path), "step": 0, "args": {},
            "metrics": {}, "format": "fp32", "lineage": [f"gguf:{os.path.basename(path)}"]}


# the pre-tokenizer names llama.cpp writes (tokenizer.ggml.pre) -> the split pattern, as one regex
GGUF_PATTERNS = {
    "gpt-2": GPT2_PATTERN,
    "gpt2": GPT2_PATTERN,  # not a name llama.cpp knows (its converter writes "gpt-2"); kept for files that say it
    "smollm": SMOLLM_PATTERN,
    "llama-bpe": CL100K_PATTERN,
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
             r"""|\s+(?!\S)|\s+""",
}


def gguf_vocab(path):
    """The tokenizer in a GGUF file's metadata (byte-level BPE: tokenizer.ggml.model "gpt2") -> formats.file_vocab's
    (ranks, specials, split regex, chat template text, quirks). Control and user-defined tokens are specials; unused
    ones (the placeholders of rows beyond the vocabulary) are no tokens at all."""
    meta, _ = read_gguf(path, tensors=False)
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        kind = "SentencePiece (Llama-2, Mistral, Gemma)" if model == "llama" else _show(model)
        raise UserError(f"{path}: tokenizer {kind} is not implemented: only byte-level BPE (GPT-2, SmolLM, Qwen2, "
                        f"Llama-3) is")
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in GGUF_PATTERNS:
        raise UserError(f"{path}: pre-tokenizer {_show(pre)} is not one we know ({', '.join(GGUF_PATTERNS)})")
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")
    if not isinstance(tokens, list) or not isinstance(types, list) or len(tokens) != len(types):
        raise UserError(f"{path}: GGUF tokenizer.ggml.tokens / token_type missing or of different lengths")
    specials = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind in (3, 4)}  # control, user
    vocab = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind not in (3, 4, 5)}
    ranks = bpe_ranks(path, vocab, meta.get("tokenizer.ggml.merges", []))
    template = meta.get("tokenizer.chat_template")
    return (ranks, specials, GGUF_PATTERNS[pre], template if isinstance(template, str) else None,
            {"unk": meta.get("tokenizer.ggml.unknown_token_id", 0)})


# -----------------------------------------------------------------------------
# Writing. The quantisers give, byte for byte, what ggml's reference quantisers (ggml-quants.c,
# quantize_row_{q8_0,q4_0,q4_1}_ref, what llama-quantize runs without an importance matrix) give: the same float32
# arithmetic in the same order, C's rounding, float16 scales rounded to nearest even. Each takes float32 weights
# (n,), n a multiple of 32, and returns the blocks' bytes (n / 32 * block bytes,) uint8, which `dequantize` reads.


def _blocks_of_32(x):
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 32)  # (n_blocks, 32)


def _inverse(d):
    """1 / d in float32, 0 where d is 0 (an all-zero block), as the C code's `id = d ? 1.0f/d : 0.0f`."""
    return np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)


def _pack_nibbles(q):
    """(n_blocks, 32) values 0..15 -> (n_blocks, 16) bytes: low nibble weight j, high nibble weight j + 16."""
    return q[:, :16] | (q[:, 16:] << 4)


def quantize_q8_0(x):
    """Q8_0, 34 bytes a block of 32: a float16 scale d = max|x| / 127, then 32 int8 q = round(x * (1 / d)), halves
    rounded away from zero (C's roundf). Dequantised: w = d q."""
    b = _blocks_of_32(x)
    d = np.abs(b).max(1, keepdims=True) / np.float32(127)  # (n_blocks, 1)
    v = (b * _inverse(d)).astype(np.float64)  # roundf in float64, where |v| + 0.5 is exact
    q = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int8)
    return np.concatenate([d.astype("<f2").view(np.uint8), q.view(np.uint8)], axis=1).reshape(-1)


def quantize_q4_0(x):
    """Q4_0, 18 bytes a block of 32: a float16 scale d = m / -8, m the block's weight of largest magnitude (the first
    one, on a tie), sign kept, so that m is q = 0 exactly and -m would be 16 (clamped to 15); q = min(15,
    trunc(x * (1 / d) + 8.5)); 16 bytes of nibbles, low nibble weight j, high nibble weight j + 16. Dequantised:
    w = d (q - 8)."""
    b = _blocks_of_32(x)
    m = np.take_along_axis(b, np.abs(b).argmax(1)[:, None], 1)  # (n_blocks, 1); argmax takes the first
    d = m / np.float32(-8)
    q = np.minimum(15, np.trunc(b * _inverse(d) + np.float32(8.5))).astype(np.uint8)
    return np.concatenate([d.astype("<f2").view(np.uint8), _pack_nibbles(q)], axis=1).reshape(-1)


def quantize_q4_1(x):
    """Q4_1, 20 bytes a block of 32: a float16 scale d = (max - min) / 15, a float16 offset m = min, then
    q = min(15, trunc((x - min) * (1 / d) + 0.5)) in nibbles as Q4_0's. Dequantised: w = d q + m. (The offset is
    rounded to float16 after the q are chosen, as in C, so a block's minimum comes back within float16's step.)"""
    b = _blocks_of_32(x)
    lo, hi = b.min(1, keepdims=True), b.max(1, keepdims=True)  # (n_blocks, 1)
    d = (hi - lo) / np.float32(15)
    q = np.minimum(15, np.trunc((b - lo) * _inverse(d) + np.float32(0.5))).astype(np.uint8)
    return np.concatenate([d.astype("<f2").view(np.uint8), lo.astype("<f2").view(np.uint8), _pack_nibbles(q)],
                          axis=1).reshape(-1)


QUANTIZERS = {8: quantize_q8_0, 2: quantize_q4_0, 3: quantize_q4_1}
# --gguf-type -> (ggml type id of the 2-D weights, llama.cpp's general.file_type)
GGUF_KINDS = {"f32": (0, 0), "f16": (1, 1), "q8_0": (8, 7), "q4_0": (2, 2), "q4_1": (3, 3)}
FP16_MAX = 65504.0


def encode_tensor(t, type_id):
    """float32 numpy array -> its bytes as ggml type type_id (F32, F16, Q8_0, Q4_0, Q4_1; blocks along the last
    dimension, the rows)."""
    if type_id == 0:
        return t.astype("<f4").tobytes()
    if type_id == 1:
        return t.astype("<f2").tobytes()
    return QUANTIZERS[type_id](t.reshape(-1)).tobytes()


def permute_qk(w, n_heads):
    """Our Q/K rows (each head's two rotate-half halves, rows (2, pairs)) -> llama.cpp's for the llama architecture
    (rows (pairs, 2): ggml's RoPE rotates adjacent pairs), as its converter writes them; `unpermute_qk` undoes it.
    w (n_heads * head_dim, ...) -> the same shape."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_arch(cfg):
    """The llama.cpp architecture of our config: gpt2; qwen2 for a Llama with q/k/v biases (its RoPE rotates halves,
    as ours, so its Q/K rows are not permuted); else llama."""
    return "gpt2" if cfg.arch == "gpt2" else "qwen2" if cfg.qkv_bias else "llama"


def rope_freq_factors(cfg):
    """Llama-3 RoPE scaling as llama.cpp takes it (the rope_freqs tensor its converter writes): (head_dim / 2,)
    float32 divisors of the base frequencies, so base / factor is llama3_inv_freq's frequency."""
    base = rope_inv_freq(cfg.head_size, cfg.rope_theta).double()
    scaled = llama3_inv_freq(base, cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                             cfg.rope_original_max_len)
    return (base / scaled).float().numpy()


def gguf_tensors(sd, cfg):
    """Our state dict (Transformer.state_dict() names, float tensors) -> {llama.cpp tensor name: float32 numpy array
    in our (out, in) order}: llama / qwen2 with separate attn_q/k/v (llama's Q/K rows permuted), gpt2 with q, k, v
    fused into attn_qkv and its position table; no output.weight when the embeddings are tied (llama.cpp then uses
    token_embd), rope_freqs for Llama-3 RoPE scaling."""
    arch, gpt2 = gguf_arch(cfg), cfg.arch == "gpt2"
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor) or not v.is_floating_point()]
    if bad:
        raise UserError(f"GGUF export: weight {bad[0]} is not a float tensor (export a dense model: "
                        f"plain_state_dict(model, dense=True))")
    w = {k: v.detach().float().cpu().numpy() for k, v in sd.items()}
    try:
        out = {"token_embd.weight": w["embed.weight"]}
        if gpt2:
            out["position_embd.weight"] = w["pos_embed.weight"]
            out["output_norm.bias"] = w["norm.bias"]
        out["output_norm.weight"] = w["norm.weight"]
        if not cfg.tie_embeddings:
            out["output.weight"] = w["lm_head.weight"]
        if cfg.rope_scaling_factor != 1.0:
            out["rope_freqs.weight"] = rope_freq_factors(cfg)
        for i in range(cfg.n_layer):
            ours, theirs = f"blocks.{i}.", f"blk.{i}."
            for suffix in ("weight", "bias") if gpt2 else ():
                out[f"{theirs}attn_qkv.{suffix}"] = np.concatenate([w[f"{ours}attn.{n}.{suffix}"] for n in "qkv"])
            for name, module in GGUF_NAMES.items():
                if gpt2 and name in ("attn_q", "attn_k", "attn_v"):
                    continue
                for suffix in ("weight", "bias"):
                    if f"{ours}{module}.{suffix}" not in w:
                        if suffix == "weight" and (name != "ffn_gate" or not gpt2):
                            raise KeyError(f"{ours}{module}.{suffix}")
                        continue
                    t = w[f"{ours}{module}.{suffix}"]
                    if arch == "llama" and name in ("attn_q", "attn_k"):
                        t = permute_qk(t, cfg.n_head if name == "attn_q" else cfg.n_kv_head)
                    out[f"{theirs}{name}.{suffix}"] = t
    except KeyError as e:
        raise UserError(f"GGUF export: weight {e} missing from the state dict of a {cfg.arch} model")
    return out


# the split regex of a tokenizer -> the llama.cpp pre-tokenizer name (tokenizer.ggml.pre) whose regex is the same
GGUF_PRE = {GPT2_PATTERN: "gpt-2", SMOLLM_PATTERN: "smollm", CL100K_PATTERN: "llama-bpe",
            GGUF_PATTERNS["qwen2"]: "qwen2"}


def gguf_tokenizer(enc, vocab_size):
    """enc -> llama.cpp's tokenizer metadata (byte-level BPE, tokenizer.ggml.model "gpt2"): vocab_size tokens in
    GPT-2's printable-byte alphabet (special tokens as control tokens, ids enc lacks as unused placeholders), the
    merges (formats.tokenizer_json's: every split of a token, ranked by the merged token's id, which is tiktoken's
    order), the pre-tokenizer whose regex is enc's, bos / eos (the template's end token) / padding ids, and the
    chat template's Jinja text."""
    merges = tokenizer_json(enc)["model"]["merges"]
    # a vocabulary without merges (the byte tokenizer) encodes every byte alone under any split: gpt-2's will do
    pre = GGUF_PRE.get(enc._pat_str) if merges else "gpt-2"
    if pre is None:
        raise UserError(f"GGUF export: tokenizer {enc.name!r} splits text by a regex no llama.cpp pre-tokenizer we "
                        f"know has ({', '.join(GGUF_PRE.values())})")
    show = _byte_encoder()
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [5] * vocab_size  # 5: unused
    for b, i in enc._mergeable_ranks.items():
        tokens[i], types[i] = "".join(show[c] for c in b), 1  # 1: normal
    for text, i in enc._special_tokens.items():
        tokens[i], types[i] = text, 3  # 3: control
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": special_id(enc, _bos_token(enc)), "tokenizer.ggml.eos_token_id": end_id(enc),
            "tokenizer.ggml.padding_token_id": special_id(enc, "<|pad|>"), "tokenizer.ggml.add_bos_token": False,
            "tokenizer.ggml.add_eos_token": False, "tokenizer.chat_template": TEMPLATE_JINJA[enc.chat_template]}


def gguf_metadata(cfg, enc, kind, name="posttrain"):
    """The metadata llama.cpp reads for our config and tokenizer, in the value types it checks them against
    (`_gguf_value`: counts uint32, epsilons and bases float32)."""
    arch = gguf_arch(cfg)
    meta = {"general.architecture": arch, "general.name": name, "general.file_type": GGUF_KINDS[kind][1],
            "general.quantization_version": 2, f"{arch}.context_length": cfg.max_seq_len,
            f"{arch}.embedding_length": cfg.d_model, f"{arch}.block_count": cfg.n_layer,
            f"{arch}.feed_forward_length": cfg.d_ff, f"{arch}.attention.head_count": cfg.n_head,
            f"{arch}.attention.head_count_kv": cfg.n_kv_head, f"{arch}.vocab_size": cfg.vocab_size}
    if arch == "gpt2":
        meta[f"{arch}.attention.layer_norm_epsilon"] = float(cfg.norm_eps)
    else:
        meta[f"{arch}.attention.layer_norm_rms_epsilon"] = float(cfg.norm_eps)
        meta[f"{arch}.rope.freq_base"] = float(cfg.rope_theta)
        meta[f"{arch}.rope.dimension_count"] = cfg.head_size
        if cfg.head_dim:
            meta[f"{arch}.attention.key_length"] = meta[f"{arch}.attention.value_length"] = cfg.head_dim
    return {**meta, **gguf_tokenizer(enc, cfg.vocab_size)}


def _gguf_string(text):
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _gguf_value(value):
    """A metadata value -> (GGUF value type, bytes): bool, int as uint32, float as float32, str; a list of str (an
    empty list too: the byte tokenizer's merges) or of int (token types: int32)."""
    if isinstance(value, bool):
        return 7, struct.pack("<?", value)
    if isinstance(value, int):
        return 4, struct.pack("<I", value)
    if isinstance(value, float):
        return 6, struct.pack("<f", value)
    if isinstance(value, str):
        return GGUF_STRING, _gguf_string(value)
    if all(isinstance(v, str) for v in value):
        return GGUF_ARRAY, struct.pack("<IQ", GGUF_STRING, len(value)) + b"".join(map(_gguf_string, value))
    return GGUF_ARRAY, struct.pack("<IQ", 5, len(value)) + np.asarray(value, "<i4").tobytes()


def _tensor_type(name, t, kind):
    """The ggml type a tensor is written in: 1-D tensors (norms, biases, rope_freqs) and GPT-2's position table F32,
    as llama.cpp keeps them; the 2-D weights `kind`, or F16 where a row is no whole number of blocks of 32."""
    type_id = GGUF_KINDS[kind][0]
    if t.ndim == 1 or name == "position_embd.weight" or type_id == 0:
        return 0
    return 1 if t.shape[-1] % 32 else type_id


def write_gguf(path, sd, cfg, enc, kind="f16"):
    """Our model as a GGUF v3 file that llama.cpp (and load_gguf) runs: sd a dense float state dict (names as
    Transformer.state_dict(); lm_head.weight may be left out when cfg.tie_embeddings), cfg its model.Config, enc its
    tokenizer; kind (f32, f16, q8_0, q4_0, q4_1) the type of the 2-D weight matrices, the token embedding included.
    Written atomically (common.atomic_write)."""
    if cfg.prefix_len:
        raise UserError(f"GGUF: a {cfg.prefix_kind} adapter ({cfg.prefix_len} learned slots) is a learned start of the "
                        "KV cache, not a weight, so llama.cpp has no place for it; our checkpoint (.pt) keeps it")
    if kind not in GGUF_KINDS:
        raise UserError(f"GGUF type {kind!r}: choose from {', '.join(GGUF_KINDS)}")
    if cfg.head != "lm":
        raise UserError("GGUF export writes language models only (this model has a scalar head)")
    if enc.n_vocab > cfg.vocab_size:
        raise UserError(f"GGUF export: tokenizer {enc.name!r} has {enc.n_vocab} ids but the model only "
                        f"{cfg.vocab_size}")
    if gguf_arch(cfg) == "qwen2" and cfg.head_size * cfg.n_head != cfg.d_model:
        raise UserError("GGUF export: llama.cpp's qwen2 needs n_head * head_dim == d_model (q/k/v biases with another "
                        "head_dim are not implemented)")
    tensors = gguf_tensors(sd, cfg)
    meta = gguf_metadata(cfg, enc, kind, os.path.basename(path).removesuffix(".gguf"))
    header = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(meta))]
    for key, value in meta.items():
        vtype, raw = _gguf_value(value)
        header += [_gguf_string(key), struct.pack("<I", vtype), raw]
    layout, offset = [], 0
    for name, t in tensors.items():
        type_id = _tensor_type(name, t, kind)
        limit = FP16_MAX * {0: np.inf, 1: 1, 8: 127, 2: 8, 3: 1}[type_id]  # beyond it a float16 value or scale is inf
        if not np.isfinite(t).all() or np.abs(t).max() > limit:
            raise UserError(f"GGUF export: {name} holds non-finite values or values beyond what "
                            f"{GGML_TYPES[type_id][0]} stores (|w| up to {limit:g}); write --gguf-type f32")
        _, per_block, block_bytes = GGML_TYPES[type_id]
        header += [_gguf_string(name), struct.pack("<I", t.ndim), struct.pack(f"<{t.ndim}Q", *t.shape[::-1]),
                   struct.pack("<IQ", type_id, offset)]
        size = t.size // per_block * block_bytes
        layout.append((t, type_id, size))
        offset += -(-size // 32) * 32  # every tensor's data starts on general.alignment (32)
    header = b"".join(header)

    def write(f):
        f.write(header + bytes(-len(header) % 32))
        for t, type_id, size in layout:
            f.write(encode_tensor(t, type_id) + bytes(-size % 32))  # the last one padded too, as llama.cpp reads it

    atomic_write(path, write)
