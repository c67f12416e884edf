"""
quantize.py: post-training quantisation. Weights to 8, 4, 3 or 2 bits (RTN, GPTQ, AWQ), W8A8 (SmoothQuant), NF4
(QLoRA's base), packed into a checkpoint every script loads; and GGUF files llama.cpp runs.

    python quantize.py --model sft.pt --method rtn --bits 8 --group-size 0 --out int8.pt     # per output channel
    python quantize.py --model sft.pt --method gptq --bits 4 --data data/toy/pretrain.txt --out gptq.pt
    python quantize.py --model sft.pt --method awq --bits 3 --data data/toy/pretrain.txt --out awq.pt
    python quantize.py --model sft.pt --method smoothquant --data data/toy/pretrain.txt --out w8a8.pt
    python quantize.py --model sft.pt --method nf4 --out nf4.pt   # then: sft.py --model nf4.pt --lora-rank 16
    python quantize.py --model sft.pt --method fp8 --out fp8.pt   # W8A8 e4m3 (--fp8-scales tensor: per tensor)
    python quantize.py --model sft.pt --method gptq --bits 4 --data ... --out gptq.pt --export-hf gptq-hf  # + vLLM's
    python quantize.py --model sft.pt --method gguf --gguf-type q4_0 --out model.gguf       # llama.cpp's own types

In reading order:
  1. The grid: `quantize_rtn` / `dequantize` (round to nearest on a per-group uniform grid), `pack_bits` /
     `unpack_bits` (the packed layout, below), NF4 (`nf4_values`, `quantize_nf4`), FP8 (`quantize_fp8`, `fp8_matmul`:
     torch._scaled_mm on e4m3 tensor cores, and its twin `fp8_matmul_ref`, what CPUs and the tests run).
  2. GPTQ (`gptq_quantize`): round one input column at a time and push its error onto the columns not yet rounded.
  3. AWQ (`awq_search`) and SmoothQuant (`smoothquant_scales`): per-input-channel scales, folded into the op before
     the linear (`fold_scales`) so the float model computes exactly what it did.
  4. `QuantLinear`: the packed weights in a module; on CUDA kernels.cu's int4 / int8 matmul (cuda_kernels.py), on the
     CPU torch's int8 / int4 kernels (fp8: _scaled_mm on CUDA) where they apply, else dequantise-then-matmul (the
     reference every fast path is tested against).
  5. Calibration as the papers do it: block by block, each block fed the outputs of the quantised blocks before it.
  6. Checkpoints: `load_quantized` (common.load_model calls it for these formats) and `main`.

The packed layout (what kernels.cu reads). A linear of `out` x `in` weights, b bits, group size g along the input
dimension (g = in when group_size is 0: one group per output channel), G = ceil(in / g) groups per row:
  qweight  uint8 (out, ceil(in / 8) * b): each row's codes, eight at a time in b bytes, little-endian: code j of
           the eight sits in bits [b*j, b*(j+1)) of the b-byte word. So for b = 4 byte k holds column 2k in its
           low nibble and 2k+1 in its high nibble; for b = 8 one code per byte. Rows end in zero codes up to a
           multiple of 8 columns.
  scales   fp16 (out, G): each group's step.
  zeros    uint8 (out, G): the code that stands for 0.0 (2^(b-1) for a symmetric grid).
           weight[r, c] = (code[r, c] - zeros[r, c // g]) * scales[r, c // g]
  NF4 (scheme "nf4"): 4-bit codes index the 16 NF4 values; weight[r, c] = NF4[code] * absmax[r, c // g], the absmax
  itself stored in 8 bits (double quantisation): absmax = absmax_q * absmax_scale[i // 256] + absmax_mean, i the
  group's index in row-major order.
  FP8 (schemes "fp8" and "fp8-tensor", formats w8a8-fp8 and w8a8-fp8-tensor): qweight float8_e4m3fn (out, in), the
  codes themselves; scales fp32 (out, 1), or (1, 1) for the tensor: weight[r, c] = code[r, c] * scales[r or 0, 0].
  Inputs are rounded to e4m3 on scales of their own at every call, per token (with per-row weight scales) or per tensor.
Embeddings, norms and the output head stay in floating point, as in GPTQ and AWQ. --export-hf also writes the model
as a Hugging Face directory in the compressed-tensors format (formats.export_hf(..., compressed=True)): vLLM serves it.
"""

import contextlib
import importlib.util
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
import model as M
from model import UserError


# -----------------------------------------------------------------------------
# The math, sections 1 to 3: pure functions, torch and math only (this block can be copied alone)
#
# 1. The grid: round to nearest (RTN), pack, NF4


def _round_up_fp16(x):
    """x (positive fp32) -> the nearest fp16 value >= x: a stored scale never shrinks a group's range."""
    h = x.clamp(max=65504.0).half()
    low = h.float() < x
    return torch.where(low, torch.nextafter(h, torch.tensor(float("inf"), dtype=torch.float16)), h)


def _groups(W, group_size):
    """W (out, in) -> (W as (out, G, g), g): zero columns pad the last group (the grid spans 0 anyway)."""
    out, n = W.shape
    g = group_size or n
    G = -(-n // g)
    return F.pad(W, (0, G * g - n)).view(out, G, g), g


def grid_params(W, bits, group_size, symmetric=False):
    """The uniform grid of every group: (scales fp16 (out, G), zeros uint8 (out, G)).

    Asymmetric (min-max, as GPTQ's quantizer): the group's range [min(w, 0), max(w, 0)] in 2^bits - 1 steps, zero
    the code nearest to 0.0. Symmetric: steps of 2 max|w| / (2^bits - 1) around the code 2^(bits-1). The fp16 step
    is rounded up, so every weight of the group lies within half a step of a code."""
    Wg, _ = _groups(W.float(), group_size)
    maxq = 2 ** bits - 1
    if symmetric:
        scale = 2 * Wg.abs().amax(-1) / maxq
    else:
        lo, hi = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)
        scale = (hi - lo) / maxq
    scale = _round_up_fp16(torch.where(scale > 0, scale, torch.ones_like(scale)))  # an all-zero group: any step
    if symmetric:
        zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.uint8)
    else:
        zero = torch.round(-lo / scale.float()).clamp(0, maxq).to(torch.uint8)
    return scale, zero


