"""
formats.py: other people's files in and out. Imported lazily by common.load_checkpoint, common.get_tokenizer and
the callers of export_hf, so a script that never meets a Hugging Face directory never reads this file.

  `.safetensors` + a sibling `.json` (config, tokenizer name): `save_safetensors`, `load_safetensors`.
  Hugging Face directories of the GPT-2, Llama and Qwen2 families: `load_hf_dir` (config.json checked before
  any arithmetic on its sizes; the tokenizer from tokenizer.json), `export_hf` (a directory that
  `transformers.AutoModelForCausalLM` and `AutoTokenizer` load, chat template and generation config included;
  a quantised model's linears in the compressed-tensors format that vLLM serves with compressed=True).
  Byte-level BPE vocabularies of real models (tokenizer.json here, GGUF metadata in gguf_file.py) as tiktoken
  Encodings: `file_vocab`, `byte_level_encoding`; and back out: `tokenizer_json`, `write_tokenizer`.
  GGUF weights are read by gguf_file.py.
"""

import dataclasses
import json
import os
import re
import unicodedata
from dataclasses import asdict

import tiktoken
import torch

from common import (CHAT_TEMPLATES, GPT2_PATTERN, SIZE_LIMITS, SPECIAL_TOKENS, TEMPLATE_TOKENS, UserError,
                    _check_size, _layer_ids, _one_line, _show, _tokenizer_of, atomic_write, config_from_dict,
                    chat_style, end_id, parse_json, special_id)
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
    if hc.get("quantization_config") is not None:
        qc = hc["quantization_config"]
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        raise UserError(f"{path}: a quantised Hugging Face directory ({_show(method)}); this project reads float ones "
                        "(quantize.py's own checkpoints are the .pt it writes beside --export-hf)")
    rope = hc.get("rope_parameters") or hc.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise UserError(f"{cfg_path}: rope_parameters / rope_scaling is {_show(rope)}, expected an object")
    if family == "gpt2" and hc.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{path}: unsupported GPT-2 activation {_show(hc['activation_function'])}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if family == "llama" and rope_type not in ("default", "llama3"):
        raise UserError(f"{path}: RoPE scaling {_show(rope_type)} is not implemented (only 'default' and 'llama3')")
    llama3 = family == "llama" and rope_type == "llama3"
    for key in ("factor", "low_freq_factor", "high_freq_factor") if llama3 else ():
        if key not in rope:
            raise UserError(f"{cfg_path}: llama3 RoPE scaling without {key!r}")
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
        d, nh, max_len = hc["hidden_size"], hc["num_attention_heads"], hc.get("max_position_embeddings") or 2048
        scaling = {} if not llama3 else dict(  # no original length: transformers takes max_position_embeddings
            rope_scaling_factor=rope["factor"], rope_low_freq_factor=rope["low_freq_factor"],
            rope_high_freq_factor=rope["high_freq_factor"],
            rope_original_max_len=rope.get("original_max_position_embeddings", max_len))
        cfg = config_from_dict(dict(
            arch="llama", vocab_size=hc["vocab_size"], n_layer=hc["num_hidden_layers"], n_head=nh,
            n_kv_head=hc.get("num_key_value_heads") or nh, d_model=d, d_ff=hc["intermediate_size"],
            max_seq_len=max_len, norm_eps=hc.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hc.get("rope_theta", 10000.0)), qkv_bias=mt == "qwen2",
            head_dim=0 if hc.get("head_dim") in (None, d / nh) else hc["head_dim"],  # 0: the default, as we save it
            tie_embeddings=bool(hc.get("tie_word_embeddings", False)), **scaling), cfg_path)
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
    tokenizer, template = _hf_tokenizer(path, mt)
    sd, cfg = add_special_rows(sd, cfg, _tokenizer_of(tokenizer, path, template))
    return {"model": sd, "config": asdict(cfg), "tokenizer": tokenizer, "chat_template": template, "step": 0,
            "args": {}, "metrics": {}, "format": "fp32",
            "lineage": [f"hf:{os.path.basename(os.path.normpath(path))}"]}


