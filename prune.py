"""
prune.py: weights removed from a trained model. Unstructured and N:M sparsity (magnitude, Wanda, SparseGPT), kept
through further training by masks in the checkpoint; and structured pruning (Minitron) to a smaller dense model.

    python prune.py --model sft.pt --method magnitude --target 0.5 --out mag.pt               # 50% of each row
    python prune.py --model sft.pt --method wanda --pattern 2:4 --data data/toy/pretrain.txt --out wanda24.pt
    python prune.py --model sft.pt --method sparsegpt --target 0.5 --data data/toy/pretrain.txt --out sgpt.pt
    python prune.py --model sft.pt --method minitron --structure width --target 0.5 --data ... --out half.pt
    python sft.py --model sgpt.pt --data data/toy/sft.jsonl --out healed.pt   # the zeros stay zeros

In reading order:
  1. Masks, pure functions (True = kept). Each compares scores within one output row (every row loses the same
     number of weights) or, with an N:M pattern, within every M consecutive inputs of a row (N kept of M: 2:4 is
     what sparse tensor cores run):
       magnitude_mask   score |W_ij|: the baseline of every pruning paper.
       wanda_mask       score |W_ij| * ||x_j||_2, x_j input channel j over the calibration tokens (Sun et al. 2023,
                        "A Simple and Effective Pruning Approach for LLMs", eq. 1): a small weight on a loud input
                        matters more than a large one on a quiet input. No weight update.
       sparsegpt_prune  SparseGPT (Frantar & Alistarh 2023): Optimal Brain Surgeon one column at a time. With
                        H = 2 X^T X + damp I (X the layer's inputs), removing w_q costs w_q^2 / [H^-1]_qq and the
                        best update of the weights not yet visited is -w_q / [H^-1]_qq * H^-1_{q,:}: exactly GPTQ's
                        update (quantize.py) with "round" replaced by "set to zero", the Cholesky factor of H^-1
                        giving every column's row of the sequentially updated inverse. Masks are chosen lazily,
                        every 128 columns (N:M: every M), by that cost on the already-updated weights.
  2. Structured pruning, Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
     Distillation"; Sreenivas et al. 2024): importance from activations on calibration data, one forward pass:
       attention head   mean over tokens of ||head output||_2 (the head's slice of the input to the output
                        projection); heads are ranked within each KV group (the KV heads kept), or with their K and
                        V when each group has one head (plain multi-head attention)
       MLP channel      mean |input of the down projection| (after the activation)
       embedding chan.  mean |output| of every LayerNorm / RMSNorm in the model, summed over the norms
       block (depth)    the increase of the calibration loss when the block alone is skipped
     The least important are removed: `prune_state_dict` slices the tensors into a genuinely smaller dense model
     (a new Config every script loads). Heads and MLP channels removed give exactly the full model with those
     units zeroed. Embedding channels change what the norms average over (the RMS of fewer channels); the
     tests state the exact correspondence.
  3. Calibration layer by layer (common.calibration_ids / block_inputs / collect_inputs, shared with quantize.py):
     each block's linears see the outputs of the already-pruned blocks before it, as both papers run it.
  4. `main`: --target is the sparsity (unstructured; N:M implies N/M) or the parameters to keep (structured: a
     fraction of the model's, or a count); healing is a training run on the result (distill.py from the dense
     model, or sft.py), which the masks survive.

Departures: the papers compare SparseGPT's unstructured costs over a whole block of 128 columns at once, so rows
keep different numbers of weights; here every row keeps the same number in every block (as Wanda compares within
a row), so sparsity is exact per row. Magnitude pruning is also per row here (Wanda's paper compares it per layer).
"""

import sys
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

import common as C
import model as M
from model import UserError


# -----------------------------------------------------------------------------
# 1. Masks and SparseGPT. This block can be copied alone: torch and math only.


