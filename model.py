"""
model.py: the one transformer every technique in this project trains, and the plumbing they share.

What lives here, in reading order:
  1. Config and presets: one dataclass covers both families we implement by hand,
     GPT-2 (LayerNorm, learned positions, GELU MLP, biases, tied embeddings) and
     Llama / Qwen2 (RMSNorm, RoPE, SwiGLU, grouped-query attention, optional qkv bias).
  2. The transformer: Norm, Attention (scaled_dot_product_attention, KV cache, packed and padded masks),
     MLP, Block, Transformer. `head="lm"` gives next-token logits, `head="scalar"` one value per position
     (reward models and PPO critics read it at the last real token).
  3. Tokenizer and chat template: tiktoken Encodings (`byte`, `gpt2`, any `.tiktoken` ranks file), the
     ChatML special tokens declared once, `render_chat -> (ids, mask)`.
  4. Log-probs and sampling: `token_logprobs`, `filter_logits`, `generate` (batched, left padded, KV cache),
     which returns the sampled tokens *and* their log-probs under the sampling distribution.
  5. LoRA: `apply_lora`, merge / unmerge, `lora_disabled` (the reference model for free).
  6. Checkpoints: atomic `save_checkpoint`, `load_model` of our `ckpt.pt`, `.safetensors` + JSON, or a
     Hugging Face GPT-2 / Llama / Qwen2 directory; `export_hf` writes one back.
  7. Data: JSONL loading that validates every line and reports `file:line: what is wrong`, truncation,
     padding and packing.
  8. Training plumbing: device / dtype, DDP, the dataclass CLI, LR schedule, optimiser, JSONL log.

    python model.py                  # presets and parameter counts
    python model.py --show-chat      # render a chat and colour the tokens the loss is on
"""

import argparse
import ast
import base64
import bisect
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import json
import math
import os
import pickle
import shutil
import signal
import sys
from dataclasses import asdict, dataclass, fields

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

IGNORE = -100  # target id that F.cross_entropy skips; the one masking convention in the project
HERE = os.path.dirname(os.path.abspath(__file__))


class UserError(Exception):
    """A problem the user can fix (bad file, bad flag). `run()` prints it on one line and exits with 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM seen at a step boundary under --save-on-interrupt, after the checkpoint was saved.
    `run()` prints it on one line and exits with 130, the shell's code for an interrupted command."""


# -----------------------------------------------------------------------------
# Config and presets


@dataclass
class Config:
    arch: str = "llama"  # "gpt2" (LayerNorm, learned positions, GELU, biases) or "llama" (RMSNorm, RoPE, SwiGLU)
    vocab_size: int = 260  # number of token ids, special tokens included
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # query heads
    n_kv_head: int = 4  # key/value heads (< n_head is grouped-query attention; gpt2 needs n_kv_head == n_head)
    d_model: int = 128  # residual stream width
    d_ff: int = 512  # MLP hidden width
    max_seq_len: int = 512  # longest sequence (size of the learned position table for gpt2)
    norm_eps: float = 1e-5  # epsilon of LayerNorm / RMSNorm
    rope_theta: float = 10000.0  # RoPE base (llama family)
    qkv_bias: bool = False  # bias on q, k, v projections (Qwen2 has it; gpt2 always has biases)
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    dropout: float = 0.0  # dropout on attention and residual branches (training only)
    head: str = "lm"  # "lm": next-token logits; "scalar": one value per position (reward model, critic)

    def __post_init__(self):
        if self.arch not in ("gpt2", "llama"):
            raise UserError(f"unknown architecture {self.arch!r}: expected 'gpt2' or 'llama'")
        if self.head not in ("lm", "scalar"):
            raise UserError(f"unknown head {self.head!r}: expected 'lm' or 'scalar'")
        if self.d_model % self.n_head or self.n_head % self.n_kv_head:
            raise UserError(f"d_model={self.d_model}, n_head={self.n_head}, n_kv_head={self.n_kv_head} do not divide")
        if self.arch == "gpt2" and self.n_kv_head != self.n_head:
            raise UserError("gpt2 has no grouped-query attention: set n_kv_head == n_head")