def _hf_tokenizer(path, model_type):
    """The tokenizer of an HF directory -> (spec, chat template name or None for the file's own). Ours first
    (tokenizer.json.posttrain, beside every export_hf: the spec and template we trained with), then tokenizer.json,
    then a .tiktoken ranks file; GPT-2 without any is GPT-2's own BPE."""
    marker = os.path.join(path, "tokenizer.json.posttrain")
    if os.path.exists(marker):
        ours = _read_json(marker)
        return ours.get("tokenizer"), ours.get("chat_template")
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return os.path.abspath(os.path.join(path, "tokenizer.json")), None
    ranks = sorted(f for f in os.listdir(path) if f.endswith(".tiktoken"))
    if ranks:
        return os.path.join(path, ranks[0]), None
    if model_type == "gpt2":
        return "gpt2", None
    if os.path.exists(os.path.join(path, "tokenizer.model")):
        raise UserError(f"{path}: tokenizer.model is a SentencePiece tokenizer (Llama-2, Mistral, Gemma): not "
                        f"implemented; only byte-level BPE (tokenizer.json, .tiktoken) is")
    raise UserError(f"{path}: no tokenizer we can read (need tokenizer.json or a .tiktoken ranks file)")


def add_special_rows(sd, cfg, enc):
    """Rows for the special tokens a released model lacks (SPECIAL_TOKENS and its template's: GPT-2's 50257 ids have
    none of them, SmolLM2 has no <|pad|>): embedding and head rows at the mean embedding. Rows of any other shape
    are left for load_model to report against the config. -> (state dict, config)."""
    extra = enc.n_vocab - cfg.vocab_size
    fits = all(sd[k].shape == (cfg.vocab_size, cfg.d_model) for k in ("embed.weight", "lm_head.weight"))
    if 0 < extra <= len(SPECIAL_TOKENS) + max(map(len, TEMPLATE_TOKENS.values())) and fits:
        for k in ("embed.weight", "lm_head.weight"):
            sd[k] = torch.cat([sd[k], sd[k].mean(0, keepdim=True).expand(extra, -1)])  # (vocab + extra, C)
        cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + extra)
    return sd, cfg


def export_hf(model, enc, out_dir, compressed=False):
    """Write a Hugging Face directory that transformers' AutoModelForCausalLM (GPT2LMHeadModel for arch gpt2, Qwen2
    if qkv_bias, else Llama) and AutoTokenizer load: config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json (the chat template), generation_config.json (eos = the template's end token). A built-in
    tokenizer's name and the template are also kept in tokenizer.json.posttrain, which load_hf_dir reads first.
    A quantised model is written dequantised; compressed=True writes its packed linears in the compressed-tensors
    format instead (`compressed_tensors`), for vLLM (and transformers with the compressed-tensors package)."""
    raw = getattr(model, "module", model)
    cfg = raw.cfg
    if cfg.head != "lm":
        raise UserError("export_hf writes language models only (this model has a scalar head)")
    if cfg.prefix_len:
        raise UserError(f"export_hf: a {cfg.prefix_kind} adapter ({cfg.prefix_len} learned slots) is a learned start of "
                        "the KV cache, not a weight, so it does not merge into a Hugging Face model; our checkpoint "
                        "(.pt) keeps it")
    quant = compressed and compressed_scheme(raw)  # refusals before any work
    hf = ours_to_hf(plain_state_dict(raw, dense=True), cfg)  # a quantised model exports dequantised
    if cfg.arch == "gpt2":
        hc = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
                  n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                  n_inner=cfg.d_ff, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=cfg.tie_embeddings)
    else:
        mt = "qwen2" if cfg.qkv_bias else "llama"
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        if cfg.rope_scaling_factor != 1.0:
            rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor, low_freq_factor=cfg.rope_low_freq_factor,
                        high_freq_factor=cfg.rope_high_freq_factor,
                        original_max_position_embeddings=cfg.rope_original_max_len)
        hc = dict(model_type=mt, architectures=["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
                  vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                  max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                  rope_parameters=rope, head_dim=cfg.head_size, hidden_act="silu",
                  tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, torch_dtype="float32")
    ids = dict(bos_token_id=special_id(enc, _bos_token(enc)), eos_token_id=end_id(enc),
               pad_token_id=special_id(enc, "<|pad|>"))
    hc.update(ids)
    if compressed:
        hf, hc["quantization_config"] = compressed_tensors(raw, hf, quant)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, "model.safetensors"), lambda f: f.write(_safetensors_bytes(hf)))
    write_tokenizer(enc, out_dir, cfg.max_seq_len)
    files = [("config.json", hc), ("generation_config.json", ids)]
    if enc.name in ("byte", "gpt2"):  # a path would tie the export to a file outside it: its tokenizer.json stands
        files.append(("tokenizer.json.posttrain", {"tokenizer": enc.name, "chat_template": enc.chat_template}))
    for name, obj in files:
        _write_json(os.path.join(out_dir, name), obj)