def round_to_grid(W, scales, zeros, bits, group_size):
    """W (out, n) -> codes uint8 (out, n): the nearest code of each weight's group, clipped to [0, 2^bits - 1]."""
    n = W.shape[1]
    g = group_size or n
    s = scales.float().repeat_interleave(g, 1)[:, :n]
    z = zeros.float().repeat_interleave(g, 1)[:, :n]
    return torch.clamp(torch.round(W.float() / s) + z, 0, 2 ** bits - 1).to(torch.uint8)


def quantize_rtn(W, bits=4, group_size=128, symmetric=False):
    """Round to nearest: W (out, in) -> (codes uint8 (out, in), scales fp16 (out, G), zeros uint8 (out, G)).
    group_size 0 is one group per output channel (the usual int8)."""
    scales, zeros = grid_params(W, bits, group_size, symmetric)
    return round_to_grid(W, scales, zeros, bits, group_size), scales, zeros


def dequantize(codes, scales, zeros, group_size):
    """(codes, scales, zeros) -> W fp32 (out, in): (code - zero) * scale, group by group."""
    n = codes.shape[1]
    g = group_size or n
    s = scales.float().repeat_interleave(g, 1)[:, :n]
    z = zeros.float().repeat_interleave(g, 1)[:, :n]
    return (codes.float() - z) * s


def pack_bits(codes, bits):
    """codes uint8 (out, n), each < 2^bits -> uint8 (out, ceil(n / 8) * bits): eight codes per `bits` bytes,
    code j of the eight in bits [bits*j, bits*(j+1)) of their little-endian word (the layout in the docstring)."""
    out, n = codes.shape
    c = F.pad(codes, (0, -n % 8)).to(torch.int64).view(out, -1, 8)
    word = torch.zeros(c.shape[:2], dtype=torch.int64, device=codes.device)
    for j in range(8):
        word |= c[..., j] << (bits * j)
    return torch.stack([(word >> (8 * k)) & 0xFF for k in range(bits)], -1).view(out, -1).to(torch.uint8)


def unpack_bits(packed, bits, n):
    """pack_bits' inverse: uint8 (out, ceil(n / 8) * bits) -> codes uint8 (out, n)."""
    out = packed.shape[0]
    if bits == 8:
        return packed[:, :n]
    if bits == 4:  # the same layout, the common case made fast: low nibble first
        return torch.stack([packed & 0xF, packed >> 4], -1).view(out, -1)[:, :n]
    b = packed.to(torch.int64).view(out, -1, bits)
    word = torch.zeros(b.shape[:2], dtype=torch.int64, device=packed.device)
    for k in range(bits):
        word |= b[..., k] << (8 * k)
    codes = torch.stack([(word >> (bits * j)) & (2 ** bits - 1) for j in range(8)], -1)
    return codes.view(out, -1)[:, :n].to(torch.uint8)


def nf4_values():
    """The 16 NF4 values (Dettmers et al. 2023, QLoRA, appendix E): quantiles of N(0, 1), 8 on the positive side and
    7 on the negative, plus an exact 0, scaled into [-1, 1]. The outermost quantile is taken at probability
    0.9677 (bitsandbytes' offset, the mean of the 1/32 and 1/30 quantiles' positions) since the 1st is infinite."""
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (v / v.abs().max()).float()


NF4 = nf4_values()
DQ_BLOCK = 256  # absmax values per second-level block (QLoRA's double quantisation)


def quantize_nf4(W, group_size=64):
    """NF4 with double quantisation (QLoRA): W (out, in) -> (codes uint8 (out, in), absmax_q int8 (out, G),
    absmax_scale fp32 (ceil(out G / 256),), absmax_mean fp32 ()).

    Each group's absmax is stored in 8 bits: minus its mean over the tensor, symmetric int8 in blocks of 256 (QLoRA
    uses 8-bit floats there). Codes are the NF4 value nearest to w / absmax, the stored (8-bit) absmax."""
    Wg, g = _groups(W.float(), group_size)
    absmax = Wg.abs().amax(-1)  # (out, G)
    mean = absmax.mean()
    flat = absmax.flatten() - mean
    blocks = F.pad(flat, (0, -flat.numel() % DQ_BLOCK)).view(-1, DQ_BLOCK)
    scale = (blocks.abs().amax(-1) / 127).clamp(min=1e-12)
    q = torch.round(blocks / scale[:, None]).clamp(-127, 127).to(torch.int8)
    stored = nf4_absmax(q.flatten()[:flat.numel()].view_as(absmax), scale, mean)
    x = Wg / torch.where(stored > 0, stored, torch.ones_like(stored))[..., None]
    codes = (x[..., None] - NF4).abs().argmin(-1).to(torch.uint8).view(W.shape[0], -1)[:, :W.shape[1]]
    return codes, q.flatten()[:flat.numel()].view_as(absmax), scale, mean


def nf4_absmax(absmax_q, absmax_scale, absmax_mean):
    """The double-quantised absmax back: int8 (out, G) -> fp32 (out, G)."""
    flat = absmax_q.flatten().float()
    s = absmax_scale.repeat_interleave(DQ_BLOCK)[:flat.numel()]
    return (flat * s + absmax_mean).view_as(absmax_q)


def dequantize_nf4(codes, absmax_q, absmax_scale, absmax_mean, group_size):
    n = codes.shape[1]
    absmax = nf4_absmax(absmax_q, absmax_scale, absmax_mean)
    return NF4.to(codes.device)[codes.long()] * absmax.repeat_interleave(group_size, 1)[:, :n]


# FP8 (ModelOpt's and vLLM's W8A8 on Hopper): e4m3fn, 1 sign, 4 exponent and 3 mantissa bits, no infinities, largest
# finite value 448. A tensor is stored as its e4m3 codes and an fp32 scale, amax / 448 (the largest |w| lands on
# 448), per tensor or per row; activations get the same treatment at every call ("dynamic" scales), per token or per
# tensor (one scale for all the tokens of a batch, as vLLM's dynamic per-tensor scale: a sequence's outputs then
# depend on what is batched with it; per token they do not). Rounding is the cast's (nearest, ties to even): a normal
# value is off by at most 2^-4 of itself.
FP8_MAX = 448.0


