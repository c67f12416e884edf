"""
qat.py: quantisation-aware training. The model trains with every linear of its blocks computing with its weight
rounded to the grid quantize.py packs, so it learns weights that survive the rounding; the result is written in
quantize.py's packed format, which every script loads.

    python quantize.py --model sft.pt --method gptq --bits 4 --data calib.txt --out gptq.pt   # PTQ: the start
    python qat.py --model gptq.pt --teacher sft.pt --data data/toy/sft.jsonl --out qat.pt      # QAT from its grid
    python qat.py --model sft.pt --bits 3 --group-size 128 --out qat3.pt                       # from RTN, data targets
    python qat.py --model gptq.pt --teacher sft.pt --act-bits 8 --out w4a8.pt                  # W4A8
    python qat.py --model gptq.pt --teacher sft.pt --lora-rank 16 --out qat-lora.pt            # LoRA-only QAT
    torchrun --nproc_per_node=2 qat.py --fsdp --model gptq.pt --teacher sft.pt --out qat.pt    # FSDP2, qat.dcp/

Fake quantisation (`fake_quant_weight`): in the forward pass the weight w of a linear is replaced by
  w_q = (clamp(round(w / s) + z, 0, 2^b - 1) - z) * s,
the very dequantised weight quantize.py's QuantLinear computes with (the same grid: scale s and zero z per group of
--group-size inputs, quantize.grid_params; the same round-half-to-even, the same clamp, s rounded to fp16 as it
is stored). round() has zero gradient almost everywhere, so backward uses the straight-through estimator (Bengio
et al. 2013): d w_q / d w = 1 where the code was not clipped (round(w / s) + z in [0, 2^b - 1]), 0 where it was,
so weights pushed outside the grid stop being pulled further. Written as x + (round(x) - x).detach(), which
is round(x) exactly in the forward (the difference is exact in fp32) and x in the backward.
Activations (--act-bits 8, W4A8): each linear's input rounded to int8 with one scale per token (absmax / 127,
SmoothQuant's dynamic per-token quantisation, quantize.fake_quant_per_token), the same STE, the scale a constant.

Where the grid comes from: --model a quantize.py checkpoint (RTN, GPTQ, AWQ): its scales and zeros, and its
dequantised weights as the starting point, so step 0 computes exactly what the PTQ model does and QAT can only
start from PTQ's result (torchao and ModelOpt start from PTQ's calibrated ranges the same way); --model a float
checkpoint: RTN's grid (min-max per group) of its weights. The zeros stay fixed; the scales are fixed too unless
--learn-scales (LSQ, Esser et al. 2020): s then trains beside w, its gradient the STE's
  d w_q / d s = round(w / s) - w / s inside the grid, (code - z) at a clipped end (the clamp bound's code),
scaled by 1 / sqrt(g * (2^(b-1) - 1)) per LSQ's Sec. 2.2 (g weights share a scale), so it moves at the pace of the
weights it covers. Weight decay is off by default: AdamW's decay would pull the scales to zero.

Targets: the data's next tokens (cross-entropy, as sft.py), or with --teacher the float model's distributions
(self-distillation: distill.py's forward KL at every supervised position, --ce-weight mixing in the CE). Recovering
the float model's function is what QAT is for, and the teacher's full distribution says far more per token than the
data's one-hot next token.
LoRA-only QAT (--lora-rank): the block linears' weights frozen, adapters A, B trained, and what is rounded is the
merged weight w + (alpha / r) B A, so the adapters learn through the quantiser and the converted model is exactly
the trained one (QLoRA instead keeps the adapters beside a quantised base; merging them afterwards would leave the
grid). Embeddings, norms and the head are frozen with LoRA, trained in full QAT (they stay float, as quantize.py
leaves them).

The output (--out, every save): the converted model, each fake-quantised linear replaced by a QuantLinear holding
round(w_q / s) + z packed, in quantize.py's checkpoint format (its `quant` entry: the format, bits, group size,
act_bits); its outputs are the fake-quant model's (tests/test_qat.py). The train_state beside it holds the latent
float weights and scales ("qat", the fake-quant model's state dict) and the optimiser: --resume continues from them.
--fsdp (parallel.py) shards the fake-quant model per block as sft.py's: the latent weights, learned scales and
their AdamW state (the fixed scales and the zeros are buffers, whole on every rank; the teacher too), gathered in
fp32 on GPU (bf16 would move w / s off the grid). Every save also writes the shards to {out}.dcp/, and --resume
takes that directory (any number of ranks); --out is gathered to rank 0 and written as above.
Departures: qat.py imports sft.py (its data plumbing) and distill.py (its loss) beside quantize.py, where DESIGN.md
names quantize.py only. From torchao: no separate convert step (its `convert` is what every save does); activations of the head
and attention (q @ k) stay float, as in quantize.py's W8A8.

Logged per step: loss, ce, kd (with --teacher), lr, grad_norm, tok_s, clipped (the share of weights whose code is
clipped, the STE's zero-gradient region); at --eval-every: eval_loss (CE on the held-out examples) and eval_kd.
"""