# -----------------------------------------------------------------------------
# compressed-tensors (what llm-compressor writes and vLLM serves): quantize.py's formats in a Hugging Face directory
#
# Every quantised linear keeps its own numbers, re-laid out; config.json's "quantization_config" says how to read
# them (one config group for the blocks' linears; the head, never quantised by us, is in "ignore").
#   int weight-only (rtn / gptq / awq, any group size that divides the rows; format "pack-quantized"):
#     weight_packed int32 (out, ceil(in b / 32)): the codes as one little-endian stream of b-bit fields, code j at bit
#       b j (32 codes in b words): our pack_bits bytes read four at a time. compressed-tensors stores signed values
#       q in [-2^(b-1), 2^(b-1)) as q + 2^(b-1), which is our unsigned code itself.
#     weight_scale (out, G) in the model's dtype (fp32: our fp16 steps exactly), weight_shape int64 [out, in];
#     weight_zero_point int32, our zeros packed the same way down each column (shape (ceil(out b / 32), G)), only
#       where the grid is min-max: a symmetric grid's zero 2^(b-1) is their implicit signed 0.
#     w = (q - zp) * scale = (code - zero) * scale: the same weights, bit for bit.
#   fp8 (format "float-quantized"): weight float8_e4m3fn (out, in), our codes; weight_scale fp32 (out, 1) per channel,
#     or (1,) per tensor; the inputs "dynamic", per token (per-channel weights) or per tensor, as ours.


def check_compressible(cfg, group_size):
    """Refuse, before any work, a model compressed-tensors (and the engines reading it) cannot hold quantised."""
    if cfg.arch == "gpt2":
        raise UserError("GPT-2's attention and MLP are Conv1D layers in transformers (weights stored transposed), "
                        "which compressed-tensors does not quantise: export_hf writes this model dense")
    if group_size and (cfg.d_model % group_size or cfg.d_ff % group_size):
        fits = [2 ** k for k in range(10, 4, -1) if 2 ** k < group_size and not (cfg.d_model | cfg.d_ff) % 2 ** k]
        raise UserError(f"group size {group_size} does not divide the linears' inputs ({cfg.d_model}, {cfg.d_ff}): "
                        f"compressed-tensors' groups tile the rows exactly (--group-size {fits[0] if fits else 0} "
                        "does)")


def compressed_scheme(raw):
    """The model's quantize.py settings, if compressed-tensors can hold them, else a UserError saying why."""
    quant = getattr(raw, "quant", None)
    if quant is None or not any(hasattr(m, "qweight") for m in raw.modules()):
        raise UserError("the compressed-tensors export is of a quantised model: quantize.py it first (int weight-only "
                        "or fp8), or export_hf it dense")
    if any(name.endswith(".base") and hasattr(m, "qweight") for name, m in raw.named_modules()):
        raise UserError("LoRA adapters over the quantised layers (QLoRA): merged in, the weights leave the grid; "
                        "export_hf writes the merged model dense")
    if quant["scheme"] == "nf4" or quant["scheme"] == "int" and quant["act_bits"]:
        raise UserError(f"{quant['format']}{' with int8 activations' if quant['act_bits'] else ''}: the "
                        "compressed-tensors export covers int weight-only (rtn, gptq, awq) and fp8 models")
    check_compressible(raw.cfg, quant["group_size"])
    return quant