def quantize_fp8(W, per_row=True):
    """W (..., n) -> (codes float8_e4m3fn (..., n), scales fp32 (..., 1), or all ones-shaped (1, ..., 1) per tensor).
    Weights: a row per output channel; activations: a row per token. An all-zero row gets scale 1."""
    W = W.float()
    amax = W.abs().amax(-1, keepdim=True) if per_row else W.abs().amax().reshape([1] * W.dim())
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (W / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales  # the cast overflows to NaN: clamp


def dequantize_fp8(codes, scales):
    """(codes e4m3 (..., n), scales fp32 (..., 1) or (1, ..., 1)) -> fp32 (..., n)."""
    return codes.float() * scales


def fake_quant_fp8(x, per_token=True):
    """x rounded to e4m3 on a dynamic scale and back, in x's dtype; the gradient passes straight through (QLoRA over
    an FP8 base trains the layers below)."""
    y = dequantize_fp8(*quantize_fp8(x.detach(), per_token)).to(x.dtype)
    return x + (y - x).detach() if x.requires_grad else y


def fp8_matmul_ref(x, codes, scales, per_token=True):
    """x (N, in) float, codes e4m3 (out, in), scales fp32 (out, 1) or (1, 1) -> y (N, out) fp32: x quantised to e4m3
    (per token with per-row weight scales, else per tensor), both dequantised, an fp32 matmul. fp8_matmul's twin."""
    return fake_quant_fp8(x.float(), per_token) @ dequantize_fp8(codes, scales).t()


def fp8_matmul(x, codes, scales, per_token=True):
    """fp8_matmul_ref on e4m3 tensor cores: torch._scaled_mm (CUDA, compute capability >= 8.9: Ada, Hopper), the
    scales applied to its fp32 accumulator, bf16 out (what row-wise scaling requires); the reference elsewhere (and
    where the sizes miss _scaled_mm's multiples of 16)."""
    if not (x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9) and x.shape[1] % 16 == 0
            and codes.shape[0] % 16 == 0):
        return fp8_matmul_ref(x, codes, scales, per_token)
    return scaled_mm_fp8(x, codes, scales, per_token)


def scaled_mm_fp8(x, codes, scales, per_token=True):
    """fp8_matmul's tensor-core call, on whatever device runs torch._scaled_mm (recent CPU builds do too, slowly:
    the tests check the call there)."""
    N = x.shape[0]
    xq, sx = quantize_fp8(F.pad(x, (0, 0, 0, -N % 16)), per_token)  # (N padded to 16, in): rows of zeros
    y = torch._scaled_mm(xq, codes.t(), scale_a=sx, scale_b=scales.t(), out_dtype=torch.bfloat16)
    return y[:N].float()


# 2. GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers")
#
# The layer's output error on calibration inputs X is ||W X - Q X||^2 = tr((W - Q) H (W - Q)^T) with H = X X^T.
# Rounding column i of W leaves an error e_i; the remaining (unrounded) columns absorb it best by the update
#   W[:, j] -= e_i / [H^-1]_ii * [H^-1]_ij   for j > i   (Optimal Brain Surgeon restricted to one row at a time),
# and H^-1 for the remaining columns is a trailing block of the Cholesky factor of H^-1 (the paper's step 3), so one
# factorisation serves every column. Updates are applied lazily, a block of 128 columns at a time.


def gptq_quantize(W, H, bits=4, group_size=128, damp=0.01, act_order=False, symmetric=False, block_size=128):
    """W (out, in), H (in, in) = sum of x x^T over calibration inputs -> (codes, scales, zeros) as quantize_rtn's.

    damp: fraction of the mean diagonal added to H (its inverse exists, the updates stay bounded). act_order: round
    columns by decreasing H_ii (the most-used inputs first, while many columns remain to absorb errors); the groups'
    grids are then fixed from W before any update, so the checkpoint's layout is the plain one (the reference's
    "static groups"). Without act_order a group's grid is set when its first column is reached, from the weights
    updated by then. Inputs never seen (H_ii = 0) get weight 0, as in the reference."""
    W = W.float().clone()
    H = H.double().clone()  # the Cholesky of a near-singular fp32 Hessian can fail; fp64 is cheap at these sizes
    out, n = W.shape
    g = group_size or n
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if act_order:
        static_scales, static_zeros = grid_params(W, bits, group_size, symmetric)
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()

    G = -(-n // g)
    scales, zeros = torch.zeros(out, G, dtype=torch.float16), torch.zeros(out, G, dtype=torch.uint8)
    if act_order:
        scales, zeros = static_scales, static_zeros
    codes = torch.zeros(out, n, dtype=torch.uint8)
    maxq = 2 ** bits - 1
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            group = int(perm[col]) // g
            if not act_order and col % g == 0:  # a new group: its grid from the columns as they are now
                span = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :g]
                scales[:, group:group + 1], zeros[:, group:group + 1] = grid_params(span, bits, 0, symmetric)
            s, z = scales[:, group].float(), zeros[:, group].float()
            q = torch.clamp(torch.round(W1[:, i] / s) + z, 0, maxq)
            codes[:, col] = q.to(torch.uint8)
            err = (W1[:, i] - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes[:, torch.argsort(perm)], scales, zeros


# 3. Per-input-channel scales: AWQ (Lin et al. 2023) and SmoothQuant (Xiao et al. 2022)
#
# For any s > 0, W x = (W diag(s)) (diag(s)^-1 x). Dividing the op before the linear (a norm's weight, or the rows
# of the linear feeding it) by s and multiplying the linear's columns by s leaves the float model unchanged; only
# what is rounded changes. AWQ scales up the input channels with large activations, so their weights lose less to
# rounding; SmoothQuant moves activation outliers into the weights, so int8 activations lose less.


def awq_scales(x_absmean, alpha):
    """s = mean|x|^alpha per input channel, normalised to a geometric mean of the extremes of 1 (AutoAWQ's)."""
    s = x_absmean.float().clamp(min=1e-4) ** alpha
    return s / (s.max() * s.min()).sqrt()


def awq_search(x, weights, bits=4, group_size=128, symmetric=False, grid=20):
    """x (N, in) calibration inputs shared by `weights` [(out_i, in)] -> (s (in,), alpha, errors per alpha).

    Grid search over alpha in {0, 1/grid, ...}: the scales whose rounded, scaled weights give the smallest mean
    squared output error on x. alpha = 0 is s = 1, plain RTN, so the search never does worse than RTN on x. (The
    paper measures the error at the block's output, e.g. after attention; we measure it at these linears' outputs.)"""
    x = x.float()
    W = torch.cat([w.float() for w in weights])
    reference = x @ W.t()
    x_absmean = x.abs().mean(0)
    errors, best = [], None
    for i in range(grid):
        alpha = i / grid
        s = awq_scales(x_absmean, alpha)
        Wq = dequantize(*quantize_rtn(W * s, bits, group_size, symmetric), group_size) / s
        err = (x @ Wq.t() - reference).pow(2).mean().item()
        errors.append(err)
        if best is None or err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], errors