PRESETS = {
    # the built-in world trains these on two CPU cores in minutes (vocab set from the tokenizer)
    "tiny": dict(arch="llama", n_layer=4, n_head=4, n_kv_head=2, d_model=128, d_ff=384, max_seq_len=256),
    "tiny-gpt2": dict(arch="gpt2", n_layer=4, n_head=4, n_kv_head=4, d_model=128, d_ff=512, max_seq_len=256),
    "small": dict(arch="llama", n_layer=6, n_head=8, n_kv_head=4, d_model=256, d_ff=768, max_seq_len=512),
    # real shapes, for reference and for loading pretrained weights
    "gpt2": dict(arch="gpt2", vocab_size=50257, n_layer=12, n_head=12, n_kv_head=12, d_model=768, d_ff=3072,
                 max_seq_len=1024),
    "llama-like": dict(arch="llama", vocab_size=32000, n_layer=16, n_head=16, n_kv_head=4, d_model=1024,
                       d_ff=2816, max_seq_len=2048, tie_embeddings=False),
    "qwen2-0.5b": dict(arch="llama", vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2, d_model=896,
                       d_ff=4864, max_seq_len=32768, rope_theta=1e6, qkv_bias=True, norm_eps=1e-6),
}


# -----------------------------------------------------------------------------
# The transformer


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 as Llama does: bf16 sums of squares lose too much
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(cfg):
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.arch == "gpt2" else RMSNorm(cfg.d_model, cfg.norm_eps)