def pack_int32(codes, bits):
    """codes uint8 (rows, n), each < 2^bits -> int32 (rows, ceil(n bits / 32)): compressed-tensors' pack-quantized
    words (the bit stream of quantize.pack_bits, four bytes a word, little-endian)."""
    from quantize import pack_bits
    rows, n = codes.shape
    b = pack_bits(codes, bits)
    b = torch.cat([b, b.new_zeros(rows, -b.shape[1] % 4)], 1).to(torch.int64).view(rows, -1, 4)  # (rows, words, 4)
    w = b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)[:, :-(-n * bits // 32)].contiguous()


def compressed_tensors(raw, hf, quant):
    """hf (ours_to_hf's dense state dict) -> (the state dict with every quantised linear in compressed-tensors'
    tensors, config.json's "quantization_config")."""
    layers = {name: m for name, m in raw.named_modules() if hasattr(m, "qweight")}
    theirs = {f"blocks.{i}.{a}": f"model.layers.{i}.{b}" for i in range(raw.cfg.n_layer) for a, b in LLAMA_NAMES}
    fp8, bits = quant["scheme"] in ("fp8", "fp8-tensor"), quant["bits"]
    symmetric = fp8 or all(bool((m.zeros == 2 ** (bits - 1)).all()) for m in layers.values())
    for name, m in layers.items():
        p = theirs[name]
        del hf[p + ".weight"]
        if fp8:
            hf[p + ".weight"] = m.qweight
            hf[p + ".weight_scale"] = m.scales if quant["scheme"] == "fp8" else m.scales.reshape(1)  # (out, 1), (1,)
            continue
        hf[p + ".weight_packed"] = pack_int32(m.codes(), bits)
        hf[p + ".weight_scale"] = m.scales.float()
        hf[p + ".weight_shape"] = torch.tensor([m.out_features, m.in_features])
        if not symmetric:
            hf[p + ".weight_zero_point"] = pack_int32(m.zeros.t(), bits).t().contiguous()
    if fp8:
        strategy = "channel" if quant["scheme"] == "fp8" else "tensor"
        weights = dict(num_bits=8, type="float", symmetric=True, group_size=None, strategy=strategy, dynamic=False)
        inputs = dict(num_bits=8, type="float", symmetric=True, group_size=None, dynamic=True,
                      strategy="token" if strategy == "channel" else "tensor")
        fmt = "float-quantized"
    else:
        g = quant["group_size"]
        weights = dict(num_bits=bits, type="int", symmetric=symmetric, group_size=g or None,
                       strategy="group" if g else "channel", dynamic=False)
        inputs, fmt = None, "pack-quantized"
    group = dict(targets=["Linear"], weights=weights, input_activations=inputs, output_activations=None, format=fmt)
    return hf, dict(quant_method="compressed-tensors", format=fmt, quantization_status="compressed",
                    config_groups={"group_0": group}, ignore=["lm_head"], kv_cache_scheme=None,
                    global_compression_ratio=None, sparsity_config={}, transform_config={})


def _write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8")))


def _bos_token(enc):
    """The token HF configs name bos: Llama-3's <|begin_of_text|>, else <|endoftext|>."""
    return "<|begin_of_text|>" if chat_style(enc) == "llama3" else "<|endoftext|>"


# -----------------------------------------------------------------------------
# Byte-level BPE vocabularies of real models (tokenizer.json, GGUF) as tiktoken Encodings, and tokenizer.json out


# SmolLM's pre-tokenizer (Digits, then GPT-2's ByteLevel split) as one regex: digits one by one, and a whitespace
# run before a digit stays whole
SMOLLM_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""


def _byte_encoder():
    """GPT-2's byte-level BPE writes each byte as a printable character: byte -> that character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def _byte_decoder():
    return {c: b for b, c in _byte_encoder().items()}


def bpe_ranks(where, vocab, merges):
    """A byte-level BPE vocabulary {token text: id} and its merge list ("a b" strings or [a, b] pairs) -> tiktoken's
    ranks {token bytes: id}. tiktoken merges by the rank of the merged token, the file by its merge list: the two
    agree when merged tokens' ids never fall along the merge list, which is checked."""
    decode = _byte_decoder()
    ranks = {}
    for tok, i in vocab.items():
        try:
            ranks[bytes(decode[c] for c in tok)] = i
        except KeyError:
            raise UserError(f"{where}: token {i} {tok!r} is not byte-level BPE text")
    merged = []
    for m in merges:
        pair = m.split(" ") if isinstance(m, str) else m
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise UserError(f"{where}: merge {_show(m)} is not a pair of tokens")
        merged.append(vocab.get(pair[0] + pair[1]))
    if None in merged or any(a > b for a, b in zip(merged, merged[1:])):
        raise UserError(f"{where}: token ids do not follow the merge order; such vocabularies are not implemented")
    return ranks


def _hf_pattern(where, pre):
    """tokenizer.json's pre_tokenizer -> one split regex, for the byte-level forms real models use: ByteLevel alone
    (GPT-2), Digits + ByteLevel (SmolLM), Split(regex) + ByteLevel (Qwen2, Llama-3)."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") if isinstance(s, dict) else None for s in steps or []]
    if kinds and kinds[-1] == "ByteLevel" and not steps[-1].get("add_prefix_space", False):
        regex = steps[-1].get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            return GPT2_PATTERN
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and regex:
            return SMOLLM_PATTERN
        split = steps[0]
        if kinds == ["Split", "ByteLevel"] and not regex and split.get("behavior") == "Isolated" and \
                not split.get("invert") and isinstance(split.get("pattern", {}).get("Regex"), str):
            return split["pattern"]["Regex"]
    raise UserError(f"{where}: pre-tokenizer {json.dumps(pre)[:80]} is not one we read (ByteLevel, Digits + "
                    f"ByteLevel, Split + ByteLevel)")


def hf_vocab(path):
    """A Hugging Face tokenizer.json (byte-level BPE) and the tokenizer_config.json / chat_template.jinja beside it
    -> file_vocab's (ranks, specials, split regex, chat template text, quirks)."""
    tj = _read_json(path)
    model = tj.get("model") if isinstance(tj.get("model"), dict) else {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE (byte_fallback)" if model.get("byte_fallback") else _show(model.get("type"))
        raise UserError(f"{path}: tokenizer model {kind} is not implemented: only byte-level BPE (GPT-2, SmolLM, "
                        f"Qwen2, Llama-3) is")
    norm = tj.get("normalizer")
    if norm is not None and (not isinstance(norm, dict) or norm.get("type") != "NFC"):
        raise UserError(f"{path}: normalizer {json.dumps(norm)[:60]} is not implemented (none or NFC)")
    added = tj.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(t, dict) and isinstance(t.get("content"), str) and
                                              type(t.get("id")) is int for t in added):
        raise UserError(f"{path}: added_tokens is not a list of {{id, content}} objects")
    specials = {t["content"]: t["id"] for t in added}
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(type(i) is int for i in vocab.values()):
        raise UserError(f"{path}: model.vocab is not an object of token -> id")
    vocab = {tok: i for tok, i in vocab.items() if tok not in specials}
    ranks = bpe_ranks(path, vocab, model.get("merges") or [])
    here = os.path.dirname(path)
    template = None
    if os.path.isfile(os.path.join(here, "chat_template.jinja")):
        with open(os.path.join(here, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    elif os.path.isfile(os.path.join(here, "tokenizer_config.json")):
        template = _read_json(os.path.join(here, "tokenizer_config.json")).get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and
                             t.get("name") == "default"), None)
    unk = model.get("unk_token")
    return (ranks, specials, _hf_pattern(path, tj.get("pre_tokenizer")), template if isinstance(template, str)
            else None, {"unk": vocab.get(unk, specials.get(unk, 0)), "nfc": norm is not None})


def file_vocab(path):
    """A tokenizer.json or GGUF file -> (ranks {bytes: id}, specials {str: id}, split regex, the file's chat
    template text or None, quirks for byte_level_encoding): what common.get_tokenizer builds an Encoding from."""
    if path.endswith(".gguf"):
        import gguf_file
        return gguf_file.gguf_vocab(path)
    return hf_vocab(path)


def byte_level_encoding(name, pattern, ranks, specials, unk=0, nfc=False):
    """A real model's vocabulary as a tiktoken Encoding; a RealVocab where it needs what tiktoken lacks (NFC
    normalisation, single bytes without a token)."""
    missing = [b for b in range(256) if bytes([b]) not in ranks and b not in (0xC0, 0xC1) and b < 0xF5]
    if not missing and not nfc:
        return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    if any(0x80 <= b < 0xC2 for b in missing):
        raise UserError(f"{name}: the vocabulary lacks UTF-8 continuation bytes {missing}; not implemented")
    return RealVocab(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials, missing=missing,
                     unk=unk, nfc=nfc)


def _chars_with_lead(b):
    """The characters whose UTF-8 encoding starts with byte b, as a regex character range."""
    if b < 0x80:
        return re.escape(chr(b))
    lo = (b - 0xC0) << 6 if b < 0xE0 else (b - 0xE0) << 12 if b < 0xF0 else (b - 0xF0) << 18
    size = 1 << (6 if b < 0xE0 else 12 if b < 0xF0 else 18)
    lo = max(lo, 0x80 if b < 0xE0 else 0x800 if b < 0xF0 else 0x10000)
    return f"{re.escape(chr(lo))}-{re.escape(chr(min(lo + size - 1, 0x10FFFF)))}"


class RealVocab(tiktoken.Encoding):
    """tiktoken plus two things real vocabularies need. nfc: text is NFC-normalised first (Qwen2's tokenizer.json).
    missing: single bytes without a token (SmolLM2 has none for 6 ASCII control characters and 2 rare 4-byte lead
    bytes), which tiktoken cannot encode: a character holding such a byte is cut out of the text and becomes its
    bytes' ids, a missing byte the file's unknown-token id; the text around it is encoded as if the character were
    a word break."""

    def __init__(self, *, missing, unk, nfc, **kwargs):
        super().__init__(**kwargs)
        self._bad = re.compile("[" + "".join(_chars_with_lead(b) for b in missing) + "]") if missing else None
        self._unk, self._nfc = unk, nfc
        self._byte_id = {b: self._mergeable_ranks[bytes([b])] for b in range(256)
                         if bytes([b]) in self._mergeable_ranks}

    def encode_ordinary(self, text):
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        if self._bad is None:
            return super().encode_ordinary(text)
        out, last = [], 0
        for m in self._bad.finditer(text):
            out += super().encode_ordinary(text[last:m.start()])
            out += [self._byte_id.get(b, self._unk) for b in m.group().encode("utf-8")]
            last = m.end()
        return out + super().encode_ordinary(text[last:])


# The Jinja text of each CHAT_TEMPLATES entry, written into an export's tokenizer_config.json. smollm2's is the
# model's own, character for character; qwen2.5's is Qwen2.5's without its tool-calling branches; llama3's is
# Llama-3-Instruct's.
def _chatml_jinja(system):
    default = ("{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n" + system +
               "<|im_end|>\n' }}{% endif %}") if system else ""
    return ("{% for message in messages %}" + default + "{{'<|im_start|>' + message['role'] + '\n' + "
            "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|im_start|>assistant\n' }}{% endif %}")


TEMPLATE_JINJA = {
    "chatml": _chatml_jinja(""),
    "smollm2": _chatml_jinja(CHAT_TEMPLATES["smollm2"][1]),
    "qwen2.5": ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
                "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\n" + CHAT_TEMPLATES["qwen2.5"][1] +
                "<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and "
                "loop.first) %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
                "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
                "{%- endif %}"),
    "llama3": ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
}


def tokenizer_json(enc):
    """enc -> a tokenizer.json object the `tokenizers` library reads and that encodes as enc does: enc's split regex
    (Split, Isolated), ByteLevel without its own regex, and BPE with tiktoken's semantics: a pre-token that is a
    token is taken whole (ignore_merges), else every split of a token into two tokens is a merge, ranked by the
    merged token's id."""
    ranks = enc._mergeable_ranks
    show = _byte_encoder()
    text = {b: "".join(show[c] for c in b) for b in ranks}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        pairs = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        merges += [f"{text[a]} {text[b]}" for a, b in sorted(pairs, key=lambda p: (ranks[p[0]], ranks[p[1]]))]
    specials = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
    # Specials among the ordinary ids (SmolLM2's 0-16) go in the BPE vocabulary too, as in the model's own file:
    # `tokenizers` numbers an added token missing from it after the vocabulary. Those after it (ours, appended)
    # stay out: under the byte tokenizer's split, a pre-token spelling one would be taken whole as it
    inside = [(t, i) for t, i in specials if i < max(ranks.values())]
    unk = [(t, i) for t, i in inside if i == getattr(enc, "_unk", None) and getattr(enc, "_bad", None)]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in specials],
        "normalizer": {"type": "NFC"} if getattr(enc, "_nfc", False) else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk[0][0] if unk else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": True,
                  "vocab": {**{text[b]: r for b, r in ranks.items()}, **dict(inside)}, "merges": merges},
    }


def write_tokenizer(enc, out_dir, max_len):
    """tokenizer.json, and tokenizer_config.json with the chat template and its special tokens, into out_dir:
    what `AutoTokenizer.from_pretrained(out_dir)` needs (GGUF export writes the same vocabulary as metadata)."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE_JINJA[enc.chat_template],
              "bos_token": _bos_token(enc), "eos_token": TEMPLATE_TOKENS[chat_style(enc)][-1], "pad_token": "<|pad|>",
              "unk_token": None, "model_max_length": max_len, "clean_up_tokenization_spaces": False}
    _write_json(os.path.join(out_dir, "tokenizer.json"), tokenizer_json(enc))
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