import contextlib
import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
import distill
import model as M
import quantize as Q
import sft

# -----------------------------------------------------------------------------
# The math: pure functions of tensors, torch and math only (this block can be copied alone)


def ste_round(x):
    """round(x) (half to even) in the forward pass, exactly; the identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x, scale):
    """x in the forward pass; its gradient multiplied by `scale` in the backward pass (LSQ's step-size gradient)."""
    return (x - x * scale).detach() + x * scale


def expand_groups(t, group_size, n):
    """Per-group values (out, G) -> per-weight (out, n): each repeated over its group of group_size inputs (0: n)."""
    return t.repeat_interleave(group_size or n, 1)[:, :n]


def fake_quant_weight(w, scales, zeros, bits, group_size):
    """w (out, n) -> (clamp(round(w / s) + z, 0, 2^bits - 1) - z) * s, s and z (out, G) per group of group_size inputs
    (0: one group per row), with the STE: the gradient in w is 1 where the code was not clipped, 0 where it was, and
    in s the LSQ step-size gradient (s a float tensor; z holds integer codes)."""
    n = w.shape[1]
    s, z = expand_groups(scales, group_size, n), expand_groups(zeros.to(w.dtype), group_size, n)
    codes = torch.clamp(ste_round(w / s) + z, 0, 2 ** bits - 1)
    return (codes - z) * s


def fake_quant_tokens(x, bits=8):
    """x (..., C) -> each token (row) rounded to a symmetric int grid of scale absmax / (2^(bits-1) - 1): dynamic
    per-token activation quantisation, the STE in the backward pass, the scale a constant."""
    qmax = 2 ** (bits - 1) - 1
    s = (x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / qmax).detach()
    return torch.clamp(ste_round(x / s), -qmax, qmax) * s


def clipped_fraction(w, scales, zeros, bits, group_size):
    """The share of weights whose code round(w / s) + z falls outside [0, 2^bits - 1]: where the STE passes nothing."""
    n = w.shape[1]
    s, z = expand_groups(scales, group_size, n), expand_groups(zeros.float(), group_size, n)
    code = torch.round(w.float() / s) + z
    return ((code < 0) | (code > 2 ** bits - 1)).float().mean()


# -----------------------------------------------------------------------------
# The fake-quantised linear, and the model in and out of it


class FakeQuantLinear(nn.Module):
    """A linear computing with its weight on quantize.py's grid (fake_quant_weight), optionally its input rounded to
    int8 per token, optionally LoRA adapters merged into the weight before the rounding.

    weight (out, in) fp32, trained unless LoRA; scales (out, G): fp32, a Parameter with learn_scales, each rounded to
    fp16 in the forward pass as quantize.py stores it; zeros (out, G) the fixed zero codes."""

    def __init__(self, weight, bias, scales, zeros, bits, group_size, act_bits=0, learn_scales=False, lora_rank=0,
                 lora_alpha=0.0):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size, self.act_bits = bits, group_size, act_bits
        self.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=not lora_rank)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=not lora_rank)
        scales = scales.detach().float().clone()
        if learn_scales:
            self.scales = nn.Parameter(scales)
        else:
            self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros.detach().to(torch.uint8).clone())
        # LSQ's gradient scale: 1 / sqrt(weights per scale x the positive code range)
        g = group_size or self.in_features
        self.lsq_scale = 1.0 / math.sqrt(g * (2 ** (bits - 1) - 1))
        self.lora_rank, self.lora_scaling = lora_rank, (lora_alpha or 2 * lora_rank) / max(lora_rank, 1)
        if lora_rank:  # model.LoRALinear's init: A random (Kaiming uniform), B zero, so the start is the base
            self.lora_A = nn.Parameter(torch.empty(lora_rank, self.in_features))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, lora_rank))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def grid(self):
        """(scales fp32 on their fp16 values, zeros): what is stored, with the STE (and LSQ's scale) for training."""
        s = self.scales
        if isinstance(s, nn.Parameter):  # a fixed scale is already an fp16 value
            s = grad_scale(s, self.lsq_scale).clamp(min=2 ** -14)  # the smallest normal fp16: never 0
            s = s + (s.half().float() - s).detach()
        return s, self.zeros

    def merged_weight(self):
        if not self.lora_rank:
            return self.weight
        return self.weight + self.lora_scaling * (self.lora_B @ self.lora_A)

    def quantized_weight(self):
        return fake_quant_weight(self.merged_weight(), *self.grid(), self.bits, self.group_size)

    def forward(self, x):
        if self.act_bits:
            x = fake_quant_tokens(x, self.act_bits)
        w = self.quantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_quant(self):
        """The QuantLinear of quantize.py holding exactly this layer's rounded weight: codes, fp16 scales, zeros."""
        scales, zeros = self.grid()
        codes = Q.round_to_grid(self.merged_weight().float(), scales, zeros, self.bits, self.group_size)
        layer = Q.QuantLinear(self.in_features, self.out_features, self.bits, self.group_size, "int", self.bias,
                              self.act_bits)
        layer.qweight, layer.scales, layer.zeros = Q.pack_bits(codes, self.bits), scales.half(), zeros.clone()
        return layer.to(self.weight.device)

    def extra_repr(self):
        lora = f", lora_rank={self.lora_rank}" if self.lora_rank else ""
        return (f"in={self.in_features}, out={self.out_features}, int{self.bits}, group_size={self.group_size}, "
                f"act_bits={self.act_bits}, learn_scales={isinstance(self.scales, nn.Parameter)}{lora}")