def smoothquant_scales(act_absmax, weight_absmax, alpha=0.5):
    """s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha) (SmoothQuant, eq. 4): alpha of the activations' outliers
    migrates into the weights. act_absmax (in,) over calibration tokens, weight_absmax (in,) over output rows."""
    return (act_absmax.float().clamp(min=1e-5) ** alpha / weight_absmax.float().clamp(min=1e-5) ** (1 - alpha)
            ).clamp(min=1e-5)


@torch.no_grad()
def fold_scales(prev, linears, s):
    """x -> x / s in `prev` (a norm: its weight and bias; a linear: its output rows), W -> W diag(s) in `linears`."""
    if prev.weight.dim() == 2:  # a linear
        prev.weight.div_(s[:, None])
    else:
        prev.weight.div_(s)
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s)
    for lin in linears:
        lin.weight.mul_(s[None, :])


def scale_groups(block, cfg):
    """(op before, [linears reading its output], name of the first) where a per-channel scale folds exactly: the
    norms before q/k/v and before the MLP; v before o while each v head serves one query head (with grouped-query
    attention one v channel feeds several heads, which would need one scale); up before down in SwiGLU (silu(gate)
    * up is linear in up; GPT-2's GELU is not, so its down is left alone)."""
    a, m = block.attn, block.mlp
    groups = [(block.norm1, [a.q, a.k, a.v], "q"),
              (block.norm2, [m.gate, m.up] if cfg.arch == "llama" else [m.up], "up")]
    if cfg.n_kv_head == cfg.n_head:
        groups.append((a.v, [a.o], "o"))
    if cfg.arch == "llama":
        groups.append((m.up, [m.down], "down"))
    return groups


# -----------------------------------------------------------------------------
# 4. QuantLinear: packed weights, dequantise-then-matmul as the reference, torch's CPU kernels where they apply


