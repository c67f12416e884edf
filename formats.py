"""
formats.py: other people's files in and out. Imported lazily by common.load_checkpoint and by the callers of
export_hf, so a script that never meets a Hugging Face directory never reads this file.

  `.safetensors` + a sibling `.json` (config, tokenizer name): `save_safetensors`, `load_safetensors`.
  Hugging Face directories of the GPT-2, Llama and Qwen2 families: `load_hf_dir` (config.json checked before
  any arithmetic on its sizes), `export_hf` (a directory `transformers.AutoModelForCausalLM` loads).
  GGUF (llama.cpp): `read_gguf` -> metadata and dequantised tensors (F32, F16, BF16, Q8_0, Q4_0, Q4_1); turning
  them into a model (config, tokenizer) is not wired into load_model yet.
"""

import dataclasses
import json
import os
from dataclasses import asdict

import torch

from common import (SIZE_LIMITS, SPECIAL_TOKENS, UserError, _check_size, _layer_ids, _one_line, _show, _tokenizer_of,
                    atomic_write, config_from_dict, parse_json, special_id)
from model import plain_state_dict


def save_safetensors(path, model, enc):
    """`path` (.safetensors) plus `path` with .json: the config and tokenizer name."""
    raw = getattr(model, "module", model)
    sd = plain_state_dict(raw)
    if raw.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # safetensors refuses shared storage; tying restores it
    atomic_write(path, lambda f: f.write(_safetensors_bytes(sd)))
    meta = json.dumps({"config": asdict(raw.cfg), "tokenizer": enc.name}, indent=1).encode()
    atomic_write(path[: -len(".safetensors")] + ".json", lambda f: f.write(meta))


def _safetensors_bytes(sd):
    from safetensors.torch import save
    return save({k: v.contiguous() for k, v in sd.items()})


def _read_safetensors(path):
    from safetensors.torch import load_file
    if os.path.isdir(path):
        raise UserError(f"{path}: a directory, expected a .safetensors file")
    try:
        return load_file(path)
    # the header is checked before any tensor is read (its length against the file, offsets, dtypes, shapes);
    # whatever it rejects (SafetensorError, OSError...) means the same: not a readable safetensors file
    except Exception as e:
        raise UserError(f"{path}: corrupt or truncated safetensors file ({_one_line(e)})")