def parse_pattern(pattern):
    """"unstructured" -> (0, 0); "2:4" -> (2, 4): N kept in every M consecutive inputs."""
    if pattern == "unstructured":
        return 0, 0
    n, _, m = pattern.partition(":")
    if not (n.isdigit() and m.isdigit()) or not 0 < int(n) < int(m):
        raise ValueError(f"pattern {pattern!r}: 'unstructured' or N:M with 0 < N < M, such as 2:4")
    return int(n), int(m)


def mask_from_scores(scores, sparsity=0.5, n=0, m=0):
    """(out, in) scores -> bool mask, True = kept. Unstructured: the int(sparsity * in) lowest of each row removed.
    N:M (n > 0): the n highest of every m consecutive scores of a row kept (in % m == 0). Ties: the first kept."""
    out, d = scores.shape
    if n:
        groups = scores.reshape(out, d // m, m)
        keep = groups.topk(n, dim=-1).indices  # (out, d / m, n)
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).reshape(out, d)
    k = int(sparsity * d)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        drop = scores.argsort(dim=1, stable=True)[:, :k]  # (out, k) the lowest
        mask.scatter_(1, drop, False)
    return mask


def magnitude_mask(W, sparsity=0.5, n=0, m=0):
    """Keep the largest |W_ij| of each row (of every M inputs)."""
    return mask_from_scores(W.abs(), sparsity, n, m)


def wanda_mask(W, sqnorm, sparsity=0.5, n=0, m=0):
    """Wanda: keep the largest |W_ij| * ||x_j||_2 of each row; sqnorm (in,) = sum over calibration tokens of x_j^2."""
    return mask_from_scores(W.abs() * sqnorm.sqrt().to(W.dtype), sparsity, n, m)


def sparsegpt_prune(W, H, sparsity=0.5, n=0, m=0, block_size=128, damp=0.01):
    """SparseGPT on one linear: W (out, in), H (in, in) = sum x^T x over calibration tokens (fp32).
    -> (pruned weights (out, in) in W's dtype, bool mask). Inputs never seen (H_jj = 0) get weight 0.

    Column by column, in blocks of block_size: the block's mask is chosen at its start (N:M: every M columns) by
    OBS's cost w^2 / [H^-1]_jj^2 on the weights as updated so far; each column is then pruned and its error
    (w - q) / [H^-1]_jj spread over the columns to its right by the Cholesky row of H^-1, within the block at once
    and beyond it lazily, as GPTQ does."""
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * torch.diag(H).mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        d = torch.diag(Hinv1)  # (count,)
        mask1 = mask[:, i1:i2]  # a view: written through
        if not n:
            mask1.copy_(mask_from_scores(W1.pow(2) / d.pow(2), sparsity))
        for i in range(i2 - i1):
            if n and i % m == 0:
                mask1[:, i:i + m] = mask_from_scores(W1[:, i:i + m].pow(2) / d[i:i + m].pow(2), 0, n, m)
            w = W1[:, i]
            q = w * mask1[:, i]
            err = (w - q) / d[i]  # (out,)
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W * mask, mask


# -----------------------------------------------------------------------------
# 2. Structured pruning: which units to keep, and the smaller model


def keep_top(scores, k):
    """The indices of the k highest scores, in their original order (so the kept units keep their order)."""
    return scores.topk(k).indices.sort().values


