"""
model.py: the one transformer every technique in this project trains. Torch only: copy it alone.

In reading order:
  1. Config and presets: one dataclass covers both families we implement by hand,
     GPT-2 (LayerNorm, learned positions, GELU MLP, biases, tied embeddings) and
     Llama / Qwen2 (RMSNorm, RoPE with optional Llama-3 scaling, SwiGLU, grouped-query attention, optional
     qkv bias and head_dim).
  2. The transformer: Norm, Attention (scaled_dot_product_attention, KV cache, packed and padded masks),
     MLP, Block, Transformer. `head="lm"` gives next-token logits, `head="scalar"` one value per position
     (reward models and PPO critics read it at the last real token).
  3. Log-probs and sampling: `token_logprobs`, `filter_logits`, `generate` (batched, left padded, KV cache),
     which returns the sampled tokens *and* their log-probs under the sampling distribution. Positions count
     real tokens only, so a left-padded row sees the positions it would alone (transformers' GPT-2 does so only
     when given position ids from the attention mask, which TRL's training forwards do not pass).
  4. LoRA: `apply_lora`, merge / unmerge, `lora_disabled` (the reference model for free).

Tokenizers, chat templates, checkpoints, data and the training plumbing are in common.py; Hugging Face
directories and safetensors in formats.py.

    python model.py                  # presets and parameter counts
"""

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention



class UserError(Exception):
    """A problem the user can fix (bad file, bad flag). `run()` prints it on one line and exits with 2."""


# -----------------------------------------------------------------------------
# Config and presets


@dataclass
class Config:
    arch: str = "llama"  # "gpt2" (LayerNorm, learned positions, GELU, biases) or "llama" (RMSNorm, RoPE, SwiGLU)
    vocab_size: int = 260  # number of token ids, special tokens included
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # query heads
    n_kv_head: int = 4  # key/value heads (< n_head is grouped-query attention; gpt2 needs n_kv_head == n_head)
    head_dim: int = 0  # width of one attention head; 0 means d_model // n_head (gpt2 needs 0)
    d_model: int = 128  # residual stream width
    d_ff: int = 512  # MLP hidden width
    max_seq_len: int = 512  # longest sequence (size of the learned position table for gpt2)
    norm_eps: float = 1e-5  # epsilon of LayerNorm / RMSNorm
    rope_theta: float = 10000.0  # RoPE base (llama family)
    rope_scaling_factor: float = 1.0  # Llama-3 RoPE scaling: long wavelengths stretched this much (1 means off)
    rope_low_freq_factor: float = 1.0  # Llama-3 scaling: wavelengths over rope_original_max_len / this are stretched
    rope_high_freq_factor: float = 4.0  # Llama-3 scaling: wavelengths under rope_original_max_len / this are kept
    rope_original_max_len: int = 8192  # Llama-3 scaling: the context length of pretraining, before the stretch
    qkv_bias: bool = False  # bias on q, k, v projections (Qwen2 has it; gpt2 always has biases)
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    dropout: float = 0.0  # dropout on attention and residual branches (training only)
    head: str = "lm"  # "lm": next-token logits; "scalar": one value per position (reward model, critic)
    prefix_len: int = 0  # prefix / prompt tuning: learned KV-cache slots every sequence starts after (0 = none)
    prefix_kind: str = "prefix"  # "prefix": learned keys and values per layer; "prompt": learned input embeddings

    def __post_init__(self):
        if self.arch not in ("gpt2", "llama"):
            raise UserError(f"unknown architecture {self.arch!r}: expected 'gpt2' or 'llama'")
        if self.head not in ("lm", "scalar"):
            raise UserError(f"unknown head {self.head!r}: expected 'lm' or 'scalar'")
        if self.prefix_kind not in ("prefix", "prompt"):
            raise UserError(f"unknown prefix_kind {self.prefix_kind!r}: expected 'prefix' or 'prompt'")
        if (not self.head_dim and self.d_model % self.n_head) or self.n_head % self.n_kv_head:
            raise UserError(f"d_model={self.d_model}, n_head={self.n_head}, n_kv_head={self.n_kv_head} do not divide")
        if self.arch == "gpt2" and (self.n_kv_head != self.n_head or self.head_dim):
            raise UserError("gpt2 has no grouped-query attention or head_dim: set n_kv_head == n_head, head_dim 0")
        if self.rope_scaling_factor != 1.0 and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise UserError("Llama-3 RoPE scaling needs rope_high_freq_factor > rope_low_freq_factor")

    @property
    def head_size(self):
        """The width of one attention head: head_dim, or d_model // n_head when that is 0."""
        return self.head_dim or self.d_model // self.n_head