def rope_cos_sin(positions, head_dim, theta):
    """positions (B, T) -> cos, sin (B, 1, T, head_dim) in fp32, the rotate-half layout of HF Llama."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, hd)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of every layer for B rows up to max_len positions.

    `pos` is how many positions are filled; `valid` marks real (non-pad) keys; `seen` counts real tokens per
    row, which gives the position id of the next token under left padding."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        super().__init__()
        hd = cfg.d_model // cfg.n_head
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, hd)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("valid", torch.zeros(batch_size, max_len, dtype=torch.bool, device=device),
                             persistent=False)
        self.register_buffer("seen", torch.zeros(batch_size, dtype=torch.long, device=device), persistent=False)
        self.pos = 0

    def update(self, layer, k, v):
        T = k.shape[2]
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.d_model // cfg.n_head
        qkv_bias = cfg.arch == "gpt2" or cfg.qkv_bias
        self.q = nn.Linear(cfg.d_model, cfg.n_head * self.head_dim, bias=qkv_bias)
        self.k = nn.Linear(cfg.d_model, cfg.n_kv_head * self.head_dim, bias=qkv_bias)
        self.v = nn.Linear(cfg.d_model, cfg.n_kv_head * self.head_dim, bias=qkv_bias)
        self.o = nn.Linear(cfg.n_head * self.head_dim, cfg.d_model, bias=cfg.arch == "gpt2")

    def forward(self, x, rope, mask, cache):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, pos+T, hd)
        if self.n_kv_head != self.n_head:  # grouped-query attention: each kv head serves n_head/n_kv_head queries
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        drop = self.cfg.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=drop)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, C)
        return self.o(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.arch = cfg.arch
        bias = cfg.arch == "gpt2"
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=bias)
        if cfg.arch == "llama":
            self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)

    def forward(self, x):
        if self.arch == "gpt2":
            return self.down(F.gelu(self.up(x), approximate="tanh"))
        return self.down(F.silu(self.gate(x)) * self.up(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), Attention(cfg, layer)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, cache):
        x = x + self.drop(self.attn(self.norm1(x), rope, mask, cache))
        return x + self.drop(self.mlp(self.norm2(x)))


def positions_from_docs(doc_ids):
    """Per-example positions for a packed row: (B, T) document ids -> (B, T) offsets from each doc's start."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def build_attn_mask(T, offset, key_valid=None, doc_ids=None):
    """Boolean (B or 1, 1, T, offset+T) mask, True where a query may attend to a key.

    Causal always; pads (key_valid False) are never attended to; with doc_ids (packed rows) a token sees only
    its own document. Every query may see itself, so pad rows never get an all-masked (NaN) softmax."""
    device = key_valid.device if key_valid is not None else doc_ids.device
    q_idx = torch.arange(offset, offset + T, device=device)[:, None]  # (T, 1)
    k_idx = torch.arange(offset + T, device=device)[None, :]  # (1, Tk)
    mask = (k_idx <= q_idx)[None]  # (1, T, Tk)
    if key_valid is not None:
        mask = mask & key_valid[:, None, :]  # (B, T, Tk)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])  # (B, T, T), packed rows have no cache
    mask = mask | (k_idx == q_idx)[None]
    return mask[:, None]  # (B, 1, T, Tk)


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False  # trade compute for memory in training (--grad-checkpointing)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.arch == "gpt2":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        if cfg.head == "lm":
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            if cfg.tie_embeddings:
                self.lm_head.weight = self.embed.weight
        else:
            self.score = nn.Linear(cfg.d_model, 1)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith(("attn.o.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.head == "scalar":
            nn.init.zeros_(self.score.weight)  # a fresh value head starts neutral

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self):
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def new_cache(self, batch_size, max_len):
        p = next(self.parameters())
        return KVCache(self.cfg, batch_size, max_len, p.device, p.dtype)

    def forward(self, idx, positions=None, attention_mask=None, doc_ids=None, cache=None, return_hidden=False):
        """idx (B, T) -> logits (B, T, vocab) for head="lm", values (B, T) for head="scalar".

        attention_mask (B, T): 1 real, 0 pad (left or right padding); positions then count real tokens only.
        doc_ids (B, T): packed rows, block-diagonal causal attention and per-document positions.
        cache: a KVCache from new_cache(); the call appends this chunk and attends to everything before it.
        return_hidden: also return the final hidden states (B, T, C), after the last norm."""
        B, T = idx.shape
        offset = cache.pos if cache is not None else 0
        valid = attention_mask.bool() if attention_mask is not None else None
        if cache is not None:
            cache.valid[:, offset:offset + T] = True if valid is None else valid
        if positions is None:
            if doc_ids is not None:
                positions = positions_from_docs(doc_ids)
            elif valid is not None or cache is not None:
                real = valid.long() if valid is not None else torch.ones_like(idx)
                base = cache.seen[:, None] if cache is not None else 0
                positions = (base + real.cumsum(1) - 1).clamp(min=0)  # (B, T)
            else:
                positions = torch.arange(T, device=idx.device).expand(B, T)
        if cache is not None:
            mask = build_attn_mask(T, offset, cache.valid[:, :offset + T])
        elif valid is not None or doc_ids is not None:
            mask = build_attn_mask(T, 0, valid, doc_ids)
        else:
            mask = None  # plain causal: the fast is_causal kernel

        x = self.embed(idx)  # (B, T, C)
        rope = None
        if self.cfg.arch == "gpt2":
            x = x + self.pos_embed(positions)
        else:
            rope = rope_cos_sin(positions, self.cfg.d_model // self.cfg.n_head, self.cfg.rope_theta)
        x = self.drop(x)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and cache is None:  # recompute activations in backward
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, None, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache)
        h = self.norm(x)
        if cache is not None:
            cache.pos += T
            cache.seen += torch.ones_like(idx).sum(1) if valid is None else valid.sum(1)
        out = self.lm_head(h) if self.cfg.head == "lm" else self.score(h).squeeze(-1)
        return (out, h) if return_hidden else out


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


def get_tokenizer(spec="byte"):
    """'byte' (256 byte tokens, fully offline), 'gpt2' (GPT-2's BPE from data/gpt2.tiktoken), or a path to a
    `.tiktoken` ranks file. The ChatML special tokens follow the last ordinary id. The Encoding's name is the
    spec, so `get_tokenizer(enc.name)` rebuilds it (checkpoints store that name)."""
    if spec == "byte":
        ranks, pattern = {bytes([i]): i for i in range(256)}, r"[\s\S]{1,256}"
    elif spec == "gpt2":
        ranks, pattern = read_ranks(os.path.join(HERE, "data", "gpt2.tiktoken")), GPT2_PATTERN
    elif os.path.isfile(spec):
        ranks, pattern = read_ranks(spec), CL100K_PATTERN
    else:
        raise UserError(f"unknown tokenizer {spec!r}: use 'byte', 'gpt2' or a path to a .tiktoken ranks file")
    first = max(ranks.values()) + 1
    specials = {tok: first + i for i, tok in enumerate(SPECIAL_TOKENS)}
    if spec == "gpt2":  # keep GPT-2's own <|endoftext|> id
        specials = {"<|endoftext|>": 50256, **{t: 50257 + i for i, t in enumerate(SPECIAL_TOKENS[1:])}}
    return tiktoken.Encoding(name=spec, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


def special_id(enc, token):
    return enc.encode_single_token(token)


def render_chat(enc, messages, add_generation_prompt=False):
    """ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.

    Returns (ids, mask) as lists: mask is 1 on assistant content and its `<|im_end|>` (so the model learns to
    stop), 0 elsewhere. Content is encoded with encode_ordinary, so text that spells a special token stays
    text. add_generation_prompt appends `<|im_start|>assistant\\n` for sampling a reply."""
    start, end = special_id(enc, "<|im_start|>"), special_id(enc, "<|im_end|>")
    newline = enc.encode_ordinary("\n")
    ids, mask = [], []
    for m in messages:
        head = [start] + enc.encode_ordinary(m["role"] + "\n")
        body = enc.encode_ordinary(m["content"])
        on = int(m["role"] == "assistant")
        ids += head + body + [end] + newline
        mask += [0] * len(head) + [on] * (len(body) + 1) + [0] * len(newline)
    if add_generation_prompt:
        head = [start] + enc.encode_ordinary("assistant\n")
        ids += head
        mask += [0] * len(head)
    return ids, mask


def render_plain(enc, messages, add_generation_prompt=False):
    """The no-template ablation: `User: ...\nAssistant: ...\n` as plain text, no special tokens, same
    (ids, mask) contract as render_chat; the assistant's closing newline is its stop signal and is supervised."""
    ids, mask = [], []
    for m in messages:
        head = enc.encode_ordinary(m["role"].capitalize() + ": ")
        body = enc.encode_ordinary(m["content"] + "\n")
        ids += head + body
        mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body)
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


# -----------------------------------------------------------------------------
# Log-probs and sampling


def token_logprobs(logits, ids, mask=None):
    """log p(ids[t] | ids[<t]) aligned with ids: logits (B, T, V) from a forward over ids (B, T) -> (B, T).

    Position 0 has no prediction and gets 0. Computed in fp32. If mask (B, T) is given the result is zero where
    mask is 0, so `.sum(-1)` is the log-probability of the supervised tokens."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    out = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    out = F.pad(out, (1, 0))  # (B, T)
    return out if mask is None else out * mask


def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The logits a sampler draws from: divided by temperature, then top-k, then top-p (nucleus) filtered
    with -inf. log_softmax of this is the sampling distribution; temperature 0 means greedy (no scaling)."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p: drop a token once the ones before it reach top_p
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False  # the most likely token always stays (top_p=0 is greedy)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def pad_left(seqs, pad_id):
    """Lists of ids -> (ids, mask) (B, T) with padding on the left, as batched generation needs."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
    return ids, mask


def pad_right(seqs, pad_value, length=None):
    """Lists -> (B, T) tensor padded on the right with pad_value."""
    T = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s[:T], dtype=torch.long)
    return out


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, stop_ids=(), pad_id=0,
             generator=None):
    """Batched sampling with the KV cache. prompts: list of id lists (any lengths; left padded here).

    Returns (tokens, logprobs, mask), each (B, N) with N <= max_new_tokens: the sampled tokens (pad_id after a
    row stopped), their log-probs under the distribution they were drawn from (`filter_logits`), and 1 on
    generated tokens (the stop token included). temperature=0 is greedy; its log-probs are the model's."""
    device = next(model.parameters()).device
    ids, mask = pad_left(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    B, P = ids.shape
    cache = model.new_cache(B, P + max_new_tokens)
    logits = model(ids, attention_mask=mask, cache=cache)[:, -1]  # (B, V)
    stop = torch.tensor(list(stop_ids) or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logps, masks = [], [], []
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)  # (B, V)
        if temperature > 0:
            tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        else:
            tok = logp.argmax(-1)
        tok_logp = logp.gather(-1, tok[:, None]).squeeze(-1)
        tokens.append(torch.where(done, pad_id, tok))
        logps.append(torch.where(done, 0.0, tok_logp))
        masks.append((~done).long())
        done = done | torch.isin(tok, stop)
        if done.all():
            break
        logits = model(tokens[-1][:, None], cache=cache)[:, -1]
    return torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(masks, 1)


def last_token_index(mask):
    """(B, T) 0/1 mask -> (B,) index of the last 1 in each row: where a reward model reads its score."""
    T = mask.shape[1]
    return T - 1 - mask.flip(1).long().argmax(1)


@torch.no_grad()
def score_responses(rm, enc, prompts, responses, batch_size=32):
    """Reward-model scores, (N,) fp32: each prompt (message list) + response rendered as a chat, the value read
    at the response's closing `<|im_end|>` (the last real token, never a pad). Used by ppo.py and evaluate.py."""
    device = next(rm.parameters()).device
    pad = special_id(enc, "<|pad|>")
    out = []
    for i in range(0, len(prompts), batch_size):
        seqs = [render_chat(enc, p + [{"role": "assistant", "content": r}])[0][:-len(enc.encode_ordinary("\n"))]
                for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        seqs = [s[-rm.cfg.max_seq_len:] for s in seqs]  # keep the end: the score is read there
        ids, mask = pad_left(seqs, pad)
        values = rm(ids.to(device), attention_mask=mask.to(device))  # (B, T)
        out.append(values[:, -1].float().cpu())  # left padding: the last column is every row's last token
    return torch.cat(out)


# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2021): W x + (alpha / r) B A x, with A (r, in) random and B (out, r) zero at the start


class LoRALinear(nn.Module):
    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.base = base  # an nn.Linear, or any module with in/out_features (a quantised linear for QLoRA)
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as PEFT does
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled, self.merged = True, False

    def delta(self):
        return (self.lora_b @ self.lora_a) * self.scale  # (out, in)

    def merge(self):
        if not self.merged:
            self.base.weight.data += self.delta().to(self.base.weight.dtype)
            self.merged = True

    def unmerge(self):
        if self.merged:
            self.base.weight.data -= self.delta().to(self.base.weight.dtype)
            self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.enabled and not self.merged:
            y = y + (self.dropout(x) @ self.lora_a.t().to(x.dtype) @ self.lora_b.t().to(x.dtype)) * self.scale
        return y


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def apply_lora(model, rank, alpha=None, dropout=0.0, targets=LORA_TARGETS):
    """Freeze the model and wrap every linear whose name ends in one of `targets` with a LoRA adapter."""
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha or 2 * rank, dropout))
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def lora_disabled(model):
    """Run the base model: with LoRA the frozen base is the reference policy, no second copy needed."""
    layers = lora_layers(model)
    merged = [m for m in layers if m.merged]
    for m in merged:  # a merged delta lives inside the base weight: take it out while the base runs
        m.unmerge()
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True
        for m in merged:
            m.merge()


