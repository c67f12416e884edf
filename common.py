"""
common.py: the plumbing every script shares, written once.

In reading order:
  1. Tokenizer and chat template: tiktoken Encodings (`byte`, `gpt2`, any `.tiktoken` ranks file, a real model's
     tokenizer.json or GGUF vocabulary through formats.py), the special tokens declared once, the chat templates
     we reproduce (ChatML; SmolLM2's and Qwen2.5's, ChatML with a default system prompt; Llama-3's), recognised
     from a model's own template text, `render_chat -> (ids, mask)`, reward-model scores of responses.
  2. Checkpoints: atomic `save_checkpoint`; `load_checkpoint` / `load_model` of our `ckpt.pt` (every size and
     shape checked before anything is built), or through formats.py a `.safetensors` + JSON or a Hugging Face
     GPT-2 / Llama / Qwen2 directory.
  3. Data: JSONL loading that validates every line and reports `file:line: what is wrong`, user functions
     (`file.py:fn`), truncation, padding and packing.
  4. Training plumbing: device / dtype, DDP, the dataclass CLI, errors and signals, resume, LR schedule,
     optimiser, JSONL log, RNG.

    python common.py --show-chat      # render a chat and colour the tokens the loss is on
"""

import argparse
import ast
import base64
import bisect
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import pickle
import shutil
import signal
import sys
from dataclasses import asdict, fields

import tiktoken
import torch
from tqdm import tqdm

from model import (Config, Transformer, UserError, apply_lora, apply_prefix, last_token_values, lora_state_dict,
                   pad_left, plain_state_dict)


HERE = os.path.dirname(os.path.abspath(__file__))


class Interrupted(Exception):
    """Ctrl-C or SIGTERM seen at a step boundary under --save-on-interrupt, after the checkpoint was saved.
    `run()` prints it on one line and exits with 130, the shell's code for an interrupted command."""


# -----------------------------------------------------------------------------
# Tokenizer and chat template