PRESETS = {
    # the built-in world trains these on two CPU cores in minutes (vocab set from the tokenizer)
    "tiny": dict(arch="llama", n_layer=4, n_head=4, n_kv_head=2, d_model=128, d_ff=384, max_seq_len=512),
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


def build_model(preset, enc, **overrides):
    """A fresh Transformer from a preset name, its vocabulary sized to the tokenizer."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    return Transformer(Config(**{**PRESETS[preset], "vocab_size": enc.n_vocab, **overrides}))


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


def rope_inv_freq(head_dim, theta, device=None):
    """The (head_dim/2,) fp32 RoPE frequencies theta^(-2i / head_dim), in radians per position."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)


def llama3_inv_freq(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_len):
    """Llama 3.1's RoPE scaling of (hd/2,) frequencies -> (hd/2,), transformers' "llama3" rope_type.

    Wavelengths under original_max_len / high_freq_factor turn many times within the pretraining context: kept.
    Those over original_max_len / low_freq_factor turn few times: divided by factor, so a context factor times
    longer sees only angles seen in pretraining. Between, a linear blend in turns per context. Factor 1: identity."""
    wavelen = 2 * math.pi / inv_freq
    # 1 on the kept side, 0 on the stretched side: the clamp gives both ends without a where()
    smooth = ((original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_cos_sin(positions, inv_freq):
    """positions (B, T), inv_freq (hd/2,) -> cos, sin (B, 1, T, hd) in fp32, the rotate-half layout of HF Llama."""
    angles = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, hd)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache:
    """Keys and values of every layer for B rows and max_len slots, preallocated once: every forward attends to all
    max_len slots (those not yet written, or pads, masked off), so shapes never change and a compiled decode step
    compiles once (gpt-fast's static cache).

    `pos` (a 0-dim tensor) is the next free slot; `valid` marks slots holding real (non-pad) keys; `seen` counts
    real tokens per row, which gives the position id of the next token under left padding."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_size)
        # one tensor per layer: a compiled step that writes a layer's slot then touches that layer's tensor only
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)

    def slots(self, T):
        """The (T,) slots the next T tokens are written to."""
        return self.pos + torch.arange(T, device=self.pos.device)

    def rewind(self, n):
        """Forget the last n tokens written (every row's): the next forward writes over their slots, and a query
        attends only to slots up to its own, so what they held is never read (speculative decoding's rollback, a
        judge's answers scored one after another on one context)."""
        self.pos -= n
        self.seen -= n

    def update(self, layer, k, v):
        """Write k, v (B, nkv, T, hd) at the next T slots -> this layer's keys and values, all max_len slots."""
        slots = self.slots(k.shape[2])
        self.k[layer][:, :, slots] = k  # index_put_: in place under torch.compile too (index_copy_ clones the cache)
        self.v[layer][:, :, slots] = v
        return self.k[layer], self.v[layer]


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_size
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
            k, v = cache.update(self.layer, k, v)  # (B, nkv, max_len, hd)
        gqa = self.n_kv_head != self.n_head  # each kv head serves n_head / n_kv_head queries, k and v not copied
        if isinstance(mask, BlockMask):  # packed rows on CUDA: only the blocks the documents touch are computed
            y = flex_attention_kernel(q.device)(q, k, v, block_mask=mask, enable_gqa=gqa)
        else:
            drop = self.cfg.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=drop,
                                               enable_gqa=gqa)
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
    """Boolean (B or 1, 1, T, Tk) mask, True where a query may attend to a key: the T queries sit at slots
    offset.. offset+T-1 (an int or a 0-dim tensor: a KV cache's next free slot), Tk is key_valid's width, else T.

    Causal always; pads (key_valid False) are never attended to; with doc_ids (packed rows) a token sees only
    its own document (and, in a cache, every slot before offset: a prefix). Every query may see itself, so pad
    rows never get an all-masked (NaN) softmax."""
    device = key_valid.device if key_valid is not None else doc_ids.device
    Tk = key_valid.shape[1] if key_valid is not None else T
    q_idx = (offset + torch.arange(T, device=device))[:, None]  # (T, 1)
    k_idx = torch.arange(Tk, device=device)[None, :]  # (1, Tk)
    mask = (k_idx <= q_idx)[None]  # (1, T, Tk)
    if key_valid is not None:
        mask = mask & key_valid[:, None, :]  # (B, T, Tk)
    if doc_ids is not None:
        same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T): these tokens see their own document
        if Tk != T:  # a cache: its earlier slots (a prefix) are seen by every document; these tokens sit at offset..
            full = torch.ones(doc_ids.shape[0], T, Tk, dtype=torch.bool, device=device)
            same = full.index_copy(2, q_idx[:, 0], same)
        mask = mask & same
    mask = mask | (k_idx == q_idx)[None]
    return mask[:, None]  # (B, 1, T, Tk)


FLEX_DEVICES = {"cuda"}  # device types where packed rows take flex_attention instead of a dense (B, 1, T, T) mask


def doc_block_mask(doc_ids, key_valid=None):
    """flex_attention's BlockMask for packed rows: the same rule as build_attn_mask(T, 0, key_valid, doc_ids), but
    stored per 128 x 128 block, so attention skips the blocks between documents and never builds a dense mask."""
    B, T = doc_ids.shape

    def mask_mod(b, h, q, k):
        seen = (k <= q) & (doc_ids[b, q] == doc_ids[b, k])
        return seen & (key_valid[b, k] | (k == q)) if key_valid is not None else seen

    return create_block_mask(mask_mod, B, None, T, T, device=doc_ids.device)


@functools.cache
def flex_attention_kernel(device):
    """flex_attention compiled into one fused kernel on CUDA (what it is for); eager elsewhere (tests on the CPU)."""
    return torch.compile(flex_attention) if device.type == "cuda" else flex_attention


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
        self.prefix = Prefix(cfg) if cfg.prefix_len else None  # prefix / prompt tuning (apply_prefix)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self, trainable=False):
        """Parameters counted once (tied embeddings are one tensor), a quantised layer's packed weights among them;
        trainable=True: only those requiring grad."""
        unique = {id(p): p for p in self.parameters()}.values()
        packed = sum(m.in_features * m.out_features for m in self.modules() if hasattr(m, "dequantize"))
        return sum(p.numel() for p in unique if p.requires_grad or not trainable) + (0 if trainable else packed)

    def new_cache(self, batch_size, max_len):
        """A KVCache with room for max_len positions; with a prefix / prompt adapter (enabled) its first slots
        already hold the adapter's keys and values, so every forward on it starts after them."""
        p = next(self.parameters())
        n = self.prefix.length if self.prefix is not None and self.prefix.enabled else 0
        cache = KVCache(self.cfg, batch_size, n + max_len, p.device, p.dtype)
        if n:
            self.prefix.fill(self, cache)
        return cache

    def embed_positions(self, idx, positions, embeds=None):
        """Token embeddings (or `embeds`), with GPT-2's learned positions added -> (x, rope): rope is the (cos, sin)
        pair every llama block rotates q and k by, None for gpt2."""
        x = self.embed(idx) if embeds is None else embeds  # (B, T, C)
        if self.cfg.arch == "gpt2":
            return x + self.pos_embed(positions), None
        cfg = self.cfg
        inv_freq = rope_inv_freq(cfg.head_size, cfg.rope_theta, x.device)
        if cfg.rope_scaling_factor != 1.0:
            inv_freq = llama3_inv_freq(inv_freq, cfg.rope_scaling_factor, cfg.rope_low_freq_factor,
                                       cfg.rope_high_freq_factor, cfg.rope_original_max_len)
        return x, rope_cos_sin(positions, inv_freq)

    def forward(self, idx, positions=None, attention_mask=None, doc_ids=None, cache=None, return_hidden=False,
                embeds=None):
        """idx (B, T) -> logits (B, T, vocab) for head="lm", values (B, T) for head="scalar".

        attention_mask (B, T): 1 real, 0 pad (left or right padding); positions then count real tokens only.
        doc_ids (B, T): packed rows, block-diagonal causal attention and per-document positions.
        cache: a KVCache from new_cache(); the call appends this chunk and attends to everything before it.
        With a prefix / prompt adapter and no cache, the call makes one (new_cache): the tokens follow the prefix.
        return_hidden: also return the final hidden states (B, T, C), after the last norm.
        embeds (B, T, C): input vectors in place of embed(idx) (idx may then be None): prompt tuning's."""
        B, T = idx.shape if embeds is None else embeds.shape[:2]
        device = idx.device if embeds is None else embeds.device
        if cache is None and self.prefix is not None and self.prefix.enabled:
            cache = self.new_cache(B, T)
        valid = attention_mask.bool() if attention_mask is not None else None
        if cache is not None:
            written = torch.ones(B, T, dtype=torch.bool, device=device) if valid is None else valid  # real keys
            cache.valid.index_copy_(1, cache.slots(T), written)
        if positions is None:
            base = cache.seen[:, None] if cache is not None else 0
            if doc_ids is not None:
                positions = base + positions_from_docs(doc_ids)
            elif valid is not None or cache is not None:
                real = valid.long() if valid is not None else torch.ones(B, T, dtype=torch.long, device=device)
                positions = (base + real.cumsum(1) - 1).clamp(min=0)  # (B, T)
            else:
                positions = torch.arange(T, device=device).expand(B, T)
        if cache is not None:
            mask = build_attn_mask(T, cache.pos, cache.valid, doc_ids)
        elif doc_ids is not None and device.type in FLEX_DEVICES and not (self.training and self.cfg.dropout):
            mask = doc_block_mask(doc_ids, valid)
        elif valid is not None or doc_ids is not None:
            mask = build_attn_mask(T, 0, valid, doc_ids)
        else:
            mask = None  # plain causal: the fast is_causal kernel

        x, rope = self.embed_positions(idx, positions, embeds)
        x = self.drop(x)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and cache is None:  # recompute activations in backward
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, None, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache)
        h = self.norm(x)
        if cache is not None:
            cache.pos += T
            cache.seen += T if valid is None else valid.sum(1)
        out = self.lm_head(h) if self.cfg.head == "lm" else self.score(h).squeeze(-1)
        return (out, h) if return_hidden else out


# -----------------------------------------------------------------------------
# Log-probs and sampling


def token_logprobs(logits, ids, mask=None):
    """log p(ids[t] | ids[<t]) aligned with ids: logits (B, T, V) from a forward over ids (B, T) -> (B, T).

    Position 0 has no prediction and gets 0. Computed in fp32. If mask (B, T) is given the result is zero where
    mask is 0 (even where the logits make that token impossible, -inf), so `.sum(-1)` is the log-probability of
    the supervised tokens."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    out = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    out = F.pad(out, (1, 0))  # (B, T)
    return out if mask is None else out.masked_fill(mask == 0, 0.0)


def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0, banned=None):
    """The logits a sampler draws from: the `banned` ids (a (V,) bool mask, e.g. from `ban_mask`) set to -inf,
    then divided by temperature, then top-k, then top-p (nucleus) filtered with -inf. log_softmax of this is the
    sampling distribution; temperature 0 means greedy (no scaling)."""
    logits = logits.float()
    if banned is not None:
        logits = logits.masked_fill(banned, float("-inf"))
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


def ban_mask(vocab_size, ids, device=None):
    """(V,) bool mask, True at `ids`: the tokens a sampler must never emit."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[list(ids)] = True
    return mask


def decode_step(model, tok, cache):
    """One new token per row, tok (B, 1), through the cache -> next-token logits (B, V): the step `generate` repeats.
    With the static cache its shapes never change, so `torch.compile` compiles it once per batch size and length."""
    return model(tok, cache=cache)[:, -1]


@functools.cache
def compiled_decode_step(device_type):
    """decode_step through torch.compile, made once per device type: CUDA graphs on CUDA ("reduce-overhead")."""
    return torch.compile(decode_step, mode="reduce-overhead" if device_type == "cuda" else None, dynamic=False)


def cache_length(n):
    """The cache length for n positions: the next power of two, at least 64. A compiled decode step compiles once per
    cache length (and batch size), so a run with prompts of many lengths meets a few shapes, not one per call."""
    return max(64, 1 << (n - 1).bit_length())


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, stop_ids=(), pad_id=0,
             generator=None, banned_ids=(), compile=False):
    """Batched sampling with the KV cache. prompts: list of id lists (any lengths; left padded here).

    Returns (tokens, logprobs, mask), each (B, N) with N <= max_new_tokens: the sampled tokens (pad_id after a
    row stopped), their log-probs under the distribution they were drawn from (`filter_logits`), and 1 on
    generated tokens (the stop token included). temperature=0 is greedy. pad_id and `banned_ids` are never
    emitted: their logits are -inf before anything else, so a sampled token is never confused with padding; a
    trainer that scores these tokens must ban the same ids (filter_logits(..., banned=ban_mask(V, ids))).

    The prompt goes through in one eager forward (prefill), then one `decode_step` per token; compile=True runs
    that step through torch.compile (CUDA graphs on GPU), which pays where per-op overhead dominates a step."""
    device = next(model.parameters()).device
    banned = ban_mask(model.cfg.vocab_size, {pad_id, *banned_ids}, device)
    ids, mask = pad_left(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    B, P = ids.shape
    step = compiled_decode_step(device.type) if compile else decode_step
    cache = model.new_cache(B, cache_length(P + max_new_tokens))
    logits = model(ids, attention_mask=mask, cache=cache)[:, -1]  # (B, V)
    stop = torch.tensor(list(stop_ids) or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logps, masks = [], [], []
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(filter_logits(logits, temperature, top_k, top_p, banned), dim=-1)  # (B, V)
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
        logits = step(model, tokens[-1][:, None], cache)
    return torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(masks, 1)


def last_token_index(mask):
    """(B, T) 0/1 mask -> (B,) index of the last 1 in each row: where a reward model reads its score."""
    T = mask.shape[1]
    return T - 1 - mask.flip(1).long().argmax(1)


def last_token_values(values, mask):
    """values (B, T) from a scalar head, mask (B, T) 1 on real tokens -> (B,) the value at each row's last real
    token: a reward model's score of the response ending there (right or left padding; a pad is never read)."""
    return values.gather(1, last_token_index(mask)[:, None]).squeeze(1)


def kl_divergence(logits_p, logits_q):
    """KL(p || q) per position from two logit tensors (..., V) -> (...), in nats, computed in fp32: the exact KL of
    two next-token distributions (not a sampled estimate)."""
    lp, lq = torch.log_softmax(logits_p.float(), -1), torch.log_softmax(logits_q.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2021): W x + (alpha / r) B A x, with A (r, in) random and B (out, r) zero at the start


class LoRALinear(nn.Module):
    """W x + s B A x with s = alpha / r (rsLoRA: alpha / sqrt(r), Kalajdzievski 2023, so a larger rank does not
    shrink the update). dora=True is DoRA (Liu et al. 2024): the weight split into a magnitude per output row and a
    direction, m * (W + s B A) / ||W + s B A||, m a trained vector that starts at ||W|| (so the start is the base
    exactly); the norm is treated as a constant in backward, as the paper does to save memory."""

    def __init__(self, base, rank, alpha, dropout=0.0, dora=False, rslora=False):
        super().__init__()
        self.base = base  # an nn.Linear, or any module with in/out_features (a quantised linear for QLoRA)
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as PEFT does
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.lora_magnitude = nn.Parameter(self.base_weight().norm(dim=1).detach().float()) if dora else None
        self.enabled, self.merged = True, False

    def base_weight(self):
        """The frozen (out, in) weight, a quantised base's dequantised."""
        return self.base.weight if isinstance(self.base, nn.Linear) else self.base.dequantize()

    def delta(self):
        delta = (self.lora_b @ self.lora_a) * self.scale  # (out, in)
        mask = getattr(self.base, "weight_mask", None)  # a pruned base (prune.py): the adapter keeps its zeros too
        return delta if mask is None else delta * mask

    def dora_scale(self, weight):
        """DoRA's m / ||W + delta|| per output row, (out,), the norm detached."""
        return self.lora_magnitude / weight.float().norm(dim=1).detach()

    def merged_weight(self):
        """The plain (out, in) weight this adapter amounts to: W + delta, for DoRA row-scaled by m / ||W + delta||."""
        base = self.base_weight().detach()  # a quantised base dequantises once
        weight = base + self.delta().detach().to(base.dtype)
        if self.lora_magnitude is None:
            return weight
        return (self.dora_scale(weight)[:, None].detach() * weight.float()).to(weight.dtype)

    def merge(self):
        if not isinstance(self.base, nn.Linear):
            raise UserError("a LoRA adapter over a quantised layer does not merge in place; plain_state_dict writes "
                            "the layer dense with the adapter merged in")
        if not self.merged:
            self.unmerged_weight = self.base.weight.data.clone() if self.lora_magnitude is not None else None
            self.base.weight.data = self.merged_weight()
            self.merged = True

    def unmerge(self):
        if self.merged:
            if self.lora_magnitude is not None:  # DoRA's row scaling does not subtract out: the base comes back whole
                self.base.weight.data = self.unmerged_weight
            else:
                self.base.weight.data -= self.delta().to(self.base.weight.dtype)
            self.merged = False

    def forward(self, x):
        y = self.base(x)
        if not self.enabled or self.merged:
            return y
        if self.lora_magnitude is not None:  # DoRA: m / ||W + delta|| * ((W + delta) x + b) - (that - 1) * b
            delta = self.delta()
            scale = self.dora_scale(self.base_weight() + delta).to(x.dtype)
            y = scale * (y + F.linear(x, delta.to(x.dtype)))
            bias = getattr(self.base, "bias", None)
            return y if bias is None else y - (scale - 1) * bias
        if getattr(self.base, "weight_mask", None) is not None:
            return y + F.linear(self.dropout(x), self.delta().to(x.dtype))  # masked: the product must be formed
        return y + (self.dropout(x) @ self.lora_a.t().to(x.dtype) @ self.lora_b.t().to(x.dtype)) * self.scale


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def apply_lora(model, rank, alpha=None, dropout=0.0, targets=LORA_TARGETS, dora=False, rslora=False):
    """Freeze the model and wrap every linear whose name ends in one of `targets` with a LoRA (or DoRA) adapter."""
    if dora and dropout:
        raise UserError("DoRA here takes no LoRA dropout (its magnitude scales the whole output): set it to 0")
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            # an nn.Linear, or a quantised linear (quantize.QuantLinear: QLoRA); not a LoRALinear already
            if child_name in targets and hasattr(child, "in_features"):
                setattr(module, child_name, LoRALinear(child, rank, alpha or 2 * rank, dropout, dora, rslora))
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def lora_disabled(model):
    """Run the base model: with LoRA, DoRA, a prefix or a prompt adapter the frozen base is the reference policy,
    no second copy needed."""
    layers = lora_layers(model)
    merged = [m for m in layers if m.merged]
    prefix = getattr(getattr(model, "module", model), "prefix", None)
    for m in merged:  # a merged delta lives inside the base weight: take it out while the base runs
        m.unmerge()
    for m in layers:
        m.enabled = False
    if prefix is not None:
        prefix.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True
        for m in merged:
            m.merge()
        if prefix is not None:
            prefix.enabled = True


def plain_state_dict(model, dense=False):
    """The state dict of the model as a plain Transformer: LoRA / DoRA merged in, adapter tensors dropped; a prefix
    stays (prefix.*, its config names it), its training-time MLP folded into plain keys and values.

    A quantised layer (a module with a dequantize() method: quantize.QuantLinear) keeps its packed tensors, unless
    dense=True (exports) or a LoRA adapter over it is merged in (QLoRA): then it is written as a float weight."""
    model = getattr(model, "module", model)  # unwrap DDP
    sd = {}
    for name, t in model.state_dict().items():
        if ".lora_" in name:
            continue
        sd[name.replace(".base.", ".")] = t.detach().clone()
    bases = {id(m.base) for m in lora_layers(model)}
    for name, m in model.named_modules():
        if id(m) in bases:
            continue  # its LoRALinear, named without ".base", stands for it
        lora = isinstance(m, LoRALinear) and m.enabled and not m.merged
        base = m.base if isinstance(m, LoRALinear) else m
        if hasattr(base, "dequantize") and (dense or lora):
            packed = [k for k in sd if k.startswith(name + ".") and k != name + ".bias"]
            for k in packed:
                del sd[k]
            sd[name + ".weight"] = base.dequantize().detach()
        if lora:
            sd[name + ".weight"] = m.merged_weight()
    if getattr(model, "prefix", None) is not None and model.prefix.mlp is not None:  # fold the reparameterisation
        for k in [k for k in sd if k.startswith("prefix.")]:
            del sd[k]
        sd["prefix.keys"], sd["prefix.values"] = (t.detach().clone() for t in model.prefix.kv())
    return sd


def lora_state_dict(model):
    """What LoRA training changes, for --resume: the adapters and any parameter left trainable beside them (the
    fresh value head of a reward model)."""
    model = getattr(model, "module", model)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k or k in trainable}



# -----------------------------------------------------------------------------
# Prefix-tuning (Li & Liang 2021) / P-tuning v2 (Liu et al. 2022) and prompt tuning (Lester et al. 2021): what the
# tokens see is a KV cache whose first p slots are already filled, so training and sampling go through the cache


def keys_values_of(model, ids=None, embeds=None):
    """The keys and values a model makes of one row of p inputs, token ids (1, p) or embeddings (1, p, C), through a
    cache of exactly p slots -> (keys, values), (n_layer, n_kv_head, p, head_dim) each."""
    x = ids if embeds is None else embeds
    ref = next(model.parameters())
    one = KVCache(model.cfg, 1, x.shape[1], x.device, ref.dtype if embeds is None else embeds.dtype)
    model(ids, embeds=embeds, cache=one)
    return torch.stack([k[0] for k in one.k]), torch.stack([v[0] for v in one.v])


class Prefix(nn.Module):
    """kind "prefix": p learned keys and values at every layer (after RoPE: they have no position), optionally
    produced during training by an MLP over a (p, d_model) table (Li & Liang's stabiliser; `plain_state_dict` folds it
    into plain keys and values). kind "prompt": p learned input embeddings, run through the frozen model at
    positions 0..p-1. Either way the tokens follow at positions p.., as if after p tokens of context.
    With the MLP (apply_prefix(..., reparam)) the keys and values are start + MLP(table), start the initial ones."""

    def __init__(self, cfg):
        super().__init__()
        self.kind, self.length, self.enabled = cfg.prefix_kind, cfg.prefix_len, True
        if self.kind == "prompt":
            self.embeds = nn.Parameter(torch.zeros(self.length, cfg.d_model))
        else:
            shape = (cfg.n_layer, cfg.n_kv_head, self.length, cfg.head_size)
            self.keys, self.values = nn.Parameter(torch.zeros(shape)), nn.Parameter(torch.zeros(shape))
        self.mlp = None  # the reparameterisation, training only (apply_prefix(..., reparam=hidden))

    def kv(self):
        """The prefix's keys and values, (n_layer, n_kv_head, p, head_dim) each."""
        if self.mlp is None:
            return self.keys, self.values
        L, nkv, p, hd = self.keys.shape
        out = (self.start + self.mlp(self.table)).view(p, 2, L, nkv, hd).permute(1, 2, 3, 0, 4)  # (2, L, nkv, p, hd)
        return out[0], out[1]

    def fill(self, model, cache):
        """Write the prefix into the first p slots of an empty cache, for every row."""
        p = self.length
        if self.kind == "prompt":  # the virtual tokens through the frozen model, once, shared by every row
            keys, values = keys_values_of(model, embeds=self.embeds[None].to(cache.k[0].dtype))
        else:
            keys, values = self.kv()
        for layer in range(len(cache.k)):
            cache.k[layer][:, :, :p] = keys[layer].to(cache.k[layer].dtype)
            cache.v[layer][:, :, :p] = values[layer].to(cache.v[layer].dtype)
        cache.valid[:, :p] = True
        cache.seen += p
        cache.pos += p


def apply_prefix(model, length, kind="prefix", reparam=0, seed=0):
    """Freeze the model and give it a prefix ("prefix") or prompt ("prompt") adapter of `length` slots, started
    from `length` random vocabulary tokens as the papers advise: their embeddings (prompt) or the keys and values
    the model makes of them (prefix). reparam > 0 (prefix only): train it through an MLP of that hidden width, as
    start + MLP(table) with the MLP's last layer zero, so it starts at the same keys and values."""
    if getattr(model, "prefix", None) is not None:
        raise UserError("this model already has a prefix / prompt adapter")
    if reparam and kind != "prefix":
        raise UserError("the MLP reparameterisation is prefix-tuning's (kind 'prefix'), not prompt tuning's")
    model.requires_grad_(False)
    ref = next(model.parameters())
    model.cfg = dataclasses.replace(model.cfg, prefix_len=length, prefix_kind=kind)
    prefix = Prefix(model.cfg).to(ref.device)
    ids = torch.randint(0, model.cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(ref.device)
    with torch.no_grad():
        if kind == "prompt":
            prefix.embeds.copy_(model.embed.weight[ids[0]].float())
        else:
            keys, values = keys_values_of(model, ids)
            prefix.keys.copy_(keys), prefix.values.copy_(values)
    if reparam:  # the keys and values become start + MLP(table), the MLP's last layer zero: the same start
        L, nkv, p, hd = prefix.keys.shape
        prefix.keys.requires_grad_(False), prefix.values.requires_grad_(False)
        prefix.register_buffer("start", torch.stack([prefix.keys, prefix.values]).permute(3, 0, 1, 2, 4).reshape(p, -1)
                               .clone())  # (p, 2 * L * nkv * hd)
        prefix.table = nn.Parameter(torch.randn(p, model.cfg.d_model, device=ref.device) * 0.02)
        prefix.mlp = nn.Sequential(nn.Linear(model.cfg.d_model, reparam), nn.Tanh(),
                                   nn.Linear(reparam, 2 * L * nkv * hd)).to(ref.device)
        nn.init.zeros_(prefix.mlp[2].weight), nn.init.zeros_(prefix.mlp[2].bias)
    model.prefix = prefix
    return model


# -----------------------------------------------------------------------------

def main():
    print(f"{'preset':<12} {'arch':<6} {'layers':>6} {'d_model':>7} {'heads':>6} {'kv':>3} {'vocab':>7} {'params':>12}")
    for name, p in PRESETS.items():
        cfg = Config(**{"vocab_size": 260, **p})
        with torch.device("meta"):
            n = Transformer(cfg).num_params()
        print(f"{name:<12} {cfg.arch:<6} {cfg.n_layer:>6} {cfg.d_model:>7} {cfg.n_head:>6} {cfg.n_kv_head:>3} "
              f"{cfg.vocab_size:>7} {n:>12,}")


if __name__ == "__main__":
    main()