class _DequantMatmul(torch.autograd.Function):
    """y = x W^T with W dequantised on the fly in forward and again in backward, never kept: QLoRA's memory saving
    (autograd would otherwise hold every layer's float weight until backward)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.dequantize().to(x.dtype).t()

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantize().to(grad.dtype), None


def fake_quant_per_token(x, bits=8):
    """Dynamic symmetric activation quantisation, one scale per token (SmoothQuant's W8A8 "per-token")."""
    qmax = 2 ** (bits - 1) - 1
    s = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / qmax
    return torch.round(x / s).clamp(-qmax, qmax) * s


FP8_SCHEMES = ("fp8", "fp8-tensor")  # e4m3 weights and activations: per row and per token, or per tensor


# torch's weight-only CPU kernels are built for decoding, with bf16 activations (given fp32 ones they fall back to a
# path ~20x slower than a dense matmul): at a few rows they read 4x / 8x fewer weight bytes than fp32; at hundreds
# of rows (prefill, calibration, training) a dense matmul on the dequantised weight is far faster
FAST_ROWS = 16


class QuantLinear(nn.Module):
    """A linear layer holding the packed layout of the module docstring (buffers, saved in the state dict).

    scheme "int": (code - zero) * scale; "nf4": NF4[code] * absmax. act_bits 8: inputs rounded to int8 per token
    first (W8A8). On CUDA, without grad, int4 / int8 layers whose group size kernels.cu takes (a multiple of 32 /
    16 dividing the inputs) run its kernels (cuda_kernels.int_matmul). On the CPU forward uses torch's int8 / int4
    weight-only CPU kernels when the layer fits them (symmetric int8 per channel; int4 with in % group_size == 0
    and out % 16 == 0), with no grad, fp32 inputs and at most FAST_ROWS rows, the inputs rounded to bf16 for them
    (as gpt-fast runs them); else it dequantises and multiplies in the inputs' dtype, which is also what every
    kernel is tested against. "fp8" / "fp8-tensor": code * scale, the inputs
    rounded to e4m3 (per token / per tensor); on CUDA without grad, fp8_matmul (torch._scaled_mm where it runs)."""

    def __init__(self, in_features, out_features, bits, group_size, scheme="int", bias=None, act_bits=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.scheme, self.act_bits = bits, group_size or in_features, scheme, act_bits
        G = -(-in_features // self.group_size)
        if scheme in FP8_SCHEMES:  # e4m3 codes, unpacked, and fp32 scales: one per row, or one for the tensor
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn))
            self.register_buffer("scales", torch.ones(out_features if scheme == "fp8" else 1, 1))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, -(-in_features // 8) * bits, dtype=torch.uint8))
        if scheme == "nf4":
            self.register_buffer("absmax_q", torch.zeros(out_features, G, dtype=torch.int8))
            self.register_buffer("absmax_scale", torch.zeros(-(-out_features * G // DQ_BLOCK)))
            self.register_buffer("absmax_mean", torch.zeros(()))
        elif scheme == "int":
            self.register_buffer("scales", torch.zeros(out_features, G, dtype=torch.float16))
            self.register_buffer("zeros", torch.zeros(out_features, G, dtype=torch.uint8))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._kernel = None  # torch's own layout of the weights, built on the first fast call (not saved)
        self._dense = None  # the dequantised weight, held only inside dequantized()
        self._cuda_fits = None  # whether kernels.cu takes this layer (decided at the first call on CUDA)

    @classmethod
    def from_linear(cls, linear, bits, group_size, scheme="int", codes=None, scales=None, zeros=None, act_bits=0,
                    symmetric=False):
        """An nn.Linear -> QuantLinear: RTN (or NF4) of its weight, or the given codes and grid (GPTQ's)."""
        layer = cls(linear.in_features, linear.out_features, bits, group_size, scheme, linear.bias, act_bits)
        W = linear.weight.detach().float().cpu()
        if scheme in FP8_SCHEMES:
            layer.qweight, layer.scales = quantize_fp8(W, scheme == "fp8")
            return layer.to(linear.weight.device)
        if scheme == "nf4":
            codes, layer.absmax_q, layer.absmax_scale, layer.absmax_mean = quantize_nf4(W, layer.group_size)
        elif codes is None:
            codes, scales, zeros = quantize_rtn(W, bits, group_size, symmetric)
        if scheme != "nf4":
            layer.scales, layer.zeros = scales.half(), zeros
        layer.qweight = pack_bits(codes, bits)
        return layer.to(linear.weight.device)

    def codes(self):
        return self.qweight if self.scheme in FP8_SCHEMES else unpack_bits(self.qweight, self.bits, self.in_features)

    def dequantize(self):
        """The float weight (out, in), fp32 (on CUDA by kernels.cu where the layout fits it)."""
        kernels = self._cuda_kernels()
        if kernels is not None:
            return kernels.dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size)
        if self.scheme in FP8_SCHEMES:
            return dequantize_fp8(self.qweight, self.scales)
        if self.scheme == "nf4":
            return dequantize_nf4(self.codes(), self.absmax_q, self.absmax_scale, self.absmax_mean, self.group_size)
        return dequantize(self.codes(), self.scales, self.zeros, self.group_size)

    def _cuda_kernels(self):
        """cuda_kernels.py where this layer's weights are on CUDA in a layout kernels.cu takes and it is built, else
        None. Imported only here: quantize.py copied without cuda_kernels.py runs everywhere, without kernels.cu."""
        if not (self.qweight.is_cuda and self.scheme == "int"):
            return None
        if self._cuda_fits is None:  # decided once per layer (a find_spec at every call would cost a decode step)
            self._cuda_fits = importlib.util.find_spec("cuda_kernels") is not None
            if self._cuda_fits:
                import cuda_kernels
                self._cuda_fits = cuda_kernels.layout_refusal(self.bits, self.group_size, self.in_features) is None
        if not self._cuda_fits:
            return None
        import cuda_kernels
        return cuda_kernels if cuda_kernels.load() is not None else None

    def _fast(self, x):
        """y from kernels.cu on CUDA, torch's weight-only CPU kernels on the CPU, or None where neither applies."""
        if torch.is_grad_enabled() and x.requires_grad or self.scheme != "int":
            return None
        if x.is_cuda:
            K = self._cuda_kernels()
            return None if K is None else K.int_matmul(x, self.qweight, self.scales, self.zeros, self.bits,
                                                       self.group_size).view(-1, self.out_features)
        if x.dtype != torch.float32 or x.numel() > FAST_ROWS * self.in_features:
            return None
        per_channel = self.group_size == self.in_features
        xb = x.reshape(-1, self.in_features).to(torch.bfloat16)  # the kernels' fast paths take bf16 activations
        if self.bits == 8 and per_channel and bool((self.zeros == 128).all()):
            if self._kernel is None:
                self._kernel = ((self.codes().to(torch.int16) - 128).to(torch.int8), self.scales[:, 0].bfloat16())
            w, s = self._kernel
            return torch.ops.aten._weight_int8pack_mm(xb, w, s).float()
        if (self.bits == 4 and self.in_features % self.group_size == 0 and self.out_features % 16 == 0
                and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")):
            if self._kernel is None:  # torch's convention: w = (code - 8) * scale + zero, so zero = (8 - ours) * scale
                s = self.scales.float()
                offset = (8 - self.zeros.float()) * s
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32), 1)
                self._kernel = (packed, torch.stack([s.t(), offset.t()], -1).bfloat16().contiguous())
            packed, scales_and_zeros = self._kernel
            return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, self.group_size, scales_and_zeros).float()
        return None

    def forward(self, x):
        fp8 = self.scheme in FP8_SCHEMES
        if fp8 and x.is_cuda and self._dense is None and not (torch.is_grad_enabled() and x.requires_grad):
            y = fp8_matmul(x.reshape(-1, self.in_features), self.qweight, self.scales, self.scheme == "fp8")
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)  # tensor cores where they are, else the reference
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if fp8:
            x = fake_quant_fp8(x, self.scheme == "fp8")
        elif self.act_bits:
            x = fake_quant_per_token(x, self.act_bits)
        if self._dense is not None:  # inside dequantized(): calibration's many batches through one block
            return F.linear(x, self._dense.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        y = self._fast(x)
        if y is None:
            y = _DequantMatmul.apply(x, self)
        else:
            y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse=True):
        self._kernel = None  # a move or cast: the kernel's copy is rebuilt from the buffers
        # The packed layout moves between devices but keeps its dtypes: model.to(torch.bfloat16) would otherwise
        # round the fp16 / fp32 scales to bf16 (and cast e4m3 codes, a float dtype); the bias is cast as usual
        held = {n: self._buffers.pop(n) for n in list(self._buffers)}
        super()._apply(fn, recurse)
        for n, b in held.items():
            self.register_buffer(n, b.to(fn(b.new_empty(0)).device))
        return self

    def extra_repr(self):
        act = f", act_bits={self.act_bits}" if self.act_bits else ""
        kind = self.scheme if self.scheme in FP8_SCHEMES else f"{self.scheme}{self.bits}"
        return (f"in={self.in_features}, out={self.out_features}, {kind}, "
                f"group_size={self.group_size}{act}")


def hold_dequantized(module):
    """Every QuantLinear in module computes with its weight dequantised once, not at each call, from now on: the
    same outputs as the packed path (the reference dequantises the same way), at the float model's speed and
    memory. -> the layers. evaluate.py --dequantize: generating with int3 would otherwise dequantise every weight at
    every token."""
    layers = [m for m in module.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m._dense = m.dequantize()
    return layers


@contextlib.contextmanager
def dequantized(module):
    """hold_dequantized until the end of the with block (calibration's many batches through one block)."""
    layers = hold_dequantized(module)
    try:
        yield module
    finally:
        for m in layers:
            m._dense = None


def linear_names(model, kinds=(nn.Linear,)):
    """The names of the linears quantised: every nn.Linear (or other `kinds`) in the blocks, never the embedding or
    the head."""
    return [name for name, m in model.named_modules() if isinstance(m, kinds) and name.startswith("blocks.")]


def _swap(model, name, layer):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)


def weight_format(method, bits, group_size, scheme):
    """The checkpoint's "format": int8, int4-g128, nf4-g64, w8a8 (SmoothQuant's int8), w8a8-fp8 (e4m3, a scale per
    weight row and per token), w8a8-fp8-tensor (a scale per weight and per activation tensor)."""
    if method == "smoothquant":
        return "w8a8"
    if scheme in FP8_SCHEMES:
        return "w8a8-" + scheme
    name = "nf4" if scheme == "nf4" else f"int{bits}"
    return name if not group_size else f"{name}-g{group_size}"


# -----------------------------------------------------------------------------
# 5. Calibration, block by block (the plumbing, common.calibration_ids / block_inputs / collect_inputs, is shared
#    with prune.py)


@torch.no_grad()
def quantize_model(model, method="rtn", bits=4, group_size=128, symmetric=False, ids=None, damp=0.01,
                   act_order=False, alpha=0.5, awq_grid=20, awq_tokens=4096, batch_size=8, progress=None, act_bits=0,
                   fp8_scales="channel"):
    """Quantise every linear in the blocks in place -> the model, with `model.quant` its settings.

    rtn / nf4 need no data. gptq / awq / smoothquant run the calibration ids block by block: each block's inputs
    are the previous (already quantised) block's outputs, its linears' input statistics gathered on the float block,
    then its linears replaced and its outputs computed for the next. act_bits 8 rounds every quantised linear's
    inputs to int8 per token as well (W4A8 with rtn / gptq / awq; smoothquant is always W8A8). fp8 (no data) is W8A8
    in e4m3 with fp8_scales "channel" (a scale per weight row, and per token at run time) or "tensor"."""
    cfg = model.cfg
    model.eval()
    scheme = {"nf4": "nf4", "fp8": "fp8" if fp8_scales == "channel" else "fp8-tensor"}.get(method, "int")
    if method in ("smoothquant", "fp8"):
        bits, group_size, symmetric = 8, 0, True
    if scheme == "nf4":
        bits = 4
    act_bits = 8 if method in ("smoothquant", "fp8") else act_bits
    need = {"gptq": {"hessian"}, "awq": {"sample"}, "smoothquant": {"absmax"}}.get(method, set())
    xs, rope = C.block_inputs(model, ids, batch_size) if need else (None, None)
    for index, block in enumerate(model.blocks):
        names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        stats = C.collect_inputs(block, xs, rope, names, need, awq_tokens) if need else {}
        if method in ("awq", "smoothquant"):
            groups = scale_groups(block, cfg)
            if method == "smoothquant":
                groups = groups[:2]  # the paper smooths the inputs of q/k/v and of the MLP, where the outliers are
            for prev, linears, _ in groups:
                x_stats = stats[_name_in(block, linears[0])]
                if method == "awq":
                    s, _, _ = awq_search(x_stats["sample"], [lin.weight for lin in linears], bits, group_size,
                                         symmetric, awq_grid)
                else:
                    w_absmax = torch.cat([lin.weight.abs() for lin in linears]).amax(0)
                    s = smoothquant_scales(x_stats["absmax"], w_absmax, alpha)
                fold_scales(prev, linears, s.to(prev.weight.dtype))
        for name in names:
            linear = block.get_submodule(name)
            if method == "gptq":
                codes, scales, zeros = gptq_quantize(linear.weight, stats[name]["hessian"], bits, group_size, damp,
                                                     act_order, symmetric)
                layer = QuantLinear.from_linear(linear, bits, group_size, codes=codes, scales=scales, zeros=zeros,
                                                act_bits=act_bits)
            else:
                layer = QuantLinear.from_linear(linear, bits, group_size, scheme, act_bits=act_bits,
                                                symmetric=symmetric)
            _swap(block, name, layer)
        if need:
            with dequantized(block):
                xs = [block(x, rope, None, None) for x in xs]
        if progress:
            progress(index)
    model.quant = {"format": weight_format(method, bits, group_size, scheme), "method": method, "bits": bits,
                   "group_size": group_size, "symmetric": symmetric, "scheme": scheme, "act_bits": act_bits}
    return model


def _name_in(block, module):
    return next(n for n, m in block.named_modules() if m is module)


# -----------------------------------------------------------------------------
# 6. Checkpoints


QUANT_FIELDS = {"format": str, "method": str, "bits": int, "group_size": int, "symmetric": bool, "scheme": str,
                "act_bits": int}


def _check_quant(quant, path):
    if not isinstance(quant, dict) or set(quant) != set(QUANT_FIELDS):
        raise UserError(f"{path}: 'quant' is {C._show(quant)}, expected a dict of {', '.join(QUANT_FIELDS)}")
    for k, kind in QUANT_FIELDS.items():
        if type(quant[k]) is not kind:
            raise UserError(f"{path}: quant {k} = {C._show(quant[k])}: expected a {kind.__name__}")
    if (quant["scheme"] not in ("int", "nf4", *FP8_SCHEMES) or quant["bits"] not in (2, 3, 4, 8)
            or quant["act_bits"] not in (0, 8)):
        raise UserError(f"{path}: quant scheme {quant['scheme']!r}, bits {quant['bits']}, act_bits "
                        f"{quant['act_bits']}: expected scheme int, nf4, fp8 or fp8-tensor, bits 2, 3, 4 or 8, act_bits"
                        " 0 or 8")
    if quant["scheme"] in FP8_SCHEMES and (quant["bits"], quant["act_bits"], quant["group_size"]) != (8, 8, 0):
        raise UserError(f"{path}: quant scheme {quant['scheme']} is W8A8 with a scale per row or tensor: expected "
                        "bits 8, act_bits 8, group_size 0")
    if not 0 <= quant["group_size"] <= C.SIZE_LIMITS["d_ff"]:
        raise UserError(f"{path}: quant group_size = {quant['group_size']}: expected 0 (per channel) or a size")


def load_quantized(ckpt, path, device="cpu", head=None):
    """A quantised checkpoint -> (model, tokenizer, ckpt), as common.load_dense for float ones (WEIGHT_FORMATS).

    Every packed tensor's dtype and shape is checked against the config first; the float model is never
    materialised (the blocks' linears are built as QuantLinears straight from the file's tensors)."""
    quant = ckpt.get("quant")
    _check_quant(quant, path)
    sd = ckpt["model"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise UserError(f"{path}: 'model' must map weight names to tensors")
    packed = sorted(k[:-len(".qweight")] for k in sd if k.endswith(".qweight"))
    cfg = C.config_from_dict(ckpt["config"], path)
    with torch.device("meta"):
        twin = M.Transformer(cfg)
    shapes = {n: (m.out_features, m.in_features) for n, m in twin.named_modules() if isinstance(m, nn.Linear)}
    layers, placeholders = {}, {}
    for name in packed:
        if name not in shapes or not name.startswith("blocks."):
            raise UserError(f"{path}: packed weights for {name}, which is no linear layer of the blocks")
        out, n = shapes[name]
        layer = QuantLinear(n, out, quant["bits"], quant["group_size"], quant["scheme"], act_bits=quant["act_bits"])
        for buf, want in layer.named_buffers():
            got = sd.get(f"{name}.{buf}")
            if not isinstance(got, torch.Tensor) or got.dtype != want.dtype or got.shape != want.shape:
                show = f"{got.dtype} {list(got.shape)}" if isinstance(got, torch.Tensor) else C._show(got)
                raise UserError(f"{path}: {name}.{buf} is {show}, expected {want.dtype} {list(want.shape)} "
                                f"for {quant['format']}")
            setattr(layer, buf, got)
        bias = sd.get(f"{name}.bias")
        if isinstance(bias, torch.Tensor) and bias.is_floating_point():
            layer.bias = nn.Parameter(bias.float(), requires_grad=False)
        if layer.scheme == "int" and bool((layer.zeros.int() >= 2 ** layer.bits).any()):
            raise UserError(f"{path}: {name}.zeros holds codes beyond {quant['bits']} bits")
        if layer.scheme in FP8_SCHEMES and not (layer.qweight.float().isfinite().all() and layer.scales.isfinite().all()
                                                and (layer.scales > 0).all()):
            raise UserError(f"{path}: {name} holds NaN e4m3 codes or scales that are not positive and finite")
        layers[name] = layer
        placeholders[f"{name}.weight"] = torch.zeros(1).expand(out, n)  # what check_weights expects, no memory
    rest = {k: v for k, v in sd.items() if k.rpartition(".")[0] not in layers or k.endswith(".bias")}
    cfg, rest, enc = C.check_weights({**ckpt, "model": {**rest, **placeholders}}, path, head)
    rest = {k: v for k, v in rest.items() if k not in placeholders}
    with torch.device("meta"):
        model = M.Transformer(cfg)
    for name, layer in layers.items():
        _swap(model, name, layer)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in rest.items()}, strict=False,
                          assign=True)
    if cfg.head == "lm" and cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    for name in ("lm_head", "score"):  # a head the file does not hold: fresh, as Transformer's init makes it
        m = getattr(model, name, None)
        if m is not None and m.weight.is_meta:
            m.to_empty(device="cpu")
            M.Transformer._init_weights(m)
            if name == "score":
                nn.init.zeros_(m.weight)
    still = [k for k, v in model.state_dict().items() if v.is_meta]
    if still:
        raise UserError(f"{path}: weights missing for {still[:3]}")
    model.quant = dict(quant)
    return model.to(device), enc, ckpt