SPECIAL_TOKENS = [
    "<|endoftext|>",  # document separator in raw-text training (GPT-2's own id 50256 under the gpt2 encoding)
    "<|im_start|>",  # ChatML: opens a turn, followed by the role and a newline
    "<|im_end|>",  # ChatML: closes a turn; the model learns to emit it to stop
    "<|pad|>",  # fills batches; always masked out, never trained on
]
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# the cl100k / Llama-3 split pattern, the default for other ranks files
CL100K_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# The chat templates we reproduce exactly: name -> (turn format, default system prompt, put first when a chat has
# no system message; "" for none). A real model's own template is recognised from its text (recognise_template).
CHAT_TEMPLATES = {
    "chatml": ("chatml", ""),  # ours: <|im_start|>{role}\n{content}<|im_end|>\n
    "smollm2": ("chatml", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    "qwen2.5": ("chatml", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    # Llama-3: <|begin_of_text|>, then <|start_header_id|>{role}<|end_header_id|>\n\n{content, stripped}<|eot_id|>
    "llama3": ("llama3", ""),
}
# the special tokens of each turn format, beside SPECIAL_TOKENS; the last one ends a turn (the stop to learn)
TEMPLATE_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>"),
                   "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}


def recognise_template(text):
    """A model's own chat template (its Jinja text, or None) -> a CHAT_TEMPLATES name. No template is ChatML; a
    ChatML one is told apart by its default system prompt. Any other is rendered as ChatML, with a note on stderr:
    `sft.py --template NAME` picks one (and the checkpoint keeps it)."""
    if not text:
        return "chatml"
    if "<|start_header_id|>" in text and "<|eot_id|>" in text and "Cutting Knowledge" not in text:
        return "llama3"
    if "<|im_start|>" in text and "<|im_end|>" in text:
        return next((name for name, (_, system) in CHAT_TEMPLATES.items() if system and system in text), "chatml")
    print(f"note: the model's chat template is not one we reproduce ({', '.join(CHAT_TEMPLATES)}): rendering "
          f"ChatML; sft.py --template NAME picks another", file=sys.stderr)
    return "chatml"


def read_ranks(path):
    """A `.tiktoken` ranks file: one `base64(token) rank` per line."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:  # binascii.Error is a ValueError too (e.g. a SentencePiece tokenizer.model is not a ranks file)
                if len(parts) != 2:
                    raise ValueError("wrong number of fields")
                ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
            except ValueError:
                raise UserError(f"{path}:{lineno}: expected 'base64-token rank' (not a .tiktoken ranks file?)")
    return ranks


def get_tokenizer(spec="byte", template=None):
    """'byte' (256 byte tokens, fully offline), 'gpt2' (GPT-2's BPE from data/gpt2.tiktoken), a path to a
    `.tiktoken` ranks file, a Hugging Face `tokenizer.json` or a GGUF file (their own vocabulary, special tokens
    and chat template). SPECIAL_TOKENS and the template's tokens a vocabulary lacks follow its last id.

    template: a CHAT_TEMPLATES name; None takes the file's own, else ChatML. The Encoding's name is the spec and
    its `chat_template` the template's name, so `get_tokenizer(enc.name, enc.chat_template)` rebuilds it
    (checkpoints store both). Built once per spec, template and file version: loading a model asks for its
    tokenizer more than once (the file's reader, then load_dense), and so do scripts that load several models."""
    if template is not None and template not in CHAT_TEMPLATES:
        raise UserError(f"unknown chat template {template!r}: choose from {', '.join(CHAT_TEMPLATES)}")
    stat = os.stat(spec) if spec not in ("byte", "gpt2") and os.path.isfile(spec) else None
    return _build_tokenizer(spec, template, stat and (stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _build_tokenizer(spec, template, version):
    own_template, specials, quirks = None, {}, None
    if spec == "byte":
        ranks, pattern = {bytes([i]): i for i in range(256)}, r"[\s\S]{1,256}"
    elif spec == "gpt2":  # GPT-2's own <|endoftext|> id
        ranks, pattern = read_ranks(os.path.join(HERE, "data", "gpt2.tiktoken")), GPT2_PATTERN
        specials = {"<|endoftext|>": 50256}
    elif spec.endswith((".gguf", "tokenizer.json")) and os.path.isfile(spec):
        import formats  # a GGUF file or tokenizer.json carries its own vocabulary, special tokens and template
        ranks, specials, pattern, own_template, quirks = formats.file_vocab(spec)
    elif os.path.isfile(spec):
        ranks, pattern = read_ranks(spec), CL100K_PATTERN
    else:
        raise UserError(f"unknown tokenizer {spec!r}: use 'byte', 'gpt2', a .tiktoken ranks file, a tokenizer.json "
                        f"or a .gguf file")
    name = template or recognise_template(own_template)
    first = max([*ranks.values(), *specials.values()]) + 1
    for tok in SPECIAL_TOKENS + list(TEMPLATE_TOKENS[CHAT_TEMPLATES[name][0]]):
        if tok not in specials:
            specials[tok] = first
            first += 1
    if quirks is None:
        enc = tiktoken.Encoding(name=spec, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    else:  # a real model's vocabulary may need what tiktoken lacks
        import formats
        enc = formats.byte_level_encoding(spec, pattern, ranks, specials, **quirks)
    enc.chat_template = name
    return enc


def special_id(enc, token):
    return enc.encode_single_token(token)


def chat_style(enc):
    """The turn format of enc's chat template: "chatml" or "llama3" (CHAT_TEMPLATES)."""
    return CHAT_TEMPLATES[enc.chat_template][0]


def end_id(enc):
    """The token that ends a turn in enc's chat template (<|im_end|>, Llama-3's <|eot_id|>): a chat's stop."""
    return special_id(enc, TEMPLATE_TOKENS[chat_style(enc)][-1])


def stop_ids(enc, chat_template):
    """A chat stops at its template's end token, plain text at the first token holding a newline; both at
    <|endoftext|>."""
    stops = [special_id(enc, "<|endoftext|>")]
    if chat_template:
        return stops + [end_id(enc)]
    specials = {special_id(enc, t) for t in enc.special_tokens_set}
    return stops + [t for t in range(enc.n_vocab) if t not in specials and b"\n" in enc.decode_single_token_bytes(t)]


def never_sampled(enc, vocab_size, stop_ids):
    """The ids a sampler must never emit: every special token that is not one of this generation's stops, and the
    rows of a vocabulary padded beyond the tokenizer's ids. So `<|pad|>` is never sampled (a sampled pad could not
    be told from padding), a response never opens a turn with `<|im_start|>`, and `<|endoftext|>` ends a response
    only where the caller makes it a stop (evaluate.py does; a chat policy in training stops at its end token)."""
    specials = {special_id(enc, t) for t in enc.special_tokens_set} - set(stop_ids)
    return sorted(specials) + list(range(enc.n_vocab, vocab_size))


def parse_init(spec):
    """--init PRESET[:field=value,...] -> (preset, {field: int}) over model.Config's whole-number fields."""
    preset, _, rest = spec.partition(":")
    sizes = {f.name for f in fields(Config) if f.type is int or f.type == "int"}
    out = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in sizes or not value.strip().isdigit():
            raise UserError(f"--init {spec}: {item!r} is not field=number for one of {', '.join(sorted(sizes))}")
        out[key] = int(value)
    return preset, out


def is_dcp(path):
    """Is path a sharded checkpoint (a torch.distributed.checkpoint directory, parallel.py's --fsdp output)?"""
    return os.path.isfile(os.path.join(path, ".metadata"))


def tokenizers_differ(a, b):
    """Why two tokenizers would not give the same ids (None if they do): size, any id's bytes, the split pattern
    (a probe text), the chat template."""
    def token(enc, i):
        try:
            return enc.decode_single_token_bytes(i)
        except KeyError:  # an unused id in a real vocabulary's numbering
            return None
    if a.n_vocab != b.n_vocab:
        return f"{a.n_vocab} vs {b.n_vocab} ids"
    probe = "Hello, World! 12345 in 2024: don't stop...\n\n  ça va? 東京"
    if a.encode_ordinary(probe) != b.encode_ordinary(probe) or any(token(a, i) != token(b, i)
                                                                    for i in range(a.n_vocab)):
        return "the same number of ids, but different tokens"
    if a.chat_template != b.chat_template:
        return f"chat template {a.chat_template} vs {b.chat_template}"
    return None


def _encode_turn(enc, head, body, on):
    """head + body as one text, as a Jinja template renders and a tokenizer then splits it (a pre-token may span
    the two: "\\n" + "\\n..." is one "\\n\\n" token). -> (ids, mask): mask `on` from the first token that reaches
    into the body."""
    ids = enc.encode_ordinary(head + body)
    n_head, end, head_bytes = 0, 0, len(head.encode("utf-8"))
    for t in ids:
        end += len(enc.decode_single_token_bytes(t))
        if end > head_bytes:
            break
        n_head += 1
    return ids, [0] * n_head + [on] * (len(ids) - n_head)


def render_chat(enc, messages, add_generation_prompt=False):
    """messages -> (ids, mask) as lists, in enc's chat template (CHAT_TEMPLATES), token for token what the model's
    own Jinja template and tokenizer make (tests/test_hf_tokenizer.py checks it against transformers):
      chatml   `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message; smollm2 and qwen2.5 first add their
               default system message when the chat has none
      llama3   `<|begin_of_text|>`, then `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>`
    mask is 1 on assistant content and its end token (so the model learns to stop), 0 elsewhere and on an
    assistant message with "weight": 0 (context only, as in OpenAI's fine-tuning format). Content is
    encoded with encode_ordinary, so text that spells a special token stays text. add_generation_prompt appends
    the assistant's header for sampling a reply."""
    style, system = CHAT_TEMPLATES[enc.chat_template]
    if system and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + list(messages)
    if add_generation_prompt:
        messages = list(messages) + [{"role": "assistant", "content": None}]
    ids, mask = [], []
    if style == "llama3":
        start, open_end, end = (special_id(enc, t) for t in TEMPLATE_TOKENS["llama3"][1:])
        ids, mask = [special_id(enc, "<|begin_of_text|>")], [0]
    else:
        start, end = (special_id(enc, t) for t in TEMPLATE_TOKENS["chatml"])
    for m in messages:
        on, content = int(m["role"] == "assistant" and m.get("weight", 1) != 0), m["content"]
        if style == "llama3":
            head = [start] + enc.encode_ordinary(m["role"]) + [open_end]
            text, body, tail = "\n\n", (content or "").strip(), []
        else:
            head, text, body, tail = [start], m["role"] + "\n", content or "", enc.encode_ordinary("\n")
        turn_ids, turn_mask = _encode_turn(enc, text, body, on)
        ids += head + turn_ids
        mask += [0] * len(head) + turn_mask
        if content is not None:  # a finished turn: its end token (supervised with the content), then the newline
            ids += [end] + tail
            mask += [on] + [0] * len(tail)
    return ids, mask


def render_plain(enc, messages, add_generation_prompt=False):
    """The no-template ablation: `User: ...\nAssistant: ...\n` as plain text, no special tokens, same
    (ids, mask) contract as render_chat; the assistant's closing newline is its stop signal and is supervised."""
    ids, mask = [], []
    for m in messages:
        head = enc.encode_ordinary(m["role"].capitalize() + ": ")
        body = enc.encode_ordinary(m["content"] + "\n")
        ids += head + body
        mask += [0] * len(head) + [int(m["role"] == "assistant" and m.get("weight", 1) != 0)] * len(body)
    if add_generation_prompt:
        head = enc.encode_ordinary("Assistant: ")
        ids += head
        mask += [0] * len(head)
    return ids, mask


def show_mask(enc, ids, mask, color=None):
    """The chat as text with supervised tokens highlighted (green on a terminal, [[...]] otherwise)."""
    color = sys.stdout.isatty() if color is None else color
    on, off = ("\033[42m", "\033[0m") if color else ("[[", "]]")
    out, prev = [], 0
    for t, m in zip(ids, mask):
        if m != prev:
            out.append(on if m else off)
            prev = m
        out.append(enc.decode_single_token_bytes(t).decode("utf-8", errors="replace"))
    if prev:
        out.append(off)
    return "".join(out)


def render_response(enc, prompt, response):
    """prompt (messages) + response string -> (prompt ids, response ids): the prompt with the assistant's header,
    the response as a sampler would write it after that header, its content and closing end token, not the
    newline after it. These are the tokens a preference loss scores, and the last one is the point where a reward
    model reads its score (TRL also counts that newline; see dpo.py's departures)."""
    prompt_ids, _ = render_chat(enc, prompt, add_generation_prompt=True)
    body = response.strip() if chat_style(enc) == "llama3" else response
    return prompt_ids, enc.encode_ordinary(body) + [end_id(enc)]


@torch.no_grad()
def score_responses(rm, enc, prompts, responses, batch_size=32):
    """Reward-model scores, (N,) fp32: each prompt (message list) + response rendered as a chat, the value read
    at the response's closing `<|im_end|>` (the last real token, never a pad). Used by evaluate.py."""
    device = next(rm.parameters()).device
    pad = special_id(enc, "<|pad|>")
    out = []
    for i in range(0, len(prompts), batch_size):
        seqs = [sum(render_response(enc, p, r), []) for p, r in zip(prompts[i:i + batch_size],
                                                                     responses[i:i + batch_size])]
        seqs = [s[-rm.cfg.max_seq_len:] for s in seqs]  # keep the end: the score is read there
        ids, mask = pad_left(seqs, pad)
        values = rm(ids.to(device), attention_mask=mask.to(device))  # (B, T)
        out.append(last_token_values(values, mask.to(device)).float().cpu())
    return torch.cat(out)


# -----------------------------------------------------------------------------
# Checkpoints


def peak_rss_mb():
    """This process's peak resident memory, MiB: /proc/self/status's VmHWM on Linux (the high-water mark of this
    program's own memory; getrusage's ru_maxrss carries over the parent's peak across fork + exec, so a child of a
    big process would report the parent's), ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**10
    except (OSError, StopIteration, ValueError):
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def atomic_write(path, write):
    """write(file) into a temp file beside `path`, fsync, rename: a crash or a full disk leaves the old file intact,
    and two processes saving to one path leave one of their files whole (each writes its own temp file)."""
    path = os.path.abspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: could not write it ({e.strerror or e}); any earlier version is left intact")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def shares_head(cfg):
    """A language model whose head is its embedding: a checkpoint holds that tensor once, as embed.weight."""
    return cfg.tie_embeddings and cfg.head == "lm"


def save_checkpoint(path, model, enc, step=0, args=None, metrics=None, lineage=(), train_state=None):
    """Our checkpoint schema, plain tensors and values only (loadable with weights_only=True).

    train_state (optimiser, RNG, data position, LoRA tensors) is what --resume needs; it is optional."""
    raw = getattr(model, "module", model)
    sd = plain_state_dict(raw)
    if shares_head(raw.cfg):
        sd.pop("lm_head.weight", None)  # the embedding's copy (plain_state_dict clones, breaking the sharing): tying restores it
    dtype = next(iter(sd.values())).dtype
    ckpt = {
        "model": sd, "config": asdict(raw.cfg), "tokenizer": enc.name,
        "chat_template": enc.chat_template, "step": int(step),
        "args": dict(args or {}), "metrics": dict(metrics or {}),
        "format": DTYPE_NAMES.get(dtype, str(dtype)),
        "lineage": list(lineage),
    }
    masks = weight_masks(raw)  # prune.py's masks: the zeros are kept, whatever training did (LoRA deltas included)
    if masks:
        for name, mask in masks.items():
            sd[name] = sd[name] * mask.to(sd[name].device)
        ckpt["sparsity"] = {**getattr(raw, "sparsity", {}), "masks": {k: pack_mask(m.cpu()) for k, m in masks.items()}}
    quant = getattr(raw, "quant", None)  # quantize.py's settings, while packed layers remain (QLoRA writes them dense)
    if quant is not None and any(k.endswith(".qweight") for k in sd):
        ckpt["format"], ckpt["quant"] = quant["format"], dict(quant)
    if train_state is not None:
        ckpt["train_state"] = train_state
    atomic_write(path, lambda f: torch.save(ckpt, f))


# Far above any released model (Llama 3.1 405B: d_model 16384, d_ff 53248, 126 layers, 128 heads; Gemma 3: 262k
# ids; Llama 4 Scout: 10M positions). A file's config beyond them is corrupt, and sizes are checked before anything
# is built: even load_model's meta-device twin costs milliseconds per layer.
SIZE_LIMITS = {"vocab_size": 2**22, "n_layer": 1024, "n_head": 1024, "n_kv_head": 1024, "d_model": 2**16,
               "d_ff": 2**20, "max_seq_len": 2**24}


def _show(value):
    """repr() for an error message, cut short; an int too long for repr (over 4300 digits raise) by its size."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"a {value.bit_length()}-bit integer"
    return repr(value)[:40]


def _one_line(e, n=120):
    """An exception's message on one line (library messages span several), cut to n characters."""
    return " ".join(str(e).split())[:n]


def _check_size(where, name, value, limit):
    """A model size read from a file: an int (not a bool) from 1 to limit, else a UserError naming it."""
    if type(value) is not int or not 0 < value <= limit:
        raise UserError(f"{where}: {name} = {_show(value)}: expected a whole number from 1 to {limit}")


def config_from_dict(d, where):
    """A config read from a file -> Config. Types and ranges are checked field by field first, so a corrupt value
    is a UserError naming it, not a TypeError or ZeroDivisionError from Config, nor an absurd allocation later."""
    if not isinstance(d, dict):
        raise UserError(f"{where}: 'config' is {_show(d)}, expected a dict of the model's sizes")
    kinds = {f.name: f.type for f in fields(Config)}
    unknown = [k for k in d if k not in kinds]
    if unknown:
        raise UserError(f"{where}: unknown config fields {sorted(map(str, unknown))} "
                        "(not a checkpoint of this project?)")
    d = dict(d)
    for k, v in d.items():
        if k in SIZE_LIMITS or k == "rope_original_max_len":  # a context length, bounded as max_seq_len is
            _check_size(where, k, v, SIZE_LIMITS.get(k, SIZE_LIMITS["max_seq_len"]))
        elif k == "head_dim":  # 0 means d_model // n_head
            if type(v) is not int or not 0 <= v <= SIZE_LIMITS["d_model"]:
                raise UserError(f"{where}: head_dim = {_show(v)}: expected a whole number from 0 (d_model / n_head) "
                                f"to {SIZE_LIMITS['d_model']}")
        elif kinds[k] is float:
            number = type(v) in (int, float) and -1e300 < v < 1e300  # finite; unlike float(), never overflows
            positive = k.startswith("rope_")  # RoPE's base and scaling factors; the other floats are rates, epsilons
            if not number or (v <= 0 if positive else not 0 <= v < 1):
                want = "a positive number" if positive else "a number in [0, 1)"
                raise UserError(f"{where}: {k} = {_show(v)}: expected {want}")
            d[k] = float(v)
        elif type(v) is not kinds[k]:  # the str and bool fields
            raise UserError(f"{where}: {k} = {_show(v)}: expected a {kinds[k].__name__}")
    try:
        cfg = Config(**d)
    except UserError as e:  # Config's own checks (architecture, head, heads dividing d_model) do not know the file
        raise UserError(f"{where}: {e}")
    if cfg.arch == "llama" and cfg.head_size % 2:
        raise UserError(f"{where}: head size {cfg.head_size} (head_dim, else d_model / n_head) is odd: RoPE rotates "
                        "pairs of channels")
    return cfg


def _foreign_globals(path, magic):
    """The Python callables and classes (module.name) that the pickle in `path` (a torch zip's data.pkl, else the
    file itself) names, leaving out torch's own: what weights_only refuses. [] for bytes that are no whole pickle.
    pickletools only parses the opcodes: nothing in the file runs."""
    import pickletools
    import zipfile
    names, strings = [], []
    try:
        if magic.startswith(b"PK"):
            with zipfile.ZipFile(path) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        else:
            with open(path, "rb") as f:
                data = f.read(2**26)
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:  # module and name were pushed just before
                names.append(".".join(strings[-2:]))
            if isinstance(arg, str):
                strings.append(arg)
    except Exception:  # no zip, no data.pkl, a bad opcode or a pickle cut short: no pickle of objects
        return []
    return [n for n in names if not n.startswith("torch.") and n != "collections.OrderedDict"]


def load_checkpoint(path):
    """Read a checkpoint into our dict schema without building the model. Every failure is a UserError."""
    import warnings
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: no such checkpoint")
    if os.path.isdir(path):
        import formats  # lazily: only a Hugging Face directory needs it
        return formats.load_hf_dir(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: not a regular file (a checkpoint is a file or a model directory)")
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
    except OSError as e:
        raise UserError(f"{path}: cannot read the checkpoint ({e.strerror})")
    if not magic:
        raise UserError(f"{path}: empty file (0 bytes), not a checkpoint")
    # llama.cpp's format: b"GGUF", then a uint32 version. torch.load would call it corrupt or a pickle
    if magic[:4] == b"GGUF":
        import gguf_file
        return gguf_file.load_gguf(path)
    if path.endswith(".gguf"):
        raise UserError(f"{path}: not a GGUF file (bad magic {magic[:4]!r}, expected b'GGUF')")
    if path.endswith(".safetensors"):
        import formats
        return formats.load_safetensors(path)
    try:
        with warnings.catch_warnings():  # e.g. on a pickle's protocol: a second stderr line beside our one-line error
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    # random or bit-flipped bytes fail in any way inside the unpickler (UnpicklingError, RuntimeError, EOFError,
    # IndexError, KeyError, struct.error...); the bytes themselves tell refused objects from damage and from junk
    except Exception as e:
        foreign = _foreign_globals(path, magic) if isinstance(e, pickle.UnpicklingError) else []
        if foreign:
            raise UserError(f"{path}: refusing to load: the file holds Python objects, not just tensors "
                            f"(it names {', '.join(sorted(set(foreign))[:3])[:120]})")
        if magic.startswith((b"PK\x03\x04", b"\x80")):  # a torch zip or a pickle: damaged
            detail = str(e).split("WeightsUnpickler error:")[-1]  # torch's text before it is about its defaults
            raise UserError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {_one_line(detail)})")
        raise UserError(f"{path}: not a checkpoint (not a PyTorch file, .safetensors or model directory; it "
                        f"starts with {magic!r})")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path}: not a checkpoint of this project (expected a dict with 'model' and 'config')")
    if not isinstance(ckpt["model"], dict):
        raise UserError(f"{path}: 'model' is {_show(ckpt['model'])}, expected a dict of tensors")
    return ckpt


def load_model(path, device="cpu", head=None):
    """Checkpoint (ckpt.pt, .safetensors + .json, or HF directory) -> (model, tokenizer, ckpt dict), built by the
    loader of its weight format (WEIGHT_FORMATS).

    head="scalar" turns a language model into a reward model / critic with a fresh value head, and back."""
    ckpt = load_checkpoint(path)
    fmt = ckpt.get("format", "fp32")
    family = fmt.split("-")[0] if isinstance(fmt, str) else None  # "int4-g128" is read as "int4" is
    if not isinstance(fmt, str) or (fmt not in WEIGHT_FORMATS and family not in WEIGHT_FORMATS):
        raise UserError(f"{path}: weight format {_show(fmt)} is not one this project reads "
                        f"({', '.join(WEIGHT_FORMATS)})")
    loader = WEIGHT_FORMATS.get(fmt) or WEIGHT_FORMATS[family]
    if isinstance(loader, str):
        module, name = loader.split(":")
        loader = getattr(importlib.import_module(module), name)
    return loader(ckpt, path, device, head)


def load_dense(ckpt, path, device="cpu", head=None):
    """A checkpoint dict of float weights (load_checkpoint's) -> (model, tokenizer, ckpt), every name, dtype and
    shape checked against the config before the model is allocated."""
    cfg, sd, enc = check_weights(ckpt, path, head)
    model = Transformer(cfg)
    try:
        model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # the checks above leave nothing for this; kept so no mismatch is ever a traceback
        raise UserError(f"{path}: weights do not match the config ({_one_line(e, 160)})")
    if "sparsity" in ckpt:  # prune.py's masks, attached to the linears they prune
        set_masks(model, read_masks(ckpt["sparsity"], model, path), ckpt["sparsity"])
    return model.to(device), enc, ckpt


def check_weights(ckpt, path, head=None):
    """A checkpoint dict's float weights against its config -> (config, state dict, tokenizer): every name, dtype
    and shape checked on a meta-device twin of the model, so nothing of a corrupt size is allocated. head changes
    the model's head as load_model's does (the state dict then leaves out the old head)."""
    cfg = config_from_dict(ckpt["config"], path)
    sd = ckpt["model"]
    for k, v in sd.items():
        if not isinstance(k, str):
            raise UserError(f"{path}: model entry {_show(k)}: weight names must be strings")
        if not isinstance(v, torch.Tensor):
            raise UserError(f"{path}: weight {k} is of type {type(v).__name__}, expected a tensor")
        if not v.is_floating_point():  # copied into float weights, ints or bools would load as silent nonsense
            raise UserError(f"{path}: weight {k} holds {v.dtype}, expected floating-point values")
        if v.layout != torch.strided or v.is_meta:
            raise UserError(f"{path}: weight {k} is a {'meta' if v.is_meta else v.layout} tensor, expected a dense one")
    if head is not None and head != cfg.head:
        cfg = dataclasses.replace(cfg, head=head)
        sd = {k: v for k, v in sd.items() if not k.startswith(("lm_head.", "score."))}
    # The weights against a twin of the config built on the meta device (no memory), before the real model: a
    # corrupt size is then a UserError, not an allocation of its size. Blocks are counted first: the twin of a
    # 1000-layer config would take seconds to build
    blocks = _layer_ids(sd, "blocks")
    if len(blocks) != cfg.n_layer:
        raise UserError(f"{path}: weights do not match the config (n_layer={cfg.n_layer}, the weights hold "
                        f"{len(blocks)} blocks)")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    wrong = [k for k in sd if k in expected and tuple(sd[k].shape) != expected[k]]
    if wrong:
        k = wrong[0]
        raise UserError(f"{path}: weights do not match the config ({k} is {list(sd[k].shape)}, the config makes "
                        f"it {list(expected[k])})")
    missing, unexpected = [k for k in expected if k not in sd], [k for k in sd if k not in expected]
    if cfg.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    allowed = {"score.weight", "score.bias", "lm_head.weight"} if head is not None else set()
    missing = [k for k in missing if k not in allowed]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})")
    enc = _tokenizer_of(ckpt.get("tokenizer", "byte"), path, ckpt.get("chat_template"))
    if enc.n_vocab > cfg.vocab_size:
        raise UserError(f"{path}: tokenizer {enc.name!r} has {enc.n_vocab} ids but the model only {cfg.vocab_size}")
    return cfg, sd, enc


# Sparsity masks (prune.py): a pruned linear holds `weight_mask` (a bool buffer, not in the state dict; True = kept).
# Checkpoints carry them under "sparsity": {"method", "pattern", "target", "masks": {weight name: bits}}, eight mask
# entries per byte along the input dimension (bit j of byte k is column 8k + j). Training keeps the zeros: the
# weights are re-masked after every optimiser step (wrap_for_training) and a LoRA delta is masked (LoRALinear.delta).

def pack_mask(mask):
    """(out, in) bool -> (out, ceil(in / 8)) uint8."""
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, -mask.shape[1] % 8)).view(mask.shape[0], -1, 8)
    return (bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_mask(packed, n):
    """pack_mask's inverse: (out, ceil(n / 8)) uint8 -> (out, n) bool."""
    return ((packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten(1)[:, :n].bool()


def read_masks(sparsity, model, path):
    """A checkpoint's "sparsity" entry -> {weight name: (out, in) bool mask}, every name and shape checked against
    the model's linears."""
    masks = sparsity.get("masks") if isinstance(sparsity, dict) else None
    if not isinstance(masks, dict):
        raise UserError(f"{path}: 'sparsity' holds no dict of masks")
    weights = {n + ".weight": m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    out = {}
    for name, packed in masks.items():
        w = weights.get(name)
        if w is None:
            raise UserError(f"{path}: sparsity mask {_show(name)} names no linear weight of the model")
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or \
                tuple(packed.shape) != (w.shape[0], -(-w.shape[1] // 8)):
            raise UserError(f"{path}: sparsity mask {name} is not a uint8 tensor of shape "
                            f"{[w.shape[0], -(-w.shape[1] // 8)]}")
        out[name] = unpack_mask(packed, w.shape[1])
    return out


def set_masks(model, masks, settings=None):
    """Attach {weight name: bool mask} to the model's linears and zero what they prune; settings (method, pattern,
    target) go to model.sparsity, which save_checkpoint writes beside the masks."""
    for name, mask in masks.items():
        module = model.get_submodule(name.removesuffix(".weight"))
        module.register_buffer("weight_mask", mask.to(module.weight.device), persistent=False)
        module.weight.data.mul_(module.weight_mask)
    model.sparsity = {k: v for k, v in (settings or {}).items() if k != "masks"}


def weight_masks(model):
    """{weight name as plain_state_dict names it: bool mask} of the model's pruned linears (LoRA-wrapped or not)."""
    model = getattr(model, "module", model)
    return {n.replace(".base", "") + ".weight": m.weight_mask for n, m in model.named_modules()
            if getattr(m, "weight_mask", None) is not None}


@torch.no_grad()
def apply_masks(model):
    """Zero every pruned weight again (after an optimiser step)."""
    for m in model.modules():
        if getattr(m, "weight_mask", None) is not None:
            m.weight.mul_(m.weight_mask)


# How a checkpoint's weights become a model, by its "format" (else the part before its first "-": "int4-g128" is
# "int4"): our dense floats here, quantize.py's packed integer formats imported only when a file of theirs is
# loaded. Every entry is a function or a "module:function" with load_dense's signature and return value.
WEIGHT_FORMATS = {**{name: load_dense for name in DTYPE_NAMES.values()},
                  **{name: "quantize:load_quantized" for name in ("int8", "int4", "int3", "int2", "nf4", "w8a8")},
                  "adapter": "common:load_adapter"}


def _layer_ids(keys, marker):
    """The layer numbers in weight names: the integers right after a `marker` component ("blocks", "h", "layers")."""
    ids = set()
    for k in keys:
        parts = k.split(".")
        ids.update(int(b) for a, b in zip(parts, parts[1:]) if a == marker and b.isdigit())
    return ids


def _tokenizer_of(spec, where, template=None):
    """get_tokenizer(spec, template) for a spec read from a file: every failure a UserError naming that file."""
    if not isinstance(spec, str):
        raise UserError(f"{where}: tokenizer {_show(spec)} is not a name ('byte', 'gpt2') or a path")
    if template is not None and not isinstance(template, str):
        raise UserError(f"{where}: chat_template {_show(template)} is not a name ({', '.join(CHAT_TEMPLATES)})")
    try:
        return get_tokenizer(spec, template)
    except UserError as e:
        raise UserError(f"{where}: {e}")
    except (OSError, ValueError) as e:  # an unreadable or empty ranks file
        raise UserError(f"{where}: tokenizer {spec!r} unreadable ({_one_line(e)})")


# -----------------------------------------------------------------------------
# Data: validated JSONL, truncation, padding, packing


def as_messages(prompt, where):
    """A prompt is a string (one user turn) or a list of {"role", "content"} messages."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise UserError(f"{where}: 'prompt' must be a string or a non-empty list of messages")
    for m in prompt:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: each message needs a string 'content'")
        if m.get("role") not in ("system", "user", "assistant"):
            raise UserError(f"{where}: message role must be system, user or assistant, got {m.get('role')!r}")
        if "weight" in m and (m["role"] != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool)):
            raise UserError(f"{where}: 'weight' (0 or 1) belongs on assistant messages only, got {m['weight']!r}")
    return [{"role": m["role"], "content": m["content"], **({"weight": m["weight"]} if "weight" in m else {})}
            for m in prompt]


def _check_record(obj, kind, where):
    """Validate one JSONL record of a given kind; raise UserError naming what is wrong."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")

    def need(field, types):
        if field not in obj:
            raise UserError(f"{where}: missing field '{field}'")
        if not isinstance(obj[field], types):
            raise UserError(f"{where}: field '{field}' has the wrong type ({type(obj[field]).__name__})")
        return obj[field]

    if kind == "chat":
        msgs = as_messages(need("messages", list), where)
        if not any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{where}: a chat needs at least one assistant message")
        return {**obj, "messages": msgs}
    if kind == "text":
        need("text", str)
        return obj
    if kind == "mc":
        obj = {**obj, "prompt": obj.get("prompt", obj.get("context"))}
        need("prompt", str)
        choices = need("choices", list)
        if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise UserError(f"{where}: 'choices' must be a list of at least two strings")
        gold = need("gold", int)
        if isinstance(gold, bool) or not 0 <= gold < len(choices):  # JSON true is a Python int too
            raise UserError(f"{where}: 'gold' {gold} is out of range for {len(choices)} choices")
        return obj
    obj = {**obj, "prompt": as_messages(need("prompt", (str, list)), where)}
    if kind == "pref":
        need("chosen", str), need("rejected", str)
        m = obj.get("margin")  # optional: how much better chosen is (reward.py's margin loss)
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m)):
            raise UserError(f"{where}: 'margin' must be a finite number, got {str(m)[:40]!r}")
        c = obj.get("confidence")  # optional soft label: P(chosen is better), dpo.py's per-pair label smoothing
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.5 <= c <= 1):
            raise UserError(f"{where}: 'confidence' must be a number in [0.5, 1], got {str(c)[:40]!r}")
    elif kind == "kto":
        need("completion", str), need("label", bool)
    elif kind == "prompt":
        if obj.get("answer") is not None and not isinstance(obj["answer"], str):
            raise UserError(f"{where}: 'answer' must be a string or null")
    else:
        raise ValueError(f"unknown record kind {kind!r}")
    return obj


def parse_json(raw, where, whole_file=False):
    """JSON text (bytes: a JSONL line, or a whole file such as config.json) -> the value; every way it can be
    unreadable is a UserError. For a whole file the line of a syntax error joins `where` (`path:line:`)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        at = f"{where}:{e.lineno}" if whole_file else where
        raise UserError(f"{at}: invalid JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        raise UserError(f"{where}: invalid JSON (nested too deeply)")
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise UserError(f"{where}: invalid JSON ({str(e)[:80]})")
    try:  # "\ud800" is valid JSON but no valid text: the tokenizer could not encode it later
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{where}: a string holds a lone UTF-16 surrogate (an escape like \\ud800), not valid text")
    return obj


def read_jsonl(path, kind, skip_bad_lines=False):
    """Load and validate a JSONL file. kind: chat | text | pref | kto | prompt | mc.

    A bad line raises UserError("path:line: what is wrong"); with skip_bad_lines it is counted instead and the
    count reported on stderr. Returns the list of records (prompts normalised to message lists). Lines are split
    on b"\\n" (JSON strings cannot hold a raw newline) and decoded one by one, so even a bad byte is reported
    with its line; a UTF-8 byte-order mark at the start of the file is allowed."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such data file")
    with open(path, "rb") as f:
        data = f.read()
    out, bad = [], 0
    for lineno, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            out.append(_check_record(parse_json(raw, where), kind, where))
        except UserError:
            if not skip_bad_lines:
                raise
            bad += 1
    if bad:
        print(f"{path}: skipped {bad} bad lines (--skip-bad-lines)", file=sys.stderr)
    if not out:
        raise UserError(f"{path}: no usable records")
    return out


def read_text(path):
    """Raw text for language-model training, as a list of documents: a .txt file is one document (one stream),
    a .jsonl file one document per {"text"} line."""
    if path.endswith(".jsonl"):
        return [r["text"] for r in read_jsonl(path, "text")]
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such data file")
    with open(path, encoding="utf-8") as f:
        return [f.read()]


def held_out(prompt, frac, seed):
    """Whether a prompt belongs to the held-out split: a hash of (seed, prompt), so every example of one prompt
    lands on the same side and the split does not depend on the file's order."""
    key = f"{seed}:{json.dumps(prompt, sort_keys=True)}".encode()
    return int(hashlib.sha1(key).hexdigest()[:8], 16) / 2**32 < frac


def load_function(spec, flag=""):
    """'path/to/file.py:function' -> the callable, imported from the file path (its folder goes on sys.path, so
    it may import its neighbours). Scorers, verifiers and gold rewards are passed this way (--scorer, --reward)."""
    where = f"{flag} {spec}".strip()
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name:
        raise UserError(f"{where!r}: expected path/to/file.py:function")
    if not os.path.isfile(path):
        raise UserError(f"{where}: no such file {path}")
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    mod_name = "userfn_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(mod_name, path))
    sys.modules[mod_name] = module  # dataclasses and pickling look modules up here
    try:
        module.__loader__.exec_module(module)
    except Exception as e:  # the user's file: any failure to import it is theirs to fix
        raise UserError(f"{path}: failed to import ({type(e).__name__}: {e})")
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"{where}: {path} has no function {name!r}")
    return fn


def call_user(fn, spec, prompts, responses, kind=float, indices=None):
    """fn(prompt, response) for each pair -> a list of `kind` (float or bool), for scorers, verifiers and gold
    rewards given as file.py:fn. Whatever the user's code does wrong (raises, returns a string, None, NaN, a list)
    is a UserError naming the function (`spec`) and the prompt's index (`indices[i]`, default i) in its data."""
    out = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        where = f"{spec}: prompt {indices[i] if indices is not None else i}"
        try:
            v = fn(p, r)
        except Exception as e:  # user code: any exception is theirs, shown with the prompt that caused it
            raise UserError(f"{where}: raised {type(e).__name__}: {str(e)[:120]}")
        if isinstance(v, (str, bytes)) or not hasattr(v, "__float__"):  # bool, int, float, numpy / 0-d tensors pass
            n = f" of {len(v)} values" if hasattr(v, "__len__") and not isinstance(v, (str, bytes)) else ""
            raise UserError(f"{where}: returned {type(v).__name__}{n} {str(v)[:40]!r}, expected one {kind.__name__}")
        try:
            x = float(v)
        except (TypeError, ValueError) as e:  # e.g. a tensor of several values
            raise UserError(f"{where}: returned {type(v).__name__} that is not one number ({str(e)[:80]})")
        if kind is float and not math.isfinite(x):
            raise UserError(f"{where}: returned {x}, expected a finite float")
        out.append(kind(x))
    return out


def pad_right(seqs, pad_value, length=None):
    """Lists -> (B, T) tensor padded on the right with pad_value."""
    T = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s[:T], dtype=torch.long)
    return out


def truncate(prompt_ids, response_ids, max_len):
    """Fit prompt + response into max_len: the prompt loses tokens from the left (its end, nearest the reply,
    is kept), the response from the right (its start is kept). The prompt keeps at least half of max_len if it
    is that long. Returns (prompt, response, truncated)."""
    if len(prompt_ids) + len(response_ids) <= max_len:
        return prompt_ids, response_ids, False
    keep_prompt = min(len(prompt_ids), max(max_len // 2, max_len - len(response_ids)))
    keep_response = max_len - keep_prompt
    return prompt_ids[len(prompt_ids) - keep_prompt:], response_ids[:keep_response], True


def pack(examples, seq_len, pad_id):
    """Pack (ids, mask) examples into rows of seq_len with no cross-example attention.

    Best-fit decreasing bin packing: longest examples first, each into the fullest row that still has room,
    so short examples fill the gaps long ones leave (greedy in-order packing wastes ~25% on chats).
    Returns ids, mask, doc_ids, each (N, seq_len). An example longer than seq_len is cut to seq_len. The first
    token of each document is never a target (it has no prediction inside its document), and pads form their
    own document with mask 0."""
    examples = [(ids[:seq_len], mask[:seq_len]) for ids, mask in examples if len(ids)]  # empty: nothing to place
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    rows, free = [], []  # free: sorted (room left, row index)
    for i in order:
        n = len(examples[i][0])
        j = bisect.bisect_left(free, (n, -1))  # the row with the least room that still fits n tokens
        if j == len(free):
            rows.append([])
            room, r = seq_len, len(rows) - 1
        else:
            room, r = free.pop(j)
        rows[r].append(examples[i])
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    out_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    out_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    out_doc = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for r, docs in enumerate(rows):
        t = 0
        for d, (ids, mask) in enumerate(docs):
            out_ids[r, t:t + len(ids)] = torch.tensor(ids)
            out_mask[r, t:t + len(ids)] = torch.tensor(mask)
            out_mask[r, t] = 0
            out_doc[r, t:t + len(ids)] = d
            t += len(ids)
        out_doc[r, t:] = len(docs)  # the padding tail is a document of its own
    return out_ids, out_mask, out_doc


# -----------------------------------------------------------------------------
# Training plumbing: device, DDP, CLI, schedule, optimiser, logging, RNG


@functools.lru_cache(maxsize=4)
def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def step_indices(step, n, per_step, mine, seed):
    """The examples an optimiser step reads: this rank's slice `mine` of the step's `per_step` positions in a
    stream that is a fresh permutation each epoch, a pure function of (seed, epoch). So the data position is just
    the step number, and resuming continues the same stream."""
    start = step * per_step
    return [epoch_order(n, seed, pos // n)[pos % n] for pos in range(start + mine.start, start + mine.stop)]


def pick_device(spec="auto"):
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device, dtype="auto"):
    """bf16 autocast on GPU by default; fp32 on CPU unless --dtype bf16 asks for it."""
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


def setup_ddp(device_spec="auto"):
    """Under torchrun (RANK in the environment) join the process group: NCCL on GPU, gloo on CPU.
    Returns (rank, world_size, device). Without torchrun: (0, 1, pick_device(device_spec))."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_spec)
    import torch.distributed as dist
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(device_spec)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # a script's main() called by a program that joined already (tests)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce_sum(t):
    """Sum a tensor over DDP ranks (no-op in a single process)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def cleanup_ddp(finished=False):
    """Leave the process group. After a clean finish (`finished`), first collect garbage and wait at a barrier:
    a DDP wrapper still alive at interpreter exit holds the gloo group and aborts the process ("terminate
    called without an active exception"), and a rank that tears down while another still talks to it can too.
    After an error there is no barrier (the other ranks may be gone)."""
    import gc
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        if finished:
            gc.collect()
            dist.barrier()
        dist.destroy_process_group()


def field_docs(cls):
    """The trailing `# comment` of each dataclass field, read from the source: these become --help."""
    docs = {}
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return docs
    for node in ast.parse("\n".join(lines).lstrip()).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = lines[node.lineno - 1]
            if "#" in line:
                docs[node.target.id] = line.split("#", 1)[1].strip()
    return docs


def parse_config(cls, argv=None, description=None):
    """A dataclass -> argparse CLI: `--field-name value` per field, bools as --flag / --no-flag,
    `none` for optional values, and each field's comment as its help."""
    docs = field_docs(cls)
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Field defaults in --help, and the script's docstring kept as written."""

    parser = argparse.ArgumentParser(description=description, formatter_class=Formatter)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = docs.get(f.name, " ").replace("%", "%%")  # argparse %-formats help ("10% of steps" would crash)
        types = [t for t in getattr(f.type, "__args__", (f.type,)) if t is not type(None)]
        base = types[0] if types else str
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            def convert(s, base=base):
                return None if s.lower() == "none" else base(s)
            parser.add_argument(flag, dest=f.name, type=convert, default=default, help=help_, metavar=base.__name__.upper())
    return cls(**vars(parser.parse_args(argv)))


def run(main):
    """Call main(); a UserError becomes one line on stderr and exit code 2, never a traceback; Ctrl-C one line and
    exit code 130."""
    finished = False
    try:
        main()
        finished = True
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted: stopped at once, nothing saved since the last checkpoint "
              "(--save-on-interrupt saves one at the end of the current step)", file=sys.stderr)
        sys.exit(130)
    finally:
        cleanup_ddp(finished)


def check_out(path, model=None):
    """Fail before training, not after it: --out must be a regular file or not exist yet, in a folder where a file
    can be written, on a disk with room for the checkpoint (weights + AdamW's two moments, ~3x the weights)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        raise UserError(f"{path}: --out exists and is not a regular file")
    folder = os.path.dirname(path)
    probe = f"{path}.probe.{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(bytes(4096))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"{path}: cannot write --out there ({e.strerror or e})")
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    if model is not None:
        need = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
        free = shutil.disk_usage(folder).free
        if free < need:
            raise UserError(f"{path}: the checkpoint needs about {need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free")


_STOP = []  # signals seen under --save-on-interrupt
_CATCHING = []  # non-empty once catch_interrupts(True) ran: only then is there anything for interrupted() to ask


def catch_interrupts(enabled):
    """--save-on-interrupt: Ctrl-C (SIGINT) and SIGTERM (a scheduler's pre-emption) no longer stop the process at
    once; they are noted, and the training loop saves at the end of the current step and stops (`interrupted`).
    A second Ctrl-C stops at once. Saving mid-step could write half-updated weights; a step boundary cannot."""
    if not enabled:  # Ctrl-C raises KeyboardInterrupt even when started with SIGINT ignored (`cmd &` in a script)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return

    def note(signum, frame):
        if _STOP:  # the second one: the user means it
            raise KeyboardInterrupt
        _STOP.append(signum)

    signal.signal(signal.SIGINT, note)
    signal.signal(signal.SIGTERM, note)
    _CATCHING.append(True)


def interrupted(device):
    """Whether a signal was noted on any rank (every rank then stops at the same step). Without
    --save-on-interrupt there is nothing to ask, so no all-reduce and no device sync per step."""
    if not _CATCHING:
        return False
    return bool(all_reduce_sum(torch.tensor([float(bool(_STOP))], device=device)).item())


def check_finite(record, keys, last_saved):
    """Stop a diverged run: a loss or gradient norm that is NaN or inf ends it with the step and the last good
    checkpoint (`last_saved`, e.g. "out/sft.pt (step 40)", or None) named, before anything non-finite is saved.
    The metrics are all-reduced, so every rank stops at the same step."""
    bad = [k for k in keys if k in record and not math.isfinite(record[k])]
    if bad:
        raise UserError(f"step {record['step']}: {', '.join(f'{k} is {record[k]}' for k in bad)}; stopped without "
                        f"saving. Last good checkpoint: {last_saved or 'none yet'}. Lower --lr or check the data")


PEFT_KINDS = {  # --peft: the adapter a training script trains over its frozen model (model.py builds them)
    "lora": "LoRA (Hu et al. 2021): W + (alpha / r) B A on every linear of the blocks",
    "dora": "DoRA (Liu et al. 2024): LoRA's direction with a trained magnitude per output row",
    "prefix": "P-tuning v2 (Liu et al. 2022): --peft-len learned keys and values at every layer",
    "prefix-mlp": "prefix-tuning (Li & Liang 2021): the same, trained through an MLP (hidden d_model), folded on save",
    "prompt": "prompt tuning (Lester et al. 2021): --peft-len learned input embeddings",
}


def peft_kind(cfg):
    """The adapter a run trains: --peft, or "lora" where only --lora-rank is given; "" is full fine-tuning."""
    return getattr(cfg, "peft", "") or ("lora" if cfg.lora_rank else "")


def apply_peft(model, kind, lora_rank=0, lora_alpha=0.0, lora_dropout=0.0, rslora=False, peft_len=0):
    """Give the model the adapter `kind` names (PEFT_KINDS; "" leaves it as it is), the base frozen: what
    resume_and_peft does after checking the flags, and what an adapter file is rebuilt with."""
    if kind in ("lora", "dora"):
        apply_lora(model, lora_rank or 8, lora_alpha or None, lora_dropout, dora=kind == "dora", rslora=rslora)
    elif kind:
        apply_prefix(model, peft_len, "prompt" if kind == "prompt" else "prefix",
                     reparam=model.cfg.d_model if kind == "prefix-mlp" else 0)
    return model


def resume_and_peft(model, cfg, train_also=()):
    """--resume and the adapter flags (--peft, --lora-rank, --lora-alpha, --lora-dropout, --rslora, --peft-len), the
    same in every training script -> (start step, train_state or None).

    Full fine-tuning resumes the saved weights; with an adapter the starting model is given it again and its
    trained tensors restored from the train state (the saved weights have LoRA / DoRA merged in, a prefix folded).
    `train_also` names modules trained in full beside the adapters (a reward model's fresh head)."""
    resume, kind = cfg.resume, peft_kind(cfg)
    rank, dropout, rslora = cfg.lora_rank, getattr(cfg, "lora_dropout", 0.0), getattr(cfg, "rslora", False)
    if kind not in ("", *PEFT_KINDS):
        raise UserError(f"--peft {kind}: choose from {', '.join(PEFT_KINDS)}")
    if kind.startswith("prefix") or kind == "prompt":
        if rank:
            raise UserError(f"--peft {kind} trains a prefix, not LoRA adapters: leave out --lora-rank")
        if getattr(cfg, "peft_len", 0) < 1:
            raise UserError(f"--peft {kind} needs --peft-len >= 1 (the number of learned slots)")
        if getattr(cfg, "seq_len", 0) + cfg.peft_len > model.cfg.max_seq_len:
            raise UserError(f"--seq-len {cfg.seq_len} + --peft-len {cfg.peft_len}: the tokens follow the prefix, and "
                            f"together they exceed the model's max_seq_len {model.cfg.max_seq_len}")
    if rslora and kind not in ("lora", "dora"):
        raise UserError("--rslora scales LoRA / DoRA adapters: give --lora-rank or --peft lora / dora")
    state, step = None, 0
    if resume:
        if is_dcp(resume):  # a sharded checkpoint (parallel.py):
            import parallel  # its tensors load after sharding, in wrap_for_training
            ckpt = parallel.read_meta(resume)
        else:
            ckpt = load_checkpoint(resume)
        state, step = ckpt.get("train_state"), ckpt.get("step")
        if not isinstance(state, dict) or not isinstance(step, int) or isinstance(step, bool):
            raise UserError(f"{resume}: no train_state and step to resume from (not written by a training script?)")
        head = ckpt["config"].get("head", "lm") if isinstance(ckpt["config"], dict) else None
        if head != model.cfg.head:
            raise UserError(f"{resume}: a checkpoint with head {_show(head)}, but this run trains a "
                            f"{model.cfg.head!r} head (resume a checkpoint of the same script)")
    quant = getattr(model, "quant", None)
    if quant is not None and not kind:
        raise UserError(f"the model is quantised ({quant['format']}): its packed weights do not train; train LoRA "
                        "adapters over it (--lora-rank 16), as QLoRA does")
    try:  # a checkpoint of another run (other sizes, other --lora-rank) does not fit: say so, not a traceback
        sharded = state is not None and "dcp" in state
        if kind and sharded:
            raise UserError(f"{resume}: a sharded checkpoint of full training; adapters resume from the .pt file")
        if resume and not kind and not sharded:
            tied = {"lm_head.weight": ckpt["model"]["embed.weight"]} if shares_head(model.cfg) else {}
            model.load_state_dict({**tied, **ckpt["model"]})  # a tied head is saved once, as the embedding
        apply_peft(model, kind, rank, cfg.lora_alpha, dropout, rslora, getattr(cfg, "peft_len", 0))
        if kind:
            for name in train_also:
                getattr(model, name).requires_grad_(True)
            if state is not None:
                model.load_state_dict(state["lora"], strict=False)
    except (RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"{resume}: does not fit the model being trained, resume with the flags of the run that "
                        f"wrote it ({' '.join(str(e).split())[:120]})")
    return step, state


def base_fingerprint(model, adapter_names):
    """sha256 of a model's tensors but the adapter's own (names without LoRA's ".base.", dtypes, shapes, bytes): what
    an adapter file checks its base by, so a different model at the same path is refused, not silently adapted."""
    h = hashlib.sha256()
    frozen = {k.replace(".base.", "."): t for k, t in model.state_dict().items() if k not in adapter_names}
    for name in sorted(frozen):
        t = frozen[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim ones too
    return h.hexdigest()


def save_adapter(path, raw, cfg, enc):
    """The adapter alone, beside the full checkpoint: its trained tensors, the flags that rebuild it, and the base it
    was trained over (--model, as given, and its fingerprint). load_model reads it back over that base."""
    kind, tensors = peft_kind(cfg), lora_state_dict(raw)
    spec = {"kind": kind, "head": raw.cfg.head, "lora_rank": cfg.lora_rank or 8, "lora_alpha": cfg.lora_alpha,
            "rslora": getattr(cfg, "rslora", False), "peft_len": getattr(cfg, "peft_len", 0)}
    ckpt = {"format": "adapter", "model": tensors, "config": asdict(raw.cfg), "adapter": spec,
            "base": {"path": os.path.abspath(cfg.model), "fingerprint": base_fingerprint(raw, set(tensors))},
            "tokenizer": enc.name, "chat_template": enc.chat_template}
    atomic_write(path, lambda f: torch.save(ckpt, f))


def adapter_path(out):
    """Where a run writing `out` (x.pt) puts its adapter file: x.adapter.pt."""
    return (out[:-3] if out.endswith(".pt") else out) + ".adapter.pt"


def load_adapter(ckpt, path, device="cpu", head=None, base=None):
    """An adapter file (save_adapter's) -> (model, tokenizer, ckpt): its base loaded (`base`, else the path it
    names), the adapter rebuilt and its tensors loaded; refused in one line if the base's frozen tensors are not
    the ones it was trained over."""
    spec, named = ckpt.get("adapter"), ckpt.get("base")
    if not isinstance(spec, dict) or not isinstance(named, dict) or not isinstance(named.get("path"), str):
        raise UserError(f"{path}: an adapter file without its 'adapter' and 'base' entries")
    base = base or named["path"]
    if not os.path.exists(base):
        raise UserError(f"{path}: its base {base} is not there (load it with common.load_adapter(..., base=PATH))")
    model, enc, _ = load_model(base, device, head or spec.get("head"))
    kind, length = spec.get("kind"), spec.get("peft_len", 0)
    if kind not in PEFT_KINDS or (kind not in ("lora", "dora") and not (type(length) is int and length >= 1)):
        raise UserError(f"{path}: adapter {_show(kind)} of length {_show(length)}: expected one of "
                        f"{', '.join(PEFT_KINDS)}, a prefix or prompt with peft_len >= 1")
    apply_peft(model, kind, spec.get("lora_rank", 0), spec.get("lora_alpha", 0.0), 0.0, spec.get("rslora", False),
               length)
    if base_fingerprint(model, set(ckpt["model"])) != named.get("fingerprint"):
        raise UserError(f"{path}: trained over another base than {base} (its frozen weights differ from the ones "
                        f"the adapter was trained on, fingerprint {str(named.get('fingerprint'))[:12]})")
    try:
        missing = set(ckpt["model"]) - set(model.state_dict())
        if missing:
            raise KeyError(sorted(missing)[0])
        model.load_state_dict(ckpt["model"], strict=False)
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path}: its tensors do not fit {base} with this adapter ({_one_line(e, 120)})")
    return model.to(device), enc, ckpt


def wrap_for_training(model, cfg, state, world, device, key="optimizer", eps=1e-8):
    """AdamW (restored from a resumed train_state[key], the RNG with it), then DDP and torch.compile as cfg asks;
    --fsdp shards the model first and --offload-activations moves what backward keeps to the CPU (parallel.py).
    Returns (the module to call, the raw module to save, the optimiser). A second model (ppo.py's critic) is
    wrapped by a second call with its own key; restoring the RNG again sets the same state."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    fsdp, offload = getattr(cfg, "fsdp", False), getattr(cfg, "offload_activations", False)
    sharded = state is not None and "dcp" in state
    if fsdp or offload or sharded:  # parallel.py is needed only then: a copied script runs without it otherwise
        import parallel as P
    if fsdp:  # --fsdp: sharded before the optimiser is made, which then holds (and steps) the shards
        P.check_fsdp(model, cfg)
        P.shard(model, device, cfg.dtype)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, eps=eps)
    if weight_masks(model):  # a pruned model stays pruned: its zeros restored after every step
        optimizer.register_step_post_hook(lambda *_: apply_masks(model))
    if state is not None:
        try:
            if sharded and key == "optimizer":  # a sharded checkpoint (parallel.py): weights and optimiser
                P.load_dcp(state["dcp"], model, optimizer)
            elif fsdp:  # a one-file checkpoint's full optimiser state, split to this rank's shards
                P.load_full_optimizer(model, optimizer, state[key])
            else:
                optimizer.load_state_dict(state[key])
            set_rng_state(state["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise UserError(f"--resume: its optimiser state does not fit this model ({' '.join(str(e).split())[:120]})")
    raw = model
    if world > 1 and not fsdp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if offload:
        P.offload_activations(raw)
    if cfg.compile:
        model = torch.compile(model)
    return model, raw, optimizer


def reduce_sums(sums, device):
    """{name: this rank's sum (a scalar tensor or float)} -> {name: the sum over all ranks} as floats, in one
    all-reduce: the statistics a training step logs, named rather than kept in positional slots."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in sums.values()])
    return dict(zip(sums, all_reduce_sum(t).tolist()))


def save_training(cfg, raw, enc, optimizer, step, metrics, lineage, rank, extra=None):
    """The checkpoint of a training run after `step` steps: the weights (LoRA merged in) and the train_state
    --resume reads (optimiser, RNG, data position, LoRA adapters, plus `extra`), written by rank 0 only.
    -> "path (step n)", what a later error names as the last good checkpoint."""
    if getattr(cfg, "fsdp", False):  # every rank writes its shards (parallel.py), rank 0 the gathered file
        import parallel
        return parallel.save_fsdp(cfg, raw, enc, optimizer, step, metrics, lineage, rank, extra)
    if rank == 0:
        train_state = {"optimizer": optimizer.state_dict(), "rng": rng_state(), "data_position": step, **(extra or {})}
        if peft_kind(cfg):
            train_state["lora"] = lora_state_dict(raw)
        save_checkpoint(cfg.out, raw, enc, step=step, args=asdict(cfg), metrics=metrics, lineage=lineage,
                        train_state=train_state)
        if peft_kind(cfg) and cfg.model:  # an adapter over a file (not over a fresh --init student)
            save_adapter(adapter_path(cfg.out), raw, cfg, enc)
    return f"{cfg.out} (step {step})"


def full_state(cfg, model, optimizer):
    """A trained model's state dict and its optimiser's, in full (the optimiser's in torch's own format): what
    a one-file checkpoint holds. Under --fsdp gathered from the shards to rank 0 (parallel.gather; every rank
    calls it, the others get None, None)."""
    if getattr(cfg, "fsdp", False):
        import parallel
        return parallel.gather(model, optimizer)
    return model.state_dict(), optimizer.state_dict()


def step_range(cfg, start_step, rank, desc):
    """The optimiser steps this run takes, as a tqdm bar on rank 0, and the step it ends at: from start_step (0, or
    where --resume left off) to --steps, or to --stop-at (the schedule still spans --steps)."""
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
    return tqdm(range(start_step, end), disable=rank != 0, initial=start_step, total=cfg.steps, desc=desc,
                mininterval=1.0), end


def set_lr(step, cfg, *optimizers):
    """The learning rate of `step` on cfg's schedule (lr_at), set on every parameter group; returns it."""
    lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = lr
    return lr


def lr_at(step, total, lr, warmup=0, min_ratio=0.1):
    """Linear warmup for `warmup` steps, then cosine decay to lr * min_ratio at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8):
    """AdamW over the trainable parameters; weight decay on matrices only, never on norms, biases, heads' bias.
    On CUDA the fused kernel (one launch for every tensor's update; the same arithmetic as the loop, in fp32)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def log_jsonl(path, record):
    """Append one metrics record as a JSON line (rank 0 only calls this)."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



# -----------------------------------------------------------------------------
# Calibration (quantize.py, prune.py): windows of data, and every block's inputs gathered block by block, as GPTQ,
# AWQ, Wanda and SparseGPT do it: each block fed the outputs of the already-compressed blocks before it.

def calibration_ids(enc, path, fmt, n, seq_len, seed, skip=0):
    """n windows of seq_len tokens from the data (raw text, or chats rendered with the model's template), drawn at
    random (seeded) from the token stream as GPTQ draws from C4. skip: windows drawn and left out first (so a
    held-out set drawn with the same seed never overlaps). -> (n, seq_len) ids."""
    eot = special_id(enc, "<|endoftext|>") if "<|endoftext|>" in enc._special_tokens else end_id(enc)
    stream = []
    if fmt == "text":
        for doc in read_text(path):
            stream += enc.encode_ordinary(doc) + [eot]
    else:
        for rec in read_jsonl(path, "chat"):
            stream += render_chat(enc, rec["messages"])[0]
    starts = len(stream) - seq_len
    if starts < 1:
        raise UserError(f"{path}: {len(stream)} tokens, fewer than --calib-len {seq_len}")
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, starts, (skip + n,), generator=g)[skip:]
    return torch.tensor([stream[i:i + seq_len] for i in picks.tolist()])


@torch.no_grad()
def block_inputs(model, ids, batch_size):
    """The first block's inputs for the calibration ids, and the rope (cos, sin) every block shares."""
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    xs, rope = [], None
    for i in range(0, len(ids), batch_size):
        x, rope = model.embed_positions(ids[i:i + batch_size], positions[i:i + batch_size])
        xs.append(x)
    if rope is not None:
        rope = tuple(t[:1] for t in rope)  # the same positions in every row
    return xs, rope


@torch.no_grad()
def collect_inputs(block, xs, rope, names, need, max_tokens):
    """Run the block on every batch, recording each linear's inputs x (tokens, in), in fp32: "hessian" sum x^T x,
    "sqnorm" sum x^2 per channel (its diagonal, Wanda's ||x_j||^2), "absmax" per channel, "sample" (at most max_tokens
    rows, evenly strided). -> {name: {stat: tensor}}."""
    stats = {name: {} for name in names}
    total = sum(x.shape[0] * x.shape[1] for x in xs)
    stride = max(1, total // max_tokens)

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            st = stats[name]
            if "hessian" in need:
                st["hessian"] = st.get("hessian", 0) + x.t() @ x
            if "sqnorm" in need:
                st["sqnorm"] = st.get("sqnorm", 0) + x.pow(2).sum(0)
            if "absmax" in need:
                st["absmax"] = torch.maximum(st.get("absmax", torch.zeros(x.shape[1])), x.abs().amax(0))
            if "sample" in need:
                st.setdefault("sample", []).append(x[::stride])
        return record

    handles = [block.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for x in xs:
            block(x, rope, None, None)
    finally:
        for h in handles:
            h.remove()
    for st in stats.values():
        if "sample" in st:
            st["sample"] = torch.cat(st["sample"])[:max_tokens]
    return stats


@torch.no_grad()
def perplexity(model, ids, batch_size=8):
    """exp(mean next-token loss) over (n, T) ids."""
    nll, count = 0.0, 0
    for i in range(0, len(ids), batch_size):
        x = ids[i:i + batch_size]
        logits = model(x)
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(),
                                                 reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(nll / count)


# -----------------------------------------------------------------------------
# Data sets a script writes itself (cai.py's stages, online.py's rounds): resumable, one batch at a time


def resume_rows(path, batch_size, n):
    """The rows already in a stage's JSONL of n rows (written in index order, one batch at a time), cut back to
    whole batches: a half-written last line and the rows of an unfinished batch are removed from the file, so the
    rerun redoes that batch with the same random stream and the file ends as a straight run's would."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    lines = data[:data.rfind(b"\n") + 1].splitlines()
    rows = []
    for i, line in enumerate(lines):
        row = parse_json(line, f"{path}:{i + 1}")
        if not isinstance(row, dict) or row.get("index") != i:
            raise UserError(f"{path}:{i + 1}: expected the row with index {i} (delete the file to start over)")
        rows.append(row)
    if len(rows) < n:
        rows = rows[:len(rows) // batch_size * batch_size]
    keep = sum(len(line) + 1 for line in lines[:len(rows)])
    if keep != len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    return rows


def run_stage(path, items, batch_size, seed, make_rows, desc, device="cpu"):
    """Rows for every item, from the file where present: make_rows(batch of (index, item), torch generator) ->
    rows, appended as each batch finishes. The generator (on `device`) is seeded by (seed, batch start) so a resumed
    run samples what a straight one would."""
    rows, indexed = resume_rows(path, batch_size, len(items)), list(enumerate(items))
    with open(path, "a", encoding="utf-8") as f:
        for start in tqdm(range(len(rows), len(items), batch_size), desc=desc, initial=len(rows) // batch_size,
                          total=math.ceil(len(items) / batch_size)):
            gen = torch.Generator(device).manual_seed(seed * 1_000_003 + start)
            new = make_rows(indexed[start:start + batch_size], gen)
            f.write("".join(json.dumps(r) + "\n" for r in new))
            f.flush()
            rows += new
    return rows


def write_jsonl(path, rows):
    """A derived data set (not resumable, rebuilt from its stage file), written atomically."""
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


def soft_label(logp_first, logp_swapped, clamp=None):
    """P(reply x is better than y) from the feedback model's answer log-probs in both orders: logp_first
    (..., 2) = [log p("(A)"), log p("(B)")] with x shown as (A), logp_swapped the same with x shown as (B).
    Each order normalises over the two answers, p = sigmoid(log p(x's letter) - log p(y's letter)), and the label
    is their mean, so a judge that always answers "(A)" gives 0.5 whatever the replies. clamp (lo, hi) clips it."""
    p1 = torch.sigmoid(logp_first[..., 0] - logp_first[..., 1])
    p2 = torch.sigmoid(logp_swapped[..., 1] - logp_swapped[..., 0])
    p = (p1 + p2) / 2
    return p if clamp is None else p.clamp(*clamp)


# -----------------------------------------------------------------------------

def main():
    enc = get_tokenizer("byte")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "The answer is 5."}]
    print(show_mask(enc, *render_chat(enc, chat)))


if __name__ == "__main__":
    run(main)
