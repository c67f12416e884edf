"""
formats.py: other people's files in and out. Imported lazily by common.load_checkpoint and by the callers of
export_hf, so a script that never meets a Hugging Face directory never reads this file.

  `.safetensors` + a sibling `.json` (config, tokenizer name): `save_safetensors`, `load_safetensors`.
  Hugging Face directories of the GPT-2, Llama and Qwen2 families: `load_hf_dir` (config.json checked before
  any arithmetic on its sizes), `export_hf` (a directory `transformers.AutoModelForCausalLM` loads).
  GGUF (llama.cpp) in: `read_gguf` -> metadata and dequantised tensors (F32, F16, BF16, Q8_0, Q4_0, Q4_1, and
  the k-quants Q4_K, Q5_K, Q6_K); `load_gguf` -> our checkpoint (llama / qwen2 architectures, llama.cpp's Q/K row
  order undone); `gguf_encoding` -> the file's byte-level BPE tokenizer as a tiktoken Encoding (SentencePiece
  vocabularies are refused).
"""

import dataclasses
import json
import os
import re
import struct
from dataclasses import asdict

import numpy as np
import tiktoken
import torch

from common import (CL100K_PATTERN, GPT2_PATTERN, SIZE_LIMITS, SPECIAL_TOKENS, UserError, _check_size, _layer_ids,
                    _one_line, _show, _tokenizer_of, atomic_write, config_from_dict, parse_json, special_id)
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
    sd, cfg = add_special_rows(sd, cfg, _tokenizer_of(tokenizer, tok_file if has_tok_file else path))
    return {"model": sd, "config": asdict(cfg), "tokenizer": tokenizer, "step": 0, "args": {}, "metrics": {},
            "format": "fp32", "lineage": [f"hf:{os.path.basename(os.path.normpath(path))}"]}


def add_special_rows(sd, cfg, enc):
    """Rows for the ChatML special tokens a released model lacks (GPT-2's 50257 ids have none of them, SmolLM2 has
    no <|pad|>): embedding and head rows at the mean embedding. Rows of any other shape are left for load_model to
    report against the config. -> (state dict, config)."""
    extra = enc.n_vocab - cfg.vocab_size
    if 0 < extra <= len(SPECIAL_TOKENS) and all(sd[k].shape == (cfg.vocab_size, cfg.d_model)
                                                 for k in ("embed.weight", "lm_head.weight")):
        for k in ("embed.weight", "lm_head.weight"):
            sd[k] = torch.cat([sd[k], sd[k].mean(0, keepdim=True).expand(extra, -1)])  # (vocab + extra, C)
        cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + extra)
    return sd, cfg


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


def load_gguf(path):
    """A llama.cpp GGUF file of the llama or qwen2 architecture -> our checkpoint dict, weights dequantised to
    fp32; the tokenizer is the file's own (its spec is the path: `gguf_encoding`)."""
    meta, tensors = read_gguf(path)
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise UserError(f"{path}: GGUF architecture {_show(arch)} is not one we load (llama, qwen2)")
    if meta.get(f"{arch}.rope.scaling.type", "none") not in ("none", "linear") or \
            meta.get(f"{arch}.rope.scaling.factor", 1.0) != 1.0:
        raise UserError(f"{path}: RoPE scaling {_show(meta.get(f'{arch}.rope.scaling.type'))} is not implemented")
    if "token_embd.weight" not in tensors:
        raise UserError(f"{path}: GGUF has no token_embd.weight")
    n_layer = _gguf_int(path, meta, f"{arch}.block_count", SIZE_LIMITS["n_layer"])
    d = _gguf_int(path, meta, f"{arch}.embedding_length", SIZE_LIMITS["d_model"])
    n_head = _gguf_int(path, meta, f"{arch}.attention.head_count", SIZE_LIMITS["n_head"])
    n_kv = _gguf_int(path, meta, f"{arch}.attention.head_count_kv", SIZE_LIMITS["n_kv_head"], n_head)
    if meta.get(f"{arch}.attention.key_length", d // max(n_head, 1)) * n_head != d:
        raise UserError(f"{path}: head size {meta[f'{arch}.attention.key_length']} != embedding_length / heads "
                        f"is not implemented")
    cfg = config_from_dict(dict(
        arch="llama", vocab_size=tensors["token_embd.weight"].shape[0], n_layer=n_layer, n_head=n_head,
        n_kv_head=n_kv, d_model=d, d_ff=_gguf_int(path, meta, f"{arch}.feed_forward_length", SIZE_LIMITS["d_ff"]),
        max_seq_len=_gguf_int(path, meta, f"{arch}.context_length", SIZE_LIMITS["max_seq_len"], 2048),
        norm_eps=meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta.get(f"{arch}.rope.freq_base", 10000.0), qkv_bias="blk.0.attn_q.bias" in tensors,
        tie_embeddings="output.weight" not in tensors), path)
    if len(_layer_ids(tensors, "blk")) != cfg.n_layer:
        raise UserError(f"{path}: block_count is {cfg.n_layer} but the file holds {len(_layer_ids(tensors, 'blk'))} "
                        f"blocks")
    sd = {"embed.weight": tensors["token_embd.weight"], "norm.weight": tensors.get("output_norm.weight")}
    sd["lm_head.weight"] = tensors.get("output.weight", sd["embed.weight"])
    for name, t in tensors.items():
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in GGUF_NAMES:
            heads = {"attn_q": n_head, "attn_k": n_kv}.get(parts[2])
            if arch == "llama" and heads and t.shape[0] % (2 * heads) == 0:
                t = unpermute_qk(t, heads)
            sd[f"blocks.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"] = t
    sd = {k: torch.from_numpy(v.copy()) for k, v in sd.items() if v is not None}
    sd, cfg = add_special_rows(sd, cfg, _tokenizer_of(os.path.abspath(path), path))
    return {"model": sd, "config": asdict(cfg), "tokenizer": os.path.abspath(path), "step": 0, "args": {},
            "metrics": {}, "format": "fp32", "lineage": [f"gguf:{os.path.basename(path)}"]}


def _byte_decoder():
    """GPT-2's byte-level BPE writes each byte as a printable character: that table, inverted (char -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


# the pre-tokenizer names llama.cpp writes (tokenizer.ggml.pre) -> the split pattern, as one regex
GGUF_PATTERNS = {
    "gpt2": GPT2_PATTERN,
    # SmolLM: digits split one by one, then GPT-2's rule; as one regex, a whitespace run before a digit stays whole
    "smollm": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+""",
    "llama-bpe": CL100K_PATTERN,
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
             r"""|\s+(?!\S)|\s+""",
}