def plain_state_dict(model):
    """The state dict of the model as a plain Transformer: LoRA deltas merged in, adapter tensors dropped."""
    model = getattr(model, "module", model)  # unwrap DDP
    sd = {}
    for name, t in model.state_dict().items():
        if ".lora_" in name:
            continue
        sd[name.replace(".base.", ".")] = t.detach().clone()
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) and m.enabled and not m.merged:
            sd[name + ".weight"] += m.delta().detach().to(sd[name + ".weight"].dtype)
    return sd


def lora_state_dict(model):
    model = getattr(model, "module", model)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


# -----------------------------------------------------------------------------
# Checkpoints


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


def save_checkpoint(path, model, enc, step=0, args=None, metrics=None, lineage=(), train_state=None):
    """Our checkpoint schema, plain tensors and values only (loadable with weights_only=True).

    train_state (optimiser, RNG, data position, LoRA tensors) is what --resume needs; it is optional."""
    raw = getattr(model, "module", model)
    sd = plain_state_dict(raw)
    dtype = next(iter(sd.values())).dtype
    ckpt = {
        "model": sd, "config": asdict(raw.cfg), "tokenizer": enc.name, "step": int(step),
        "args": dict(args or {}), "metrics": dict(metrics or {}),
        "format": {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype)),
        "lineage": list(lineage),
    }
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
        if k in SIZE_LIMITS:
            _check_size(where, k, v, SIZE_LIMITS[k])
        elif kinds[k] is float:
            number = type(v) in (int, float) and -1e300 < v < 1e300  # finite; unlike float(), never overflows
            if not number or (v <= 0 if k == "rope_theta" else not 0 <= v < 1):
                want = "a positive number" if k == "rope_theta" else "a number in [0, 1)"
                raise UserError(f"{where}: {k} = {_show(v)}: expected {want}")
            d[k] = float(v)
        elif type(v) is not kinds[k]:  # the str and bool fields
            raise UserError(f"{where}: {k} = {_show(v)}: expected a {kinds[k].__name__}")
    try:
        cfg = Config(**d)
    except UserError as e:  # Config's own checks (architecture, head, heads dividing d_model) do not know the file
        raise UserError(f"{where}: {e}")
    if cfg.arch == "llama" and cfg.d_model // cfg.n_head % 2:
        raise UserError(f"{where}: head size d_model / n_head = {cfg.d_model // cfg.n_head} is odd: RoPE rotates "
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
        return load_hf_dir(path)
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
        raise UserError(f"{path}: a GGUF file (llama.cpp); reading GGUF is not implemented yet: load the model's "
                        "Hugging Face directory or .safetensors instead")
    if path.endswith(".gguf"):
        raise UserError(f"{path}: not a GGUF file (bad magic {magic[:4]!r}, expected b'GGUF')")
    if path.endswith(".safetensors"):
        return load_safetensors(path)
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
    """Checkpoint (ckpt.pt, .safetensors + .json, or HF directory) -> (model, tokenizer, ckpt dict).

    head="scalar" turns a language model into a reward model / critic with a fresh value head, and back."""
    ckpt = load_checkpoint(path)
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
    enc = _tokenizer_of(ckpt.get("tokenizer", "byte"), path)
    if enc.n_vocab > cfg.vocab_size:
        raise UserError(f"{path}: tokenizer {enc.name!r} has {enc.n_vocab} ids but the model only {cfg.vocab_size}")
    model = Transformer(cfg)
    try:
        model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # the checks above leave nothing for this; kept so no mismatch is ever a traceback
        raise UserError(f"{path}: weights do not match the config ({_one_line(e, 160)})")
    return model.to(device), enc, ckpt


def _layer_ids(keys, marker):
    """The layer numbers in weight names: the integers right after a `marker` component ("blocks", "h", "layers")."""
    ids = set()
    for k in keys:
        parts = k.split(".")
        ids.update(int(b) for a, b in zip(parts, parts[1:]) if a == marker and b.isdigit())
    return ids


def _tokenizer_of(spec, where):
    """get_tokenizer(spec) for a spec read from a file: every failure a UserError naming that file."""
    if not isinstance(spec, str):
        raise UserError(f"{where}: tokenizer {_show(spec)} is not a name ('byte', 'gpt2') or a path")
    try:
        return get_tokenizer(spec)
    except UserError as e:
        raise UserError(f"{where}: {e}")
    except (OSError, ValueError) as e:  # an unreadable or empty ranks file
        raise UserError(f"{where}: tokenizer {spec!r} unreadable ({_one_line(e)})")


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
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


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


def catch_interrupts(enabled):
    """--save-on-interrupt: Ctrl-C (SIGINT) and SIGTERM (a scheduler's pre-emption) no longer stop the process at
    once; they are noted, and the training loop saves at the end of the current step and stops (`interrupted`).
    A second Ctrl-C stops at once. Saving mid-step could write half-updated weights; a step boundary cannot."""
    if not enabled:
        return

    def note(signum, frame):
        if _STOP:  # the second one: the user means it
            raise KeyboardInterrupt
        _STOP.append(signum)

    signal.signal(signal.SIGINT, note)
    signal.signal(signal.SIGTERM, note)


def interrupted(device):
    """Whether a signal was noted on any rank (every rank then stops at the same step)."""
    return bool(all_reduce_sum(torch.tensor([float(bool(_STOP))], device=device)).item())


def check_finite(record, keys, last_saved):
    """Stop a diverged run: a loss or gradient norm that is NaN or inf ends it with the step and the last good
    checkpoint (`last_saved`, e.g. "out/sft.pt (step 40)", or None) named, before anything non-finite is saved.
    The metrics are all-reduced, so every rank stops at the same step."""
    bad = [k for k in keys if k in record and not math.isfinite(record[k])]
    if bad:
        raise UserError(f"step {record['step']}: {', '.join(f'{k} is {record[k]}' for k in bad)}; stopped without "
                        f"saving. Last good checkpoint: {last_saved or 'none yet'}. Lower --lr or check the data")


def resume_and_lora(model, resume="", lora_rank=0, lora_alpha=0.0, lora_dropout=0.0):
    """--resume and --lora-rank, the same in every training script -> (start step, train_state or None).

    Full fine-tuning resumes the saved weights; with LoRA the starting model is wrapped again and its adapters
    restored from the train state (the saved weights have the adapters merged in)."""
    state, step = None, 0
    if resume:
        ckpt = load_checkpoint(resume)
        state, step = ckpt.get("train_state"), ckpt.get("step")
        if not isinstance(state, dict) or not isinstance(step, int) or isinstance(step, bool):
            raise UserError(f"{resume}: no train_state and step to resume from (not written by a training script?)")
    try:  # a checkpoint of another run (other sizes, other --lora-rank) does not fit: say so, not a traceback
        if resume and not lora_rank:
            model.load_state_dict(ckpt["model"])
        if lora_rank:
            apply_lora(model, lora_rank, lora_alpha or None, lora_dropout)
            if state is not None:
                model.load_state_dict(state["lora"], strict=False)
    except (RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"{resume}: does not fit the model being trained, resume with the flags of the run that "
                        f"wrote it ({' '.join(str(e).split())[:120]})")
    return step, state


def wrap_for_training(model, cfg, state, world, device):
    """AdamW (restored, with the RNG, from a resumed train_state), then DDP and torch.compile as cfg asks.
    Returns (the module to call, the raw module to save, the optimiser)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise UserError(f"--resume: its optimiser state does not fit this model ({' '.join(str(e).split())[:120]})")
    raw = model
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return model, raw, optimizer


def lr_at(step, total, lr, warmup=0, min_ratio=0.1):
    """Linear warmup for `warmup` steps, then cosine decay to lr * min_ratio at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.95)):
    """AdamW over the trainable parameters; weight decay on matrices only, never on norms, biases, heads' bias."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=False)


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


def build_model(preset, enc, **overrides):
    """A fresh Transformer from a preset name, its vocabulary sized to the tokenizer."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    return Transformer(Config(**{**PRESETS[preset], "vocab_size": enc.n_vocab, **overrides}))


# -----------------------------------------------------------------------------

def main():
    if "--show-chat" in sys.argv:
        enc = get_tokenizer("byte")
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "The answer is 5."}]
        print(show_mask(enc, *render_chat(enc, chat)))
        return
    print(f"{'preset':<12} {'arch':<6} {'layers':>6} {'d_model':>7} {'heads':>6} {'kv':>3} {'vocab':>7} {'params':>12}")
    for name, p in PRESETS.items():
        cfg = Config(**{"vocab_size": 260, **p})
        with torch.device("meta"):
            n = Transformer(cfg).num_params()
        print(f"{name:<12} {cfg.arch:<6} {cfg.n_layer:>6} {cfg.d_model:>7} {cfg.n_head:>6} {cfg.n_kv_head:>3} "
              f"{cfg.vocab_size:>7} {n:>12,}")


if __name__ == "__main__":
    run(main)