def head_groups(n_head, n_kv_head):
    """Query heads by KV group: (n_kv_head, n_head / n_kv_head) indices."""
    return torch.arange(n_head).view(n_kv_head, n_head // n_kv_head)


def keep_heads(scores, n_kv_head, per_group):
    """(n_head,) head importances -> (kept query heads, kept KV heads). With grouped-query attention the per_group
    best of each KV group are kept, and every KV head; with one query head per group (multi-head attention) the
    per_group best heads are kept, each with its K and V."""
    groups = head_groups(len(scores), n_kv_head)
    if groups.shape[1] == 1:  # MHA: a head goes with its K and V
        kv = keep_top(scores, per_group)
        return kv, kv
    kept = torch.stack([g[keep_top(scores[g], per_group)] for g in groups])
    return kept.flatten(), torch.arange(n_kv_head)


def prune_state_dict(sd, cfg, layers, heads, kv_heads, channels, embed):
    """Slice a state dict (Transformer names) to a smaller model.

    layers: the kept blocks (old indices, in order); for each kept block (by position in `layers`): heads (kept
    query heads), kv_heads (kept KV heads), channels (kept MLP channels), each the same count in every block;
    embed: the kept residual-stream channels. -> (new state dict, new Config). Nothing is rescaled."""
    hd = cfg.head_size
    n_head, n_kv, d_ff = len(heads[0]), len(kv_heads[0]), len(channels[0])
    d = len(embed)
    new_cfg = replace(cfg, n_layer=len(layers), n_head=n_head, n_kv_head=n_kv, d_model=d, d_ff=d_ff,
                      head_dim=0 if n_head * hd == d else hd)

    def rows_of(idx):  # head indices -> their rows in q/k/v (hd each)
        return (idx[:, None] * hd + torch.arange(hd)).flatten()

    out = {}
    for k, v in sd.items():
        if k in ("embed.weight", "pos_embed.weight", "lm_head.weight"):
            out[k] = v[:, embed]
        elif k.startswith("norm.") or k == "score.weight":
            out[k] = v[embed] if k.startswith("norm.") else v[:, embed]
        elif k == "score.bias":
            out[k] = v
    for new, old in enumerate(layers):
        qrows, kvrows, ch = rows_of(heads[new]), rows_of(kv_heads[new]), channels[new]

        def take(name, rows, cols=None):  # block `old`'s tensor, its rows (and columns) kept, as block `new`'s
            if f"blocks.{old}.{name}" in sd:
                t = sd[f"blocks.{old}.{name}"][rows]
                out[f"blocks.{new}.{name}"] = t if cols is None else t[:, cols]

        for norm in ("norm1", "norm2"):
            take(f"{norm}.weight", embed), take(f"{norm}.bias", embed)
        for name, rows in (("q", qrows), ("k", kvrows), ("v", kvrows)):
            take(f"attn.{name}.weight", rows, embed), take(f"attn.{name}.bias", rows)
        take("attn.o.weight", embed, qrows), take("attn.o.bias", embed)
        for name in ("up", "gate"):
            take(f"mlp.{name}.weight", ch, embed), take(f"mlp.{name}.bias", ch)
        take("mlp.down.weight", embed, ch), take("mlp.down.bias", embed)
    return {k: v.contiguous() for k, v in out.items()}, new_cfg


# -----------------------------------------------------------------------------
# 3. Calibration


def pruned_linears(block):
    return [n for n, mod in block.named_modules() if isinstance(mod, nn.Linear)]


@torch.no_grad()
def prune_model(model, method, sparsity=0.5, n=0, m=0, ids=None, damp=0.01, block_size=128, batch_size=8,
                progress=None):
    """Unstructured / N:M pruning of every linear in the blocks, in place (masks attached: common.set_masks).
    wanda / sparsegpt run the calibration ids block by block: each block's linears' input statistics gathered on
    the block as it is, then its linears pruned, then its outputs (pruned) computed as the next block's inputs."""
    model.eval()
    need = {"wanda": {"sqnorm"}, "sparsegpt": {"hessian"}}.get(method, set())
    xs, rope = C.block_inputs(model, ids, batch_size) if need else (None, None)
    masks = {}
    for index, block in enumerate(model.blocks):
        names = pruned_linears(block)
        stats = C.collect_inputs(block, xs, rope, names, need, 1) if need else {}
        for name in names:
            linear = block.get_submodule(name)
            W = linear.weight
            if method == "magnitude":
                mask = magnitude_mask(W, sparsity, n, m)
            elif method == "wanda":
                mask = wanda_mask(W, stats[name]["sqnorm"], sparsity, n, m)
            else:
                pruned, mask = sparsegpt_prune(W, stats[name]["hessian"], sparsity, n, m, block_size, damp)
                W.copy_(pruned)
            masks[f"blocks.{index}.{name}.weight"] = mask
            W.mul_(mask)
        if need:
            xs = [block(x, rope, None, None) for x in xs]
        if progress:
            progress(index)
    C.set_masks(model, masks, {"method": method, "pattern": f"{n}:{m}" if n else "unstructured",
                               "target": n / m if n else sparsity})
    return model


@torch.no_grad()
def unit_importance(model, ids, batch_size=8):
    """Minitron's activation importances on the calibration ids, one forward pass of the full model ->
    {"heads": (n_layer, n_head), "channels": (n_layer, d_ff), "embed": (d_model,)}."""
    cfg = model.cfg
    hd, tokens = cfg.head_size, 0
    heads = torch.zeros(cfg.n_layer, cfg.n_head)
    channels = torch.zeros(cfg.n_layer, cfg.d_ff)
    embed = torch.zeros(cfg.d_model)
    handles = []

    def on_input(store, i, per_head):
        def hook(module, inputs):
            x = inputs[0].float().flatten(0, 1)  # (tokens, width)
            store[i] += (x.view(len(x), -1, hd).norm(dim=-1) if per_head else x.abs()).sum(0)
        return hook

    def on_norm(module, inputs, output):
        embed.add_(output.float().abs().flatten(0, 1).sum(0))

    for i, block in enumerate(model.blocks):
        handles.append(block.attn.o.register_forward_pre_hook(on_input(heads, i, True)))
        handles.append(block.mlp.down.register_forward_pre_hook(on_input(channels, i, False)))
    handles += [mod.register_forward_hook(on_norm) for mod in model.modules() if isinstance(mod, (nn.LayerNorm,
                                                                                                   M.RMSNorm))]
    try:
        for i in range(0, len(ids), batch_size):
            model(ids[i:i + batch_size])
            tokens += ids[i:i + batch_size].numel()
    finally:
        for h in handles:
            h.remove()
    return {"heads": heads / tokens, "channels": channels / tokens, "embed": embed / tokens}


@torch.no_grad()
def block_importance(model, ids, batch_size=8):
    """(n_layer,) the increase of the mean next-token loss on the ids when each block alone is skipped. Every
    block's inputs are computed once; skipping block i reruns only the blocks after it."""
    xs, rope = C.block_inputs(model, ids, batch_size)
    inputs = [xs]  # inputs[i]: block i's inputs, batch by batch
    for block in model.blocks:
        inputs.append([block(x, rope, None, None) for x in inputs[-1]])

    def loss(i, hidden):  # the loss from block i's inputs on
        total = 0.0
        for b, x in enumerate(hidden):
            for block in model.blocks[i:]:
                x = block(x, rope, None, None)
            logits = model.lm_head(model.norm(x))
            y = ids[b * batch_size:(b + 1) * batch_size]
            total += nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), y[:, 1:].flatten(),
                                                 reduction="sum").item()
        return total / (ids.shape[0] * (ids.shape[1] - 1))

    full = loss(len(model.blocks), inputs[-1])
    return torch.tensor([loss(i + 1, inputs[i]) - full for i in range(len(model.blocks))])