def prepare(model, bits=4, group_size=128, symmetric=False, act_bits=0, learn_scales=False, lora_rank=0,
            lora_alpha=0.0):
    """Every linear of the blocks (quantize.linear_names) -> a FakeQuantLinear, in place. A QuantLinear (a quantize.py
    checkpoint) brings its own grid and its dequantised weight; an nn.Linear gets RTN's grid of its weight. With
    lora_rank everything else is frozen. -> the model."""
    if lora_rank:
        model.requires_grad_(False)
    for name in Q.linear_names(model, (nn.Linear, Q.QuantLinear)):
        layer = model.get_submodule(name)
        if isinstance(layer, Q.QuantLinear):
            weight, scales, zeros = layer.dequantize(), layer.scales, layer.zeros
            act_bits = act_bits or layer.act_bits
        else:
            weight = layer.weight.detach().float()
            scales, zeros = Q.grid_params(weight, bits, group_size, symmetric)
        fake = FakeQuantLinear(weight, layer.bias, scales, zeros, bits, group_size, act_bits, learn_scales, lora_rank,
                               lora_alpha)
        Q._swap(model, name, fake.to(weight.device))
    model.quant = {"format": Q.weight_format("rtn", bits, group_size, "int"), "method": "qat", "bits": bits,
                   "group_size": group_size, "symmetric": symmetric, "scheme": "int", "act_bits": act_bits}
    return model


def convert(model):
    """A copy of a prepare()d model with every FakeQuantLinear replaced by its QuantLinear: quantize.py's model,
    saved in its format."""
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, FakeQuantLinear):
            Q._swap(out, name, m.to_quant())
    out.quant = dict(model.quant)
    return out.requires_grad_(False)


# -----------------------------------------------------------------------------
# The script