def _read_json(path):
    """The JSON object in `path`; every way the file can be unreadable is a UserError naming it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: missing (needed beside the weights)")
    except OSError as e:  # e.g. a directory of that name
        raise UserError(f"{path}: cannot read ({e.strerror})")
    obj = parse_json(data.removeprefix(b"\xef\xbb\xbf"), path, whole_file=True)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object {{...}}, found {json.dumps(obj)[:40]}")
    return obj


def load_safetensors(path):
    """`path` (.safetensors) and the .json beside it (config, tokenizer name) -> our checkpoint dict."""
    try:
        meta = _read_json(path[: -len(".safetensors")] + ".json")
    except UserError as e:  # it names the .json; the user named the .safetensors
        raise UserError(f"{path}: {e}")
    return {"model": _read_safetensors(path), "config": meta.get("config"), "tokenizer": meta.get("tokenizer", "byte"),
            "step": 0, "args": {}, "metrics": {}, "format": "fp32", "lineage": ["safetensors"]}


# HF names per layer: (our name, HF llama name); GPT-2 is handled by hand because its Conv1D stores W^T and
# fuses q, k, v.
LLAMA_NAMES = [("attn.q", "self_attn.q_proj"), ("attn.k", "self_attn.k_proj"), ("attn.v", "self_attn.v_proj"),
               ("attn.o", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj"), ("mlp.up", "mlp.up_proj"),
               ("mlp.down", "mlp.down_proj"), ("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm")]


def hf_to_ours(hf, model_type, cfg):
    sd = {}
    if model_type == "gpt2":
        hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
        sd["embed.weight"], sd["pos_embed.weight"] = hf["wte.weight"], hf["wpe.weight"]
        sd["norm.weight"], sd["norm.bias"] = hf["ln_f.weight"], hf["ln_f.bias"]
        for i in range(cfg.n_layer):
            p, q = f"h.{i}.", f"blocks.{i}."
            w, b = hf[p + "attn.c_attn.weight"].t(), hf[p + "attn.c_attn.bias"]  # Conv1D: (in, 3C) -> (3C, in)
            for j, name in enumerate("qkv"):
                C = cfg.d_model
                sd[q + f"attn.{name}.weight"], sd[q + f"attn.{name}.bias"] = w[j * C:(j + 1) * C], b[j * C:(j + 1) * C]
            for ours, theirs in [("attn.o", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")]:
                sd[q + ours + ".weight"], sd[q + ours + ".bias"] = hf[p + theirs + ".weight"].t(), hf[p + theirs + ".bias"]
            for ours, theirs in [("norm1", "ln_1"), ("norm2", "ln_2")]:
                sd[q + ours + ".weight"], sd[q + ours + ".bias"] = hf[p + theirs + ".weight"], hf[p + theirs + ".bias"]
        sd["lm_head.weight"] = hf.get("lm_head.weight", sd["embed.weight"])
        return {k: v.contiguous() for k, v in sd.items()}
    hf = {k.removeprefix("model."): v for k, v in hf.items()}
    sd["embed.weight"], sd["norm.weight"] = hf["embed_tokens.weight"], hf["norm.weight"]
    sd["lm_head.weight"] = hf.get("lm_head.weight", sd["embed.weight"])
    for i in range(cfg.n_layer):
        for ours, theirs in LLAMA_NAMES:
            for suffix in ("weight", "bias"):
                key = f"layers.{i}.{theirs}.{suffix}"
                if key in hf:
                    sd[f"blocks.{i}.{ours}.{suffix}"] = hf[key]
    return sd


def ours_to_hf(sd, cfg):
    hf = {}
    if cfg.arch == "gpt2":
        hf["transformer.wte.weight"], hf["transformer.wpe.weight"] = sd["embed.weight"], sd["pos_embed.weight"]
        hf["transformer.ln_f.weight"], hf["transformer.ln_f.bias"] = sd["norm.weight"], sd["norm.bias"]
        for i in range(cfg.n_layer):
            p, q = f"transformer.h.{i}.", f"blocks.{i}."
            hf[p + "attn.c_attn.weight"] = torch.cat([sd[q + f"attn.{n}.weight"] for n in "qkv"]).t()
            hf[p + "attn.c_attn.bias"] = torch.cat([sd[q + f"attn.{n}.bias"] for n in "qkv"])
            for ours, theirs in [("attn.o", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")]:
                hf[p + theirs + ".weight"], hf[p + theirs + ".bias"] = sd[q + ours + ".weight"].t(), sd[q + ours + ".bias"]
            for ours, theirs in [("norm1", "ln_1"), ("norm2", "ln_2")]:
                hf[p + theirs + ".weight"], hf[p + theirs + ".bias"] = sd[q + ours + ".weight"], sd[q + ours + ".bias"]
        if not cfg.tie_embeddings:
            hf["lm_head.weight"] = sd["lm_head.weight"]
        return {k: v.contiguous() for k, v in hf.items()}
    hf["model.embed_tokens.weight"], hf["model.norm.weight"] = sd["embed.weight"], sd["norm.weight"]
    if not cfg.tie_embeddings:
        hf["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        for ours, theirs in LLAMA_NAMES:
            for suffix in ("weight", "bias"):
                key = f"blocks.{i}.{ours}.{suffix}"
                if key in sd:
                    hf[f"model.layers.{i}.{theirs}.{suffix}"] = sd[key]
    return {k: v.contiguous() for k, v in hf.items()}


# config.json size keys of each family -> our Config field, whose SIZE_LIMITS bound them
HF_SIZE_KEYS = {
    "gpt2": {"vocab_size": "vocab_size", "n_embd": "d_model", "n_layer": "n_layer", "n_head": "n_head",
             "n_inner": "d_ff", "n_positions": "max_seq_len"},
    "llama": {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layer",
              "num_attention_heads": "n_head", "num_key_value_heads": "n_kv_head", "intermediate_size": "d_ff",
              "max_position_embeddings": "max_seq_len", "head_dim": "d_model"},
}
HF_REQUIRED = {"gpt2": ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"),
               "llama": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")}


def load_hf_dir(path):
    """A Hugging Face model directory of the GPT-2, Llama or Qwen2 family -> our checkpoint dict.

    config.json's sizes are checked (present, whole, within SIZE_LIMITS) before any arithmetic on them, and the
    number of layers against the weights before any loop over them."""
    cfg_path = os.path.join(path, "config.json")
    hc = _read_json(cfg_path)
    mt = hc.get("model_type")
    family = "gpt2" if mt == "gpt2" else "llama" if mt in ("llama", "qwen2") else None
    if family is None:
        raise UserError(f"{path}: unknown architecture {_show(mt)} (supported: gpt2, llama, qwen2)")
    # what we do not implement first (the more useful message), then the sizes
    rope = hc.get("rope_parameters") or hc.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise UserError(f"{cfg_path}: rope_parameters / rope_scaling is {_show(rope)}, expected an object")
    if family == "gpt2" and hc.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{path}: unsupported GPT-2 activation {_show(hc['activation_function'])}")
    if family == "llama" and rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"{path}: RoPE scaling {_show(rope.get('rope_type', rope.get('type')))} is not implemented")
    if family == "llama" and (hc.get("mlp_bias") or (mt == "llama" and hc.get("attention_bias"))):
        raise UserError(f"{path}: Llama with attention/MLP biases is not implemented")
    for key in HF_REQUIRED[family]:
        if hc.get(key) is None:
            raise UserError(f"{cfg_path}: missing {key!r}")
    for key, ours in HF_SIZE_KEYS[family].items():
        if hc.get(key) is not None:
            _check_size(cfg_path, key, hc[key], SIZE_LIMITS[ours])
    if mt == "gpt2":
        d = hc["n_embd"]
        cfg = config_from_dict(dict(
            arch="gpt2", vocab_size=hc["vocab_size"], n_layer=hc["n_layer"], n_head=hc["n_head"],
            n_kv_head=hc["n_head"], d_model=d, d_ff=hc.get("n_inner") or 4 * d, max_seq_len=hc["n_positions"],
            norm_eps=hc.get("layer_norm_epsilon", 1e-5), tie_embeddings=bool(hc.get("tie_word_embeddings", True))),
            cfg_path)
    else:
        d, nh = hc["hidden_size"], hc["num_attention_heads"]
        if hc.get("head_dim") not in (None, d // nh):
            raise UserError(f"{path}: head_dim {hc['head_dim']} != hidden_size / heads is not implemented")
        cfg = config_from_dict(dict(
            arch="llama", vocab_size=hc["vocab_size"], n_layer=hc["num_hidden_layers"], n_head=nh,
            n_kv_head=hc.get("num_key_value_heads") or nh, d_model=d, d_ff=hc["intermediate_size"],
            max_seq_len=hc.get("max_position_embeddings") or 2048, norm_eps=hc.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hc.get("rope_theta", 10000.0)), qkv_bias=mt == "qwen2",
            tie_embeddings=bool(hc.get("tie_word_embeddings", False))), cfg_path)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise UserError(f"{path}: no *.safetensors weights found")
    hf = {}
    for f in files:
        hf.update(_read_safetensors(os.path.join(path, f)))
    layers = _layer_ids(hf, "h" if mt == "gpt2" else "layers")
    if len(layers) != cfg.n_layer:
        raise UserError(f"{cfg_path}: {'n_layer' if mt == 'gpt2' else 'num_hidden_layers'} is {cfg.n_layer} but the "
                        f"weights hold {len(layers)} layers")
    try:
        sd = hf_to_ours(hf, mt, cfg)
    except KeyError as e:
        raise UserError(f"{path}: weight {e} missing for a {mt} model")
    except (RuntimeError, IndexError) as e:  # GPT-2's transposes and q, k, v split on tensors of the wrong rank
        raise UserError(f"{path}: weights do not have the shapes of a {mt} model ({_one_line(e)})")
    tok_file = os.path.join(path, "tokenizer.json.posttrain")
    has_tok_file = os.path.exists(tok_file)
    tokenizer = _read_json(tok_file).get("tokenizer") if has_tok_file else ("gpt2" if mt == "gpt2" else None)
    if tokenizer is None:
        tiktoken_files = [f for f in os.listdir(path) if f.endswith((".tiktoken", "tokenizer.model"))]
        if not tiktoken_files:
            raise UserError(f"{path}: no tokenizer we can read (need a .tiktoken ranks file in the directory)")
        tokenizer = os.path.join(path, tiktoken_files[0])
    extra = _tokenizer_of(tokenizer, tok_file if has_tok_file else path).n_vocab - cfg.vocab_size
    # e.g. GPT-2's 50257 ids lack our ChatML rows: add them (mean embedding). Rows of any other shape are left for
    # load_model to report against the config
    if 0 < extra <= len(SPECIAL_TOKENS) and all(sd[k].shape == (cfg.vocab_size, cfg.d_model)
                                                 for k in ("embed.weight", "lm_head.weight")):
        for k in ("embed.weight", "lm_head.weight"):
            sd[k] = torch.cat([sd[k], sd[k].mean(0, keepdim=True).expand(extra, -1)])  # (vocab + extra, C)
        cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + extra)
    return {"model": sd, "config": asdict(cfg), "tokenizer": tokenizer, "step": 0, "args": {}, "metrics": {},
            "format": "fp32", "lineage": [f"hf:{os.path.basename(os.path.normpath(path))}"]}


def export_hf(model, enc, out_dir):
    """Write a Hugging Face directory (config.json + model.safetensors) that transformers'
    AutoModelForCausalLM loads: GPT2LMHeadModel for arch gpt2, Qwen2 if qkv_bias, else Llama."""
    raw = getattr(model, "module", model)
    cfg = raw.cfg
    if cfg.head != "lm":
        raise UserError("export_hf writes language models only (this model has a scalar head)")
    hf = ours_to_hf(plain_state_dict(raw), cfg)
    if cfg.arch == "gpt2":
        hc = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
                  n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                  n_inner=cfg.d_ff, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=cfg.tie_embeddings)
    else:
        mt = "qwen2" if cfg.qkv_bias else "llama"
        hc = dict(model_type=mt, architectures=["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
                  vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                  max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, hidden_act="silu",
                  tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, torch_dtype="float32")
    hc.update(bos_token_id=special_id(enc, "<|endoftext|>"), eos_token_id=special_id(enc, "<|im_end|>"),
              pad_token_id=special_id(enc, "<|pad|>"))
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, "model.safetensors"), lambda f: f.write(_safetensors_bytes(hf)))
    for name, obj in [("config.json", hc), ("tokenizer.json.posttrain", {"tokenizer": enc.name})]:
        atomic_write(os.path.join(out_dir, name), lambda f, obj=obj: f.write(json.dumps(obj, indent=1).encode()))


# -----------------------------------------------------------------------------
# GGUF (llama.cpp's single-file format), read with numpy and struct: a header (magic b"GGUF", version, tensor and
# metadata counts), typed key-value metadata, tensor infos (name, dims innermost first, type, offset), then the
# tensor data, aligned to general.alignment (32). Quantised types are blocks of 32 weights sharing a scale.

GGUF_VALUE = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
# ggml type id -> (name, weights per block, bytes per block); other types are refused by name
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
              8: ("Q8_0", 32, 34)}
GGML_NAMES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
              15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
              22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
              34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}
GGUF_MAX_COUNT = 1 << 24  # tensors, metadata keys or array items: far above any real file; beyond it, a lying header


def dequantize(raw, type_id, n):
    """n weights of ggml type type_id from their bytes (a numpy uint8 array) -> float32 (n,).
      F32, F16, BF16  the values themselves
      Q8_0   blocks of 32: a float16 scale d, 32 int8 q;              w = d q
      Q4_0   blocks of 32: d, 16 bytes of two 4-bit q (low nibbles are weights 0-15, high nibbles 16-31);
             w = d (q - 8)
      Q4_1   blocks of 32: d, a float16 minimum m, the same nibbles;  w = d q + m"""
    import numpy as np
    name = GGML_TYPES[type_id][0]
    if name == "F32":
        return raw.view("<f4").astype(np.float32)
    if name == "F16":
        return raw.view("<f2").astype(np.float32)
    if name == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    blocks = raw.reshape(n // 32, GGML_TYPES[type_id][2])
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (n_blocks, 1)
    if name == "Q8_0":
        return (d * blocks[:, 2:].copy().view(np.int8).astype(np.float32)).reshape(-1)
    q = blocks[:, -16:]
    q = np.concatenate([q & 0x0F, q >> 4], axis=1).astype(np.float32)  # (n_blocks, 32)
    if name == "Q4_0":
        return (d * (q - 8)).reshape(-1)
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
    return (d * q + m).reshape(-1)


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
        import struct
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


def read_gguf(path):
    """A GGUF file -> (metadata {key: value}, tensors {name: float32 numpy array in numpy's dim order}).

    Every count, offset and size is checked against the file before it is used; a tensor type we do not read is
    refused by name, with the types we do."""
    import numpy as np
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