def count_params(cfg):
    """The parameters of a Config's model (a tied head once), built on the meta device: no memory."""
    with torch.device("meta"):
        return M.Transformer(cfg).num_params()


def shape_for_target(cfg, structure, target, depth_order):
    """The smaller shape that keeps about `target` parameters -> (n_layer kept, heads per group (or heads, for
    MHA), d_ff, d_model). depth: the least important blocks (depth_order, most important first) dropped one by one
    until at most target remain. width: d_ff, heads and d_model all scaled by one ratio, found by bisection (d_ff and
    d_model rounded to multiples of 8, at least one head). both: depth removes half the parameters to be removed,
    width the rest."""
    full = count_params(cfg)
    group = cfg.n_head // cfg.n_kv_head
    units = group if group > 1 else cfg.n_head

    def width(r, n_layer):
        d_model, per = max(8, round(cfg.d_model * r / 8) * 8), max(1, round(units * r))
        heads = per * cfg.n_kv_head if group > 1 else per
        c = replace(cfg, n_layer=n_layer, d_ff=max(8, round(cfg.d_ff * r / 8) * 8), d_model=d_model, n_head=heads,
                    n_kv_head=cfg.n_kv_head if group > 1 else per,
                    head_dim=0 if heads * cfg.head_size == d_model else cfg.head_size)
        return c, per

    n_layer = cfg.n_layer
    if structure in ("depth", "both"):
        goal = target if structure == "depth" else full - (full - target) / 2
        while n_layer > 1 and count_params(replace(cfg, n_layer=n_layer)) > goal:
            n_layer -= 1
    if structure == "depth":
        return n_layer, units, cfg.d_ff, cfg.d_model
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count_params(width(mid, n_layer)[0]) <= target else (lo, mid)
    c, per = width(lo, n_layer)
    return n_layer, per, c.d_ff, c.d_model