@dataclass
class Config:
    model: str = ""  # the start: a quantize.py checkpoint (its grid and weights) or a float one (RTN's grid)
    teacher: str = ""  # the float model to distil from (self-distillation); empty: the data's tokens are the targets
    data: str = "data/toy/sft.jsonl"  # chats JSONL, or .txt / {"text"} JSONL with --format text
    format: str = "chat"  # chat (the assistant's tokens are scored) or text (every token)
    template: str = "auto"  # auto (the model's own chat template) or plain, as sft.py
    out: str = "out/qat.pt"  # the converted, packed checkpoint (quantize.py's format), with the train state
    bits: int = 4  # 8, 4, 3 or 2; a quantised --model must be on this grid already
    group_size: int = 128  # weights per scale along the input dimension (0: one scale per output channel)
    symmetric: bool = False  # a grid symmetric about 0 (float --model only: a quantised one brings its grid)
    act_bits: int = 0  # 8: inputs of every block linear rounded to int8 per token (W4A8, W8A8); 0: float inputs
    learn_scales: bool = False  # LSQ: the scales train beside the weights (the zeros stay fixed)
    ce_weight: float = 0.0  # with --teacher: loss = (1 - w) KL(teacher || model) + w CE on the data's tokens
    steps: int = 100  # optimiser steps
    batch_size: int = 4  # rows per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-5  # peak learning rate (QAT is a short, gentle fine-tune: ~1e-5 full, ~1e-4 with LoRA)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 5  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay on matrices (the scales are matrices: decay would shrink them)
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    seq_len: int = 256  # tokens per row
    packing: bool = True  # pack examples into rows (else one padded example per row)
    eval_frac: float = 0.05  # fraction of examples held out for eval_loss / eval_kd
    eval_every: int = 50  # steps between held-out evaluations (0 = only at the end)
    save_every: int = 0  # steps between checkpoints (0 = only at the end)
    seed: int = 0  # seeds the data order, the split and the LoRA init
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # recompute activations in backward to save memory
    offload_activations: bool = False  # keep the tensors saved for backward in CPU memory (parallel.py)
    fsdp: bool = False  # FSDP2 under torchrun: shard weights, scales, gradients and AdamW state (parallel.py)
    lora_rank: int = 0  # LoRA-only QAT: adapters of this rank, merged into each weight before the rounding
    lora_alpha: float = 0.0  # LoRA alpha (0 = 2 * rank)
    resume: str = ""  # checkpoint written by this script to continue from (latent weights, scales, optimiser, RNG)
    stop_at: int = 0  # save and stop after this step, keeping the --steps schedule (time-sliced jobs); 0 = off
    save_on_interrupt: bool = False  # Ctrl-C / SIGTERM: save a resumable checkpoint at the end of the step, then stop
    skip_bad_lines: bool = False  # skip (and count) malformed JSONL lines instead of stopping
    log: str = ""  # JSONL metrics file (one line per step)


def check_flags(cfg):
    """Refuse impossible settings before anything is loaded."""
    checks = [(bool(cfg.model), "--model is required: the checkpoint to train (quantised by quantize.py, or float)"),
              (cfg.format in ("chat", "text") and cfg.template in ("auto", "plain"),
               "--format must be chat or text, --template auto or plain"),
              (cfg.bits in (2, 3, 4, 8), f"--bits {cfg.bits}: choose 8, 4, 3 or 2"),
              (cfg.group_size >= 0 and cfg.group_size % 8 == 0,
               f"--group-size {cfg.group_size}: a multiple of 8, or 0 for one scale per output channel"),
              (cfg.act_bits in (0, 8), f"--act-bits {cfg.act_bits}: 0 (float inputs) or 8 (int8 per token)"),
              (0 <= cfg.ce_weight <= 1, "--ce-weight must be in [0, 1]"),
              (cfg.teacher or cfg.ce_weight == 0, "--ce-weight mixes the CE into the teacher's loss: give --teacher"),
              (0 <= cfg.eval_frac < 1, "--eval-frac must be in [0, 1)"),
              (cfg.lora_rank >= 0, "--lora-rank must be >= 0")]
    for ok, message in checks:
        if not ok:
            raise M.UserError(message)