def gguf_vocab(path, meta):
    """GGUF tokenizer metadata (byte-level BPE, tokenizer.ggml.model "gpt2") -> (ranks {bytes: id}, specials
    {str: id}, split regex). tiktoken merges by the rank of the merged token, the file by its merge list:
    the two agree when merged tokens' ids rise in merge order, which is checked."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        kind = "SentencePiece (Llama-2, Mistral, Gemma)" if model == "llama" else _show(model)
        raise UserError(f"{path}: tokenizer {kind} is not implemented: only byte-level BPE (GPT-2, SmolLM, Qwen2, "
                        f"Llama-3) is")
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in GGUF_PATTERNS:
        raise UserError(f"{path}: pre-tokenizer {_show(pre)} is not one we know ({', '.join(GGUF_PATTERNS)})")
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")
    merges = meta.get("tokenizer.ggml.merges", [])
    if not isinstance(tokens, list) or not isinstance(types, list) or len(tokens) != len(types):
        raise UserError(f"{path}: GGUF tokenizer.ggml.tokens / token_type missing or of different lengths")
    decode = _byte_decoder()
    ranks, specials = {}, {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind in (3, 4):  # control, user-defined: matched whole, never merged
            specials[tok] = i
        else:
            try:
                ranks[bytes(decode[c] for c in tok)] = i
            except KeyError:
                raise UserError(f"{path}: token {i} {tok!r} is not byte-level BPE text")
    merged = [ranks.get(bytes(decode.get(c, 256) for c in m.replace(" ", "")) if all(c in decode for c in
                                                                                    m.replace(" ", "")) else None)
              for m in merges if isinstance(m, str)]
    if len(merged) != len(merges) or None in merged or any(a >= b for a, b in zip(merged, merged[1:])):
        raise UserError(f"{path}: token ids do not follow the merge order; such vocabularies are not implemented")
    return ranks, specials, GGUF_PATTERNS[pre]


def gguf_encoding(path):
    """The tokenizer stored in a GGUF file as a tiktoken Encoding named by the path; ChatML special tokens it lacks
    (often <|pad|>) follow its last id, as for any tokenizer (common.get_tokenizer)."""
    meta, _ = read_gguf(path, tensors=False)
    ranks, specials, pattern = gguf_vocab(path, meta)
    first = max([*ranks.values(), *specials.values()]) + 1
    for tok in SPECIAL_TOKENS:
        if tok not in specials:
            specials[tok] = first
            first += 1
    missing = [b for b in range(256) if bytes([b]) not in ranks and b not in (0xC0, 0xC1) and b < 0xF5]
    if not missing:
        return tiktoken.Encoding(name=os.path.abspath(path), pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens=specials)
    if any(0x80 <= b < 0xC2 for b in missing):
        raise UserError(f"{path}: the vocabulary lacks UTF-8 continuation bytes {missing}; not implemented")
    unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
    return UnknownBytes(name=os.path.abspath(path), pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials,
                        missing=missing, unk=unk)


def _chars_with_lead(b):
    """The characters whose UTF-8 encoding starts with byte b, as a regex character range."""
    if b < 0x80:
        return re.escape(chr(b))
    lo = (b - 0xC0) << 6 if b < 0xE0 else (b - 0xE0) << 12 if b < 0xF0 else (b - 0xF0) << 18
    size = 1 << (6 if b < 0xE0 else 12 if b < 0xF0 else 18)
    lo = max(lo, 0x80 if b < 0xE0 else 0x800 if b < 0xF0 else 0x10000)
    return f"{re.escape(chr(lo))}-{re.escape(chr(min(lo + size - 1, 0x10FFFF)))}"


class UnknownBytes(tiktoken.Encoding):
    """A byte-level BPE vocabulary without some single bytes (SmolLM2 has no token for 6 ASCII control characters
    and 2 rare 4-byte lead bytes), which tiktoken cannot encode: a character holding such a byte is cut out of the
    text and becomes its bytes' ids, a missing byte the file's unknown-token id; the text around it is encoded as
    if the character were a word break."""

    def __init__(self, *, missing, unk, **kwargs):
        super().__init__(**kwargs)
        self._bad = re.compile("[" + "".join(_chars_with_lead(b) for b in missing) + "]")
        self._unk = unk
        self._byte_id = {b: self._mergeable_ranks[bytes([b])] for b in range(256)
                         if bytes([b]) in self._mergeable_ranks}

    def encode_ordinary(self, text):
        out, last = [], 0
        for m in self._bad.finditer(text):
            out += super().encode_ordinary(text[last:m.start()])
            out += [self._byte_id.get(b, self._unk) for b in m.group().encode("utf-8")]
            last = m.end()
        return out + super().encode_ordinary(text[last:])