@torch.no_grad()
def minitron_prune(model, ids, structure="width", target=0.5, shape=None, batch_size=8, depth_samples=16):
    """Structured pruning to a smaller dense model -> (new model, report dict). target: the parameters to keep
    (a fraction of the model's when <= 1); shape: (n_layer, heads per group, d_ff, d_model) overriding it. Block
    importance reads the first depth_samples windows only: it costs about n_layer / 2 forward passes of them."""
    cfg = model.cfg
    if cfg.arch == "gpt2" and structure != "depth":
        raise UserError("width pruning of gpt2 is not supported: its head width is d_model / n_head, which removing "
                        "heads or embedding channels changes (prune --structure depth, or a llama-family model)")
    full = count_params(cfg)
    goal = target * full if target <= 1 else target
    model.eval()
    depth = structure in ("depth", "both") or shape
    order = block_importance(model, ids[:depth_samples], batch_size) if depth else None
    imp = unit_importance(model, ids, batch_size)
    depth_order = order.argsort(descending=True) if order is not None else torch.arange(cfg.n_layer)
    n_layer, per, d_ff, d_model = shape or shape_for_target(cfg, structure, goal, depth_order)
    layers = depth_order[:n_layer].sort().values.tolist()
    heads, kv_heads = zip(*[keep_heads(imp["heads"][i], cfg.n_kv_head, per) for i in layers])
    channels = [keep_top(imp["channels"][i], d_ff) for i in layers]
    embed = keep_top(imp["embed"], d_model)
    sd, new_cfg = prune_state_dict(M.plain_state_dict(model), cfg, layers, heads, kv_heads, channels, embed)
    small = M.Transformer(new_cfg)
    small.load_state_dict(sd, strict=not new_cfg.tie_embeddings)
    report = {"params_before": full, "params_after": small.num_params(), "layers_kept": layers,
              "block_importance": order.tolist() if order is not None else None,
              "shape": {"n_layer": n_layer, "n_head": new_cfg.n_head, "n_kv_head": new_cfg.n_kv_head,
                        "d_ff": d_ff, "d_model": d_model}}
    return small.to(next(model.parameters()).device), report


# -----------------------------------------------------------------------------
# 4. The script