def load_start(cfg, device):
    """-> (the prepared model on device, teacher or None, tokenizer, lineage, start step, train_state or None)."""
    model, enc, ckpt = C.load_model(cfg.model)
    if model.cfg.head != "lm":
        raise M.UserError(f"--model {cfg.model}: a reward model (scalar head), not a language model")
    quant = getattr(model, "quant", None)
    if quant is not None:
        grid = (quant["scheme"], quant["bits"], quant["group_size"], quant["symmetric"])
        if grid != ("int", cfg.bits, cfg.group_size, cfg.symmetric):
            raise M.UserError(f"--model {cfg.model} is {quant['format']} ({'symmetric' if quant['symmetric'] else 'min-max'}"
                              f"{', ' + quant['scheme'] if quant['scheme'] != 'int' else ''}): QAT keeps its grid, so "
                              f"give --bits {quant['bits']} --group-size {quant['group_size']}"
                              f"{' --symmetric' if quant['symmetric'] else ''}, or start from the float model")
        if any(m.__class__.__name__ == "LoRALinear" for m in model.modules()):
            raise M.UserError(f"--model {cfg.model} carries LoRA adapters: merge them first (save it with sft.py)")
    if cfg.seq_len > model.cfg.max_seq_len:
        raise M.UserError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    torch.manual_seed(cfg.seed)  # the LoRA init
    prepare(model, cfg.bits, cfg.group_size, cfg.symmetric, cfg.act_bits, cfg.learn_scales, cfg.lora_rank,
            cfg.lora_alpha).float()
    step, state = 0, None
    if cfg.resume:
        if C.is_dcp(cfg.resume):  # --fsdp's shards: the tensors load after sharding, in wrap_for_training
            import parallel
            resumed = parallel.read_meta(cfg.resume)
        else:
            resumed = C.load_checkpoint(cfg.resume)
        state, step = resumed.get("train_state"), resumed.get("step")
        sharded = isinstance(state, dict) and "dcp" in state  # meta.pt names the quantised model; the shards hold it
        ours = "quant" in resumed if sharded else isinstance(state, dict) and "qat" in state
        if not ours or not isinstance(step, int):
            raise M.UserError(f"{cfg.resume}: no QAT train_state to resume from (not written by qat.py?)")
        try:
            if not sharded:
                model.load_state_dict(state["qat"])
        except (RuntimeError, KeyError, TypeError) as e:
            raise M.UserError(f"{cfg.resume}: does not fit the model being trained, resume with the flags of the run "
                              f"that wrote it ({' '.join(str(e).split())[:120]})")
    teacher = None
    if cfg.teacher:
        teacher, t_enc, _ = C.load_model(cfg.teacher, device)
        why = C.tokenizers_differ(enc, t_enc)
        if why or teacher.cfg.head != "lm":
            raise M.UserError(f"--teacher {cfg.teacher}: " + (f"another tokenizer than --model's ({why})" if why else
                              "a reward model (scalar head), not a language model"))
        teacher.eval().requires_grad_(False)
    return model.to(device), teacher, enc, ckpt.get("lineage", []), step, state


def unsharded(raw, sd, learn_scales):
    """A plain prepare()d model holding the full state dict `sd` (gathered from --fsdp's shards), for convert():
    raw's structure built again on the meta device, then sd's tensors assigned (no copy)."""
    q = raw.quant
    with torch.device("meta"):
        net = prepare(M.Transformer(raw.cfg), q["bits"], q["group_size"], q["symmetric"], q["act_bits"], learn_scales)
    tied = {"lm_head.weight": sd["embed.weight"]} if C.shares_head(raw.cfg) else {}
    net.load_state_dict({**tied, **sd}, assign=True)
    return net


def save(cfg, raw, enc, optimizer, step, metrics, lineage, rank):
    """--out: the converted model (quantize.py's format) and the train state (latent weights, optimiser, RNG).
    Under --fsdp every rank first writes its shards to {out}.dcp/, then the full tensors are gathered to rank 0."""
    state = {"rng": C.rng_state(), "data_position": step}
    if cfg.fsdp:
        import parallel as P
        P.save_dcp(P.dcp_path(cfg.out), raw, optimizer, P.dcp_meta(cfg, raw, enc, step, metrics, lineage, state))
    sd, osd = C.full_state(cfg, raw, optimizer)
    if rank == 0:
        net = unsharded(raw, sd, cfg.learn_scales) if cfg.fsdp else raw
        C.save_checkpoint(cfg.out, convert(net).cpu(), enc, step, vars(cfg), metrics, lineage,
                          {"qat": sd, "optimizer": osd, **state})
    return f"{cfg.out} (step {step})"


@torch.no_grad()
def evaluate(model, teacher, rows, cfg, device):
    """Held-out rows -> {eval_loss: the CE, eval_kd: KL(teacher || model) with a teacher}, per supervised token."""
    if teacher is not None:
        return distill.evaluate(model, teacher, rows, cfg, device)
    return {"eval_loss": sft.eval_loss(model, rows, cfg, device)} if rows is not None else {}