def write_gguf(model, enc, path, kind="q8_0"):
    """The model (float or quantised: dequantised first) as a GGUF file of llama.cpp's `kind` tensors."""
    import gguf_file
    raw = getattr(model, "module", model)
    gguf_file.write_gguf(path, M.plain_state_dict(raw, dense=True), raw.cfg, enc, kind)


def model_bytes(model):
    """Bytes of the weights held (parameters and buffers, a tied tensor once)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# -----------------------------------------------------------------------------
# 7. The script


@dataclass
class Config:
    model: str = ""  # checkpoint to quantise (ckpt.pt, .safetensors, HF directory or GGUF)
    out: str = "out/quant.pt"  # the quantised checkpoint (a .gguf file for --method gguf)
    method: str = "rtn"  # rtn | gptq | awq | smoothquant (W8A8) | nf4 (QLoRA's base) | fp8 (W8A8 e4m3) | gguf
    bits: int = 4  # 8, 4, 3 or 2 (rtn, gptq, awq; smoothquant is 8, nf4 is 4)
    group_size: int = 128  # weights per scale along the input dimension (0: one scale per output channel)
    symmetric: bool = False  # a grid symmetric about 0 (zero point fixed at 2^(bits-1)); else min-max
    act_bits: int = 0  # 8: the quantised linears' inputs rounded to int8 per token too (W4A8); smoothquant is W8A8
    data: str = ""  # calibration data (gptq, awq, smoothquant need it; with rtn/nf4 it only measures perplexity)
    format: str = "text"  # data format: text (.txt or {"text"} lines) or chat ({"messages"} rendered as the model's)
    calib_samples: int = 128  # calibration windows (GPTQ: 128)
    calib_len: int = 512  # tokens per calibration window (GPTQ: 2048)
    eval_samples: int = 16  # held-out windows of the same data for the before/after perplexity (0: none)
    damp: float = 0.01  # gptq: fraction of H's mean diagonal added to H
    act_order: bool = False  # gptq: round the most-used input columns first (groups fixed before reordering)
    alpha: float = 0.5  # smoothquant: migration strength (activation outliers moved into the weights)
    awq_grid: int = 20  # awq: alphas tried, 0 to 1 in steps of 1/awq_grid
    gguf_type: str = "q8_0"  # gguf: f32 | f16 | q8_0 | q4_0 | q4_1 for the 2-D weights
    fp8_scales: str = "channel"  # fp8: channel (a scale per weight row and per token) | tensor (one per tensor)
    export_hf: str = ""  # also write this Hugging Face directory, its linears in the compressed-tensors format (vLLM)
    seed: int = 0  # which windows are drawn
    batch_size: int = 8  # calibration sequences per forward
    device: str = "auto"  # auto | cpu | cuda | mps (calibration runs here)


METHODS = ("rtn", "gptq", "awq", "smoothquant", "nf4", "fp8", "gguf")
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")


def check_config(cfg):
    if cfg.method not in METHODS:
        raise UserError(f"--method {cfg.method!r}: choose from {', '.join(METHODS)}")
    if not cfg.model:
        raise UserError("--model is required: the checkpoint to quantise")
    if (cfg.method == "gguf") != cfg.out.endswith(".gguf"):
        raise UserError("--method gguf writes a .gguf file and only it does: give --out NAME.gguf with --method gguf, "
                        "a .pt file otherwise")
    if cfg.method == "gguf" and cfg.gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type {cfg.gguf_type!r}: choose from {', '.join(GGUF_TYPES)}")
    if cfg.method in ("rtn", "gptq", "awq") and cfg.bits not in (2, 3, 4, 8):
        raise UserError(f"--bits {cfg.bits}: choose 8, 4, 3 or 2")
    if cfg.group_size < 0 or cfg.group_size % 8:
        raise UserError(f"--group-size {cfg.group_size}: a multiple of 8, or 0 for one scale per output channel")
    if cfg.act_bits not in (0, 8) or cfg.act_bits and cfg.method not in ("rtn", "gptq", "awq"):
        raise UserError(f"--act-bits {cfg.act_bits}: 0, or 8 with --method rtn, gptq or awq (smoothquant and fp8 "
                        "are W8A8)")
    if cfg.fp8_scales not in ("channel", "tensor") or cfg.fp8_scales != "channel" and cfg.method != "fp8":
        raise UserError(f"--fp8-scales {cfg.fp8_scales!r}: channel or tensor, with --method fp8")
    if cfg.export_hf and (cfg.method in ("smoothquant", "nf4", "gguf") or cfg.act_bits):
        raise UserError("--export-hf writes compressed-tensors' int weight-only (rtn, gptq, awq without --act-bits) "
                        f"and fp8 models, not --method {cfg.method}{' --act-bits 8' if cfg.act_bits else ''}")
    if cfg.method == "nf4" and not cfg.group_size:
        raise UserError("--method nf4 needs a --group-size (QLoRA's is 64)")
    if cfg.method in ("gptq", "awq", "smoothquant") and not cfg.data:
        raise UserError(f"--method {cfg.method} needs calibration data: --data (text, or chats with --format chat)")
    if cfg.format not in ("text", "chat"):
        raise UserError(f"--format {cfg.format!r}: choose text or chat")
    if not 0 < cfg.alpha < 1 or cfg.awq_grid < 1 or cfg.calib_samples < 1 or cfg.calib_len < 2:
        raise UserError("--alpha is in (0, 1), --awq-grid, --calib-samples >= 1, --calib-len >= 2")


def main(argv=None):
    cfg = C.parse_config(Config, argv, description=__doc__)
    check_config(cfg)
    device = C.pick_device(cfg.device)
    model, enc, ckpt = C.load_model(cfg.model, "cpu")
    C.check_out(cfg.out)
    if cfg.method == "gguf":
        write_gguf(model, enc, cfg.out, cfg.gguf_type)
        print(f"wrote {cfg.out} ({os.path.getsize(cfg.out) / 1e6:.1f} MB, {cfg.gguf_type})")
        return
    if getattr(model, "quant", None) is not None:  # re-quantise from its dequantised weights
        dense = {**ckpt, "model": M.plain_state_dict(model, dense=True), "format": "fp32"}
        model = C.load_dense(dense, cfg.model)[0]
    model = model.float().to(device).eval()
    if cfg.export_hf:  # refused before the work, not after it
        import formats
        formats.check_compressible(model.cfg, 0 if cfg.method == "fp8" else cfg.group_size)
    calib = held = None
    if cfg.data:
        calib = C.calibration_ids(enc, cfg.data, cfg.format, cfg.calib_samples, cfg.calib_len, cfg.seed)
        if cfg.eval_samples:
            held = C.calibration_ids(enc, cfg.data, cfg.format, cfg.eval_samples, cfg.calib_len, cfg.seed,
                                   skip=cfg.calib_samples)
    metrics = {"fp_bytes": model_bytes(model)}
    if held is not None:
        metrics["ppl_fp"] = C.perplexity(model, held.to(device), cfg.batch_size)
    bits = 8 if cfg.method in ("smoothquant", "fp8") else cfg.bits
    bar = C.tqdm(total=model.cfg.n_layer, desc=f"{cfg.method} W{bits}", disable=None)
    quantize_model(model, cfg.method, cfg.bits, cfg.group_size, cfg.symmetric,
                   calib.to(device) if calib is not None else None, cfg.damp, cfg.act_order, cfg.alpha, cfg.awq_grid,
                   batch_size=cfg.batch_size, progress=lambda i: bar.update(1), act_bits=cfg.act_bits,
                   fp8_scales=cfg.fp8_scales)
    bar.close()
    metrics["bytes"] = model_bytes(model)
    if held is not None:
        metrics["ppl"] = C.perplexity(model, held.to(device), cfg.batch_size)
    lineage = [*ckpt.get("lineage", []), f"quantize:{model.quant['format']}:{cfg.method}"]
    C.save_checkpoint(cfg.out, model.cpu(), enc, ckpt.get("step", 0), vars(cfg), metrics, lineage)
    report = f"{model.quant['format']} ({cfg.method}): {metrics['fp_bytes'] / 1e6:.1f} MB -> {metrics['bytes'] / 1e6:.1f} MB"
    if held is not None:
        report += f"; perplexity on {cfg.eval_samples} held-out windows {metrics['ppl_fp']:.3f} -> {metrics['ppl']:.3f}"
    if cfg.export_hf:
        import formats
        formats.export_hf(model, enc, cfg.export_hf, compressed=True)
        report += f"; compressed-tensors directory {cfg.export_hf}"
    print(f"{report}; wrote {cfg.out}", file=sys.stderr)


if __name__ == "__main__":
    C.run(main)