@dataclass
class Config:
    model: str = ""  # checkpoint to prune (ckpt.pt, .safetensors, HF directory or GGUF)
    out: str = "out/pruned.pt"  # the pruned checkpoint
    method: str = "wanda"  # magnitude | wanda | sparsegpt (masks; N:M with --pattern) | minitron (a smaller model)
    target: float = 0.5  # unstructured: the fraction of each row removed; minitron: parameters kept (<= 1: fraction)
    pattern: str = "unstructured"  # unstructured | N:M (2:4, 4:8): N kept of every M inputs (sets the sparsity)
    structure: str = "width"  # minitron: width (heads, MLP and embedding channels) | depth (blocks) | both
    n_layer: int = 0  # minitron: an exact shape instead of --target (all four of these, or none)
    heads: int = 0  # minitron shape: query heads kept per KV group (with one head per group: heads kept)
    d_ff: int = 0  # minitron shape: MLP channels kept
    d_model: int = 0  # minitron shape: embedding channels kept
    data: str = ""  # calibration data (wanda, sparsegpt, minitron need it)
    format: str = "text"  # data format: text (.txt or {"text"} lines) or chat ({"messages"})
    calib_samples: int = 128  # calibration windows (the papers: 128 of 2048 tokens)
    calib_len: int = 512  # tokens per calibration window
    eval_samples: int = 16  # held-out windows for the before/after perplexity (0: none)
    damp: float = 0.01  # sparsegpt: fraction of H's mean diagonal added to H
    block_size: int = 128  # sparsegpt: columns per lazy block (and per mask selection)
    depth_samples: int = 16  # minitron: calibration windows the block importances are measured on
    seed: int = 0  # which windows are drawn
    batch_size: int = 8  # calibration sequences per forward
    device: str = "auto"  # auto | cpu | cuda | mps (calibration runs here)


def check_config(cfg):
    if cfg.method not in ("magnitude", "wanda", "sparsegpt", "minitron"):
        raise UserError(f"--method {cfg.method!r}: choose from magnitude, wanda, sparsegpt, minitron")
    if not cfg.model:
        raise UserError("--model is required: the checkpoint to prune")
    try:
        parse_pattern(cfg.pattern)
    except ValueError as e:
        raise UserError(f"--{e}")
    if cfg.method == "minitron":
        if cfg.structure not in ("width", "depth", "both"):
            raise UserError(f"--structure {cfg.structure!r}: choose width, depth or both")
        if cfg.pattern != "unstructured":
            raise UserError("--pattern is for magnitude / wanda / sparsegpt; minitron removes whole units")
        shape = [cfg.n_layer, cfg.heads, cfg.d_ff, cfg.d_model]
        if any(shape) and not all(v > 0 for v in shape):
            raise UserError("--n-layer, --heads, --d-ff, --d-model give an exact shape together: all four, or none")
        if not any(shape) and not cfg.target > 0:
            raise UserError(f"--target {cfg.target}: the parameters to keep, a fraction in (0, 1] or a count")
    elif cfg.pattern == "unstructured" and not 0 <= cfg.target < 1:
        raise UserError(f"--target {cfg.target}: the sparsity, in [0, 1)")
    if cfg.method != "magnitude" and not cfg.data:
        raise UserError(f"--method {cfg.method} needs calibration data: --data (text, or chats with --format chat)")
    if cfg.format not in ("text", "chat") or cfg.calib_samples < 1 or cfg.calib_len < 2 or cfg.block_size < 1 \
            or cfg.depth_samples < 1:
        raise UserError("--format is text or chat; --calib-samples, --block-size, --depth-samples >= 1; "
                        "--calib-len >= 2")