def main(argv=None):
    cfg = C.parse_config(Config, argv, description=__doc__)
    check_flags(cfg)
    rank, world, device = C.setup_ddp(cfg.device)
    model, teacher, enc, lineage, start_step, state = load_start(cfg, device)
    C.check_out(cfg.out, model)
    C.catch_interrupts(cfg.save_on_interrupt)
    last_saved = f"{cfg.resume} (step {start_step})" if cfg.resume else None
    model.grad_checkpointing = cfg.grad_checkpointing
    pad_id = C.special_id(enc, "<|pad|>")
    fakes = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]

    examples, n_truncated = sft.tokenize(cfg, enc)
    train, held_out = sft.split(examples, cfg.eval_frac, cfg.seed)
    if not train:
        raise M.UserError(f"{cfg.data}: no training examples left after holding out --eval-frac")
    rows = sft.make_rows(train, cfg, pad_id)
    eval_rows = sft.make_rows(held_out, cfg, pad_id) if held_out else None
    n_rows = len(rows[0])
    if rank == 0:
        print(f"{len(train)} train / {len(held_out)} eval examples -> {n_rows} rows of {cfg.seq_len}, {n_truncated} "
              f"truncated; {len(fakes)} linears fake-quantised to {model.quant['format']}"
              f"{', inputs int8' if model.quant['act_bits'] else ''}; {model.num_params(trainable=True):,} trainable; "
              f"targets: {'the teacher ' + cfg.teacher if teacher is not None else 'the data'}")

    model, raw, optimizer = C.wrap_for_training(model, cfg, state, world, device)
    per_step = cfg.batch_size * cfg.grad_accum * world
    mine = slice(rank * cfg.batch_size * cfg.grad_accum, (rank + 1) * cfg.batch_size * cfg.grad_accum)
    metrics = {}
    model.train()
    bar, end = C.step_range(cfg, start_step, rank, "qat")
    for step in bar:
        t0 = time.perf_counter()
        lr = C.set_lr(step, cfg, optimizer)
        idx = C.step_indices(step, n_rows, per_step, mine, cfg.seed)
        micro = [idx[i:i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)]
        # the step's total number of supervised tokens, over micro-batches and ranks: the loss denominator
        n_sup = C.all_reduce_sum(sum(rows[1][b, 1:].sum() for b in micro).to(device).float()).clamp(min=1)
        sums = dict(loss=0.0, kd=0.0, ce=0.0)
        for j, b in enumerate(micro):
            ids, mask, doc = sft.batch_of(rows, b, device, trim=not cfg.compile)
            sync = j == len(micro) - 1 or world == 1
            with model.no_sync() if not sync else contextlib.nullcontext():
                with C.autocast(device, cfg.dtype):
                    logits = model(ids, doc_ids=doc)
                if teacher is not None:
                    with torch.no_grad(), C.autocast(device, cfg.dtype):
                        t_logits = teacher(ids, doc_ids=doc)
                    loss, kd, ce = distill.distill_loss(logits[:, :-1], t_logits[:, :-1], mask[:, 1:],
                                                        labels=ids[:, 1:], ce_weight=cfg.ce_weight, n_tokens=n_sup)
                else:
                    nll, _ = sft.lm_loss_sum(logits, ids, mask)
                    loss, kd, ce = nll / n_sup, torch.zeros(()), nll / n_sup
                (loss * world).backward()  # DDP averages gradients over ranks; * world undoes that
            for k, v in (("loss", loss), ("kd", kd), ("ce", ce)):
                sums[k] += v.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        record = {"step": step + 1, **C.reduce_sums(sums, device), "lr": lr, "grad_norm": grad_norm.item(),
                  "tok_s": n_sup.item() / (time.perf_counter() - t0)}
        if teacher is None:
            del record["kd"]
        C.check_finite(record, ("loss", "grad_norm"), last_saved)
        last, stop = step + 1 == end, C.interrupted(device)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 or last:
            record.update(evaluate(model, teacher, eval_rows, cfg, device))
            raw.eval()  # the full weights (under --fsdp gathered on every rank: parallel.shard)
            with torch.no_grad():
                clipped = [clipped_fraction(f.merged_weight(), *f.grid(), f.bits, f.group_size) for f in fakes]
            raw.train()
            record["clipped"] = torch.stack(clipped).mean().item()
        if rank == 0:
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.1e}")
            C.log_jsonl(cfg.log, record)
        metrics = {**metrics, **record}
        if last or stop or cfg.save_every and (step + 1) % cfg.save_every == 0:
            last_saved = save(cfg, raw, enc, optimizer, step + 1, metrics, lineage + [f"qat:{raw.quant['format']}"],
                              rank)
        if stop:
            raise C.Interrupted(f"saved {last_saved}; continue with --resume {cfg.out}")
    if rank == 0 and metrics:
        shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("loss", "eval_loss", "eval_kd") if k in metrics)
        print(f"saved {cfg.out}: step {metrics['step']}, {shown}")


if __name__ == "__main__":
    C.run(main)