def check_model(model, cfg, path):
    if getattr(model, "quant", None) is not None:
        raise UserError(f"{path}: a quantised model; prune the float model first, then quantise")
    n, m = parse_pattern(cfg.pattern)
    if n:
        bad = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and ".blocks." in
               f".{name}" and mod.in_features % m]
        if bad:
            raise UserError(f"--pattern {cfg.pattern}: {bad[0]} has {model.get_submodule(bad[0]).in_features} "
                            f"inputs, not a multiple of {m}")
    if cfg.method == "minitron" and model.cfg.head != "lm":
        raise UserError(f"{path}: minitron ranks by the language-model loss; this model has a {model.cfg.head!r} head")
    if cfg.method == "minitron" and cfg.n_layer:
        c = model.cfg
        units = c.n_head // c.n_kv_head if c.n_head > c.n_kv_head else c.n_head
        if cfg.n_layer > c.n_layer or cfg.heads > units or cfg.d_ff > c.d_ff or cfg.d_model > c.d_model:
            raise UserError(f"--n-layer/--heads/--d-ff/--d-model {cfg.n_layer}/{cfg.heads}/{cfg.d_ff}/{cfg.d_model}:"
                            f" at most the model's {c.n_layer}/{units}/{c.d_ff}/{c.d_model}")


def sparsity_of(model):
    """The fraction of zeros in the blocks' linear weights."""
    ws = [mod.weight for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and name.startswith("blocks")]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def main(argv=None):
    cfg = C.parse_config(Config, argv, description=__doc__)
    check_config(cfg)
    device = C.pick_device(cfg.device)
    model, enc, ckpt = C.load_model(cfg.model, "cpu")
    check_model(model, cfg, cfg.model)
    C.check_out(cfg.out)
    model = model.float().to(device).eval()
    calib = held = None
    if cfg.data:
        calib = C.calibration_ids(enc, cfg.data, cfg.format, cfg.calib_samples, cfg.calib_len, cfg.seed).to(device)
        if cfg.eval_samples:
            held = C.calibration_ids(enc, cfg.data, cfg.format, cfg.eval_samples, cfg.calib_len, cfg.seed,
                                     skip=cfg.calib_samples).to(device)
    metrics = {"params_before": model.num_params()}
    if held is not None:
        metrics["ppl_before"] = C.perplexity(model, held, cfg.batch_size)
    if cfg.method == "minitron":
        shape = (cfg.n_layer, cfg.heads, cfg.d_ff, cfg.d_model) if cfg.n_layer else None
        model, report = minitron_prune(model, calib, cfg.structure, cfg.target, shape, cfg.batch_size,
                                       cfg.depth_samples)
        metrics.update(params_after=report["params_after"], shape=report["shape"], layers_kept=report["layers_kept"])
        what = f"minitron {cfg.structure}"
    else:
        n, m = parse_pattern(cfg.pattern)
        bar = C.tqdm(total=model.cfg.n_layer, desc=f"{cfg.method} {cfg.pattern}", disable=None)
        prune_model(model, cfg.method, cfg.target, n, m, calib, cfg.damp, cfg.block_size, cfg.batch_size,
                    progress=lambda i: bar.update(1))
        bar.close()
        metrics.update(params_after=model.num_params(), sparsity=sparsity_of(model))
        what = f"{cfg.method} {cfg.pattern if n else f'{cfg.target:.0%}'}"
    if held is not None:
        metrics["ppl_after"] = C.perplexity(model, held, cfg.batch_size)
    kind = cfg.structure if cfg.method == "minitron" else cfg.pattern
    lineage = [*ckpt.get("lineage", []), f"prune:{cfg.method}:{kind}"]
    C.save_checkpoint(cfg.out, model.cpu(), enc, ckpt.get("step", 0), vars(cfg), metrics, lineage)
    report = f"{what}: {metrics['params_before'] / 1e6:.2f}M -> {metrics['params_after'] / 1e6:.2f}M parameters"
    if "sparsity" in metrics:
        report += f" ({metrics['sparsity']:.1%} of the blocks' weights zero)"
    if held is not None:
        report += (f"; perplexity on {cfg.eval_samples} held-out windows {metrics['ppl_before']:.3f} -> "
                   f"{metrics['ppl_after']:.3f}")
    print(f"{report}; wrote {cfg.out}", file=sys.stderr)


if __name__ == "__main__":
    C.run(main)
