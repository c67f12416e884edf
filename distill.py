"""
distill.py: knowledge distillation, a teacher's next-token distributions taught to a (smaller) student.

The loss at each supervised position (`distill_loss`), p = softmax(z_teacher / T), q = softmax(z_student / T):
  forward  KL(p || q) = sum_v p_v log(p_v / q_v): mass-covering, q must put mass wherever p does (Hinton et al.
           2015; word-level KD, Kim & Rush 2016, Sec. 3.1)
  reverse  KL(q || p): mode-seeking, q may drop modes of p (MiniLLM, Gu et al. 2024)
  jsd      JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (GKD, Agarwal et al. 2024,
           Eq. 1). JSD(beta) / beta -> forward KL as beta -> 0 and JSD(beta) / (1 - beta) -> reverse KL as beta -> 1;
           as in TRL's GKDTrainer, beta = 0 and beta = 1 *are* those two KLs.
  Where the student gives a token the teacher wants almost no mass (q_v -> 0, e.g. a base model's end token), the
  gradient in its logit is q_v - p_v for forward KL, but vanishes like q_v log q_v for reverse KL and JSD: only
  forward KL teaches what the student never does (scripts/distill_toy.sh shows it).
  L = (1 - alpha) T^2 D + alpha CE, alpha = --ce-weight: Hinton's weighted average with the hard labels, CE the
  student's cross-entropy on the data's tokens at T = 1. The T^2: for large T the gradient of D in the student's
  logits is (z_s - z_t) / (V T^2) for zero-mean logits (Hinton Sec. 2.1), so T^2 keeps the soft term's gradient
  the same size whatever T is. Each term is a mean over the step's supervised tokens (all micro-batches and ranks),
  as sft.py normalises and as TRL's GKD averages over labels != -100.

Where the sequences come from (TRL GKDConfig's names):
  off-policy  the default: the data's chats (assistant tokens scored; --format text: every token), packed as sft.py
              packs them, and the teacher's distribution at every supervised position of the same rows.
  --seq-kd    sequence-level KD (Kim & Rush 2016, Sec. 3.2): before training the teacher answers each training prompt
              (a chat up to its last assistant turn) greedily, and those answers are the data. With --ce-weight 1 it
              is their Seq-KD (the NLL of the teacher's output); the default adds word-level KD on it (their
              Seq-KD + Word-KD). The answers go to OUT.seqkd.jsonl as chats (readable; sft.py --data takes them).
  --lmbda L   on-policy (GKD, Algorithm 1): each optimiser step, with probability L, the student samples a response
              to each of the step's prompts (KV cache, --gen-temperature) and the teacher's distributions along the
              student's own tokens are the targets; the other steps are off-policy (teacher-written with --seq-kd).
              --lmbda 1 is fully on-policy: the student learns where it actually goes, not only where the data goes.
Hidden states: --hidden-layers 1:3,-1:-1 (student block : teacher block) adds --hidden-weight x the mean over the
pairs of the cosine distance 1 - cos(W h_s, h_t) between the blocks' outputs (the residual stream) at the
supervised positions (`hidden_state_loss`), W a learned linear map (student width -> teacher width) where the widths
differ, the identity where they agree: ModelOpt's HiddenStateCosineLoss with its projection layer, the intermediate
loss Minitron heals pruned models with (Muralidharan et al. 2024). W trains beside the student, is kept in the train
state for --resume, and is not part of the output checkpoint.

Student: --model, any checkpoint load_model reads (a smaller trained model, a pruned one, a GGUF), or --init
PRESET[:field=value,...], a fresh one (--init tiny:d_model=64,d_ff=192 is a quarter of tiny). Full or LoRA
(--lora-rank), resume, DDP, packing, logging as sft.py. Teacher and student must share the tokenizer (every id the
same bytes) and chat template: a one-line error otherwise, since the loss compares distributions id by id.

Cost: the teacher runs one forward per batch (eval mode, no grad), about a third of a training step of a model its
size. On the built-in world (teacher 4x the student, one CPU thread) that was 0.17 s of a 0.45 s off-policy step
(`teacher_s` in the log); an on-policy step took 0.75 s, half of it sampling (`gen_s`).
Top-k teacher logits cached to disk are not offered: they would save only that third, make the loss approximate
(reverse KL and JSD need the teacher's probability of every token the student puts mass on, which a top-k cache
lacks), and on-policy and --seq-kd steps score new sequences that no cache holds.

Logged per step: loss, kd (D, without T^2), ce, hidden, on_policy (1 for a sampled step), lr, grad_norm, tok_s,
teacher_s, gen_s; every --eval-every on the held-out chats: eval_kd (D to the teacher) and eval_loss (the CE).

Departures: this script imports sft.py for its data plumbing (tokenize, make_rows, split, batch_of), where DESIGN.md
lets only cai.py do so. From TRL's GKDTrainer: the T^2 factor (TRL divides by T and stops; at T = 1, the default,
they agree); --seq-kd answers are greedy and written once before training (TRL samples the teacher anew per batch);
the lmbda draw is per optimiser step, the same on every rank (TRL's per micro-batch); the hard-label term is
applied on off-policy steps only (on-policy tokens are the student's own, no labels); where the two models' rows
of padded vocabulary differ, logits beyond the tokenizer's ids are dropped before the softmax.

    python distill.py --teacher out/sft.pt --model out/student_base.pt --out out/kd.pt          # CPU, forward KL
    python distill.py --teacher out/sft.pt --model out/student_base.pt --loss reverse --lmbda 1 \\
        --out out/kd_onpolicy.pt                                                             # on-policy (GKD)
    python distill.py --teacher out/sft.pt --model out/student_base.pt --loss jsd --beta 0.5 --lmbda 0.5  # GKD
    python distill.py --teacher out/sft.pt --model out/student_base.pt --seq-kd --ce-weight 1 # Seq-KD
    python distill.py --teacher out/sft.pt --init tiny:d_model=64 --hidden-layers 1:1,3:3     # fresh, hidden
    python distill.py --teacher out/sft.pt --model out/student_base.pt --device cuda           # one GPU, bf16
    torchrun --nproc_per_node=2 distill.py -- --teacher out/sft.pt --model out/student_base.pt --log out/kd.jsonl
    bash scripts/distill_toy.sh out/distill        # the built-in world: SFT vs KD students, one table
"""

import contextlib
import json
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
import model as M
import sft

# -----------------------------------------------------------------------------


@dataclass
class Config:
    teacher: str = "out/sft.pt"  # teacher checkpoint (any format load_model reads); frozen, eval mode, no grad
    model: str = ""  # student checkpoint to start from; empty with --init
    init: str = ""  # or a fresh student: a preset, optionally resized, e.g. tiny:d_model=64,d_ff=192
    data: str = "data/toy/sft.jsonl"  # chats JSONL, or .txt / {"text"} JSONL with --format text
    format: str = "chat"  # chat (the assistant's tokens are scored) or text (every token)
    out: str = "out/distill.pt"  # output checkpoint (the student)
    loss: str = "forward"  # forward KL(teacher || student), reverse KL(student || teacher) or jsd (GKD's)
    beta: float = 0.5  # jsd's interpolation: 0 is forward KL, 1 reverse KL (--loss jsd only)
    temperature: float = 1.0  # Hinton's T: both distributions softened by T, the soft loss multiplied by T^2
    ce_weight: float = 0.0  # alpha: loss = (1 - alpha) T^2 KD + alpha CE on the data's tokens (off-policy steps)
    lmbda: float = 0.0  # GKD's lambda: the probability that a step's responses are sampled from the student
    seq_kd: bool = False  # sequence-level KD: the teacher's greedy answers replace the data's last assistant turns
    max_new_tokens: int = 64  # length limit of sampled (--lmbda) and teacher-written (--seq-kd) responses
    gen_temperature: float = 1.0  # the student's sampling temperature on on-policy steps (0 = greedy)
    hidden_layers: str = ""  # hidden-state matching: student:teacher block pairs, e.g. 1:3,-1:-1 (empty = off)
    hidden_weight: float = 1.0  # weight of the hidden-state loss beside the logit loss
    steps: int = 300  # optimiser steps
    batch_size: int = 16  # rows (off-policy) or prompts (on-policy) per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 20  # linear warmup steps
    weight_decay: float = 0.1  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    seq_len: int = 256  # tokens per row (prompt + response on on-policy steps)
    packing: bool = True  # pack examples into rows (else one padded example per row)
    eval_frac: float = 0.05  # fraction of examples held out for eval_kd and eval_loss
    eval_every: int = 100  # steps between held-out evaluations (0 = only at the end)
    save_every: int = 0  # steps between checkpoints (0 = only at the end)
    seed: int = 0  # seeds the data order, the split, the init, the lmbda draws and the sampling
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16
    compile: bool = False  # torch.compile the student
    grad_checkpointing: bool = False  # recompute the student's activations in backward to save memory
    offload_activations: bool = False  # keep the tensors saved for backward in CPU memory (parallel.py)
    fsdp: bool = False  # FSDP2 under torchrun: shard weights, gradients and AdamW state over ranks (parallel.py)
    lora_rank: int = 0  # LoRA rank for the student (0 = full fine-tuning)
    lora_alpha: float = 0.0  # LoRA alpha (0 = 2 * rank)
    lora_dropout: float = 0.0  # dropout on the LoRA branch
    peft: str = ""  # adapter: lora, dora, prefix, prefix-mlp or prompt ("" = lora if --lora-rank, else full)
    peft_len: int = 16  # --peft prefix / prefix-mlp / prompt: learned slots (keys and values, or embeddings)
    rslora: bool = False  # LoRA / DoRA scaled by alpha / sqrt(rank) (rsLoRA) instead of alpha / rank
    resume: str = ""  # checkpoint written by this script to continue from (student, projections, optimisers, RNG)
    stop_at: int = 0  # save and stop after this step, keeping the --steps schedule (time-sliced jobs); 0 = off
    save_on_interrupt: bool = False  # Ctrl-C / SIGTERM: save a resumable checkpoint at the end of the step, then stop
    skip_bad_lines: bool = False  # skip (and count) malformed JSONL lines instead of stopping
    log: str = ""  # JSONL metrics file (one line per step)


LOSSES = ("forward", "reverse", "jsd")
GEN_BATCH = 64  # prompts per generate() call when the teacher writes the --seq-kd answers

# -----------------------------------------------------------------------------
# The math: pure functions of tensors, torch and math only (this block can be copied alone)


def kl(log_p, log_q):
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last dim, from log-probabilities (..., V) -> (...)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def divergence(student_logits, teacher_logits, kind="forward", beta=0.5, temperature=1.0):
    """Per-position divergence (...,) in nats, fp32, between the teacher's p = softmax(teacher_logits / T) and the
    student's q = softmax(student_logits / T), both (..., V) and finite:
      forward  KL(p || q)
      reverse  KL(q || p)
      jsd      beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (GKD Eq. 1; log m by logaddexp),
               beta = 0 taken as KL(p || q), beta = 1 as KL(q || p) (TRL's GKDTrainer convention).
    No T^2 here: distill_loss applies it."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward" if beta == 0.0 else "reverse"
    if kind == "forward":
        return kl(log_p, log_q)
    if kind == "reverse":
        return kl(log_q, log_p)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 <= beta <= 1, got {beta}")
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)
    raise ValueError(f"unknown divergence {kind!r}: choose forward, reverse or jsd")


def distill_loss(student_logits, teacher_logits, mask, kind="forward", beta=0.5, temperature=1.0, labels=None,
                 ce_weight=0.0, n_tokens=None):
    """The distillation loss over supervised positions.

    student_logits, teacher_logits (..., V) at the same positions, each predicting the next token; mask (...) 1 where
    that prediction is supervised; labels (...) the data's next tokens, for the hard-label term (None: no CE).
    -> (loss, kd, ce), scalars: kd = sum over masked positions of `divergence` / n_tokens, ce the same of the
    student's cross-entropy on labels at T = 1 (0 without labels), loss = (1 - ce_weight) T^2 kd + ce_weight ce.
    n_tokens defaults to mask.sum(): the mean. Given the total of a whole step, micro-batches sum to its mean.
    Only masked positions are computed, so whatever the logits hold elsewhere (even NaN) changes nothing."""
    m = mask.bool()
    s, t = student_logits[m], teacher_logits[m]  # (N, V): the supervised positions only
    n = m.sum().clamp(min=1) if n_tokens is None else n_tokens
    kd = divergence(s, t, kind, beta, temperature).sum() / n
    ce = F.cross_entropy(s.float(), labels[m], reduction="sum") / n if labels is not None else kd.new_zeros(())
    return (1 - ce_weight) * temperature ** 2 * kd + ce_weight * ce, kd, ce


def hidden_state_loss(student_hidden, teacher_hidden, mask, n_tokens=None):
    """Cosine distance of matched hidden states: lists of (..., C) tensors, pair by pair, the student's already mapped
    to the teacher's width C; mask (...) -> scalar: the mean over pairs of sum over masked positions of
    1 - cos(h_s, h_t), / n_tokens (default mask.sum()). Blind to each state's scale, which differs between models
    and between layers (ModelOpt's HiddenStateCosineLoss)."""
    m = mask.bool()
    n = m.sum().clamp(min=1) if n_tokens is None else n_tokens
    per_pair = [(1 - F.cosine_similarity(hs[m].float(), ht[m].float(), dim=-1)).sum()
                for hs, ht in zip(student_hidden, teacher_hidden)]
    return torch.stack(per_pair).mean() / n


def on_policy_step(seed, step, lmbda):
    """GKD's coin for one optimiser step: True with probability lmbda, a pure function of (seed, step), so resume
    and every DDP rank draw the same."""
    return torch.rand((), generator=torch.Generator().manual_seed(seed * 7919 + step)).item() < lmbda


# -----------------------------------------------------------------------------
# Data: chats and their prompts, teacher answers, student samples


def prompt_of(messages):
    """A chat up to (not including) its last assistant turn: what the teacher or the student answers."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def load_examples(cfg, enc, need_prompts):
    """-> (examples [(ids, mask)], prompts [(messages, ids)] or None, truncated). Chats are rendered as sft.py
    renders them (an example keeps its first --seq-len tokens); a prompt is rendered with the generation prompt and
    keeps its last --seq-len - --max-new-tokens tokens, so prompt + response fit in --seq-len."""
    if cfg.format == "text":
        examples, truncated = sft.tokenize(cfg, enc)
        return examples, None, truncated
    examples, prompts, truncated = [], [] if need_prompts else None, 0
    keep = max(cfg.seq_len - cfg.max_new_tokens, 1)
    for rec in C.read_jsonl(cfg.data, "chat", cfg.skip_bad_lines):
        ids, mask = C.render_chat(enc, rec["messages"])
        truncated += len(ids) > cfg.seq_len
        examples.append((ids[:cfg.seq_len], mask[:cfg.seq_len]))
        if need_prompts:
            head = prompt_of(rec["messages"])
            ids = C.render_chat(enc, head, add_generation_prompt=True)[0]
            prompts.append((head, ids[max(len(ids) - keep, 0):]))
    return examples, prompts, truncated


@torch.no_grad()
def teacher_answers(teacher, prompts, cfg, enc, device, rank):
    """--seq-kd: the teacher's greedy answer to each prompt -> (examples: prompt ids + answer ids with the mask on
    the answer, the very tokens the teacher wrote; how many hit --max-new-tokens unfinished). Rank 0 also writes the
    chats to OUT.seqkd.jsonl. Every rank generates the whole set: greedy decoding is deterministic."""
    stop, pad = C.end_id(enc), C.special_id(enc, "<|pad|>")
    banned = C.never_sampled(enc, teacher.cfg.vocab_size, [stop])
    examples, chats, unfinished = [], [], 0
    for i in range(0, len(prompts), GEN_BATCH):
        part = prompts[i:i + GEN_BATCH]
        with C.autocast(device, cfg.dtype):
            tokens, _, gen_mask = M.generate(teacher, [p for _, p in part], cfg.max_new_tokens, 0.0, 0, 1.0, [stop],
                                             pad, None, banned)
        for (messages, ids), row, keep in zip(part, tokens.tolist(), gen_mask.tolist()):
            answer = [t for t, k in zip(row, keep) if k]
            unfinished += stop not in answer
            examples.append((ids + answer, [0] * len(ids) + [1] * len(answer)))
            text = enc.decode([t for t in answer if t != stop])
            chats.append({"messages": messages + [{"role": "assistant", "content": text}]})
    if rank == 0:
        body = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats).encode("utf-8")
        C.atomic_write(cfg.out + ".seqkd.jsonl", lambda f: f.write(body))
    return examples, unfinished


@torch.no_grad()
def rollout(model, prompt_ids, cfg, enc, device, gen):
    """An on-policy batch: the student samples a response to each prompt (KV cache, --gen-temperature, the ids
    common.never_sampled bans never drawn) -> dict over [left-padded prompt | response] (B, P + N): ids, attn (1 on
    real tokens), mask (1 on the response tokens, the stop included: the positions scored), logp (the sampler's
    log-prob of each response token, 0 elsewhere), banned (V,) and doc None."""
    stop, pad = C.end_id(enc), C.special_id(enc, "<|pad|>")
    banned_ids = C.never_sampled(enc, model.cfg.vocab_size, [stop])
    with C.autocast(device, cfg.dtype):
        tokens, logp, gen_mask = M.generate(model, prompt_ids, cfg.max_new_tokens, cfg.gen_temperature, 0, 1.0,
                                            [stop], pad, gen, banned_ids)
    p_ids, p_mask = M.pad_left(prompt_ids, pad)
    zeros = torch.zeros_like(p_ids, device=device)
    return dict(ids=torch.cat([p_ids.to(device), tokens], 1), attn=torch.cat([p_mask.to(device), gen_mask], 1),
                mask=torch.cat([zeros, gen_mask], 1), logp=torch.cat([zeros.float(), logp.float()], 1), doc=None,
                banned=M.ban_mask(model.cfg.vocab_size, banned_ids, device))


def forward(model, batch, vocab=None):
    """Logits (B, T, V) over a batch of packed rows (doc ids) or of rollouts (attention mask), cut to `vocab` ids."""
    return model(batch["ids"], doc_ids=batch["doc"], attention_mask=batch.get("attn"))[..., :vocab]


# -----------------------------------------------------------------------------
# Models


class Projection(nn.Module):
    """Student hidden states -> the teacher's width: one learned linear map per matched pair of layers."""

    def __init__(self, n_pairs, d_student, d_teacher):
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(d_student, d_teacher, bias=False) for _ in range(n_pairs))

    def forward(self, hidden):
        return [m(h) for m, h in zip(self.maps, hidden)]


def capture(model, layers):
    """Forward hooks that keep the output of each block in `layers` (the residual stream after it) -> the dict they
    fill, {layer: (B, T, C)}, overwritten by every forward."""
    store = {}
    for i in layers:
        model.blocks[i].register_forward_hook(lambda mod, args, out, i=i: store.__setitem__(i, out))
    return store


def load_models(cfg, device):
    """-> student (on device, LoRA applied, resumed), teacher (eval, frozen), tokenizer, lineage, start step, state."""
    teacher, enc, _ = C.load_model(cfg.teacher, device)
    if teacher.cfg.head != "lm":
        raise M.UserError(f"--teacher {cfg.teacher}: a reward model (scalar head), not a language model")
    teacher.eval().requires_grad_(False)
    if bool(cfg.model) == bool(cfg.init):
        raise M.UserError("give exactly one of --model (the student's checkpoint) or --init (a preset for a fresh "
                          "student); --resume goes with the same flags as the run it continues")
    if cfg.init:
        torch.manual_seed(cfg.seed)
        preset, sizes = C.parse_init(cfg.init)
        max_len = max(cfg.seq_len, M.PRESETS.get(preset, {}).get("max_seq_len", 0))
        student, lineage = M.build_model(preset, enc, **{"max_seq_len": max_len, **sizes}), [f"init:{cfg.init}"]
    else:
        student, s_enc, ckpt = C.load_model(cfg.model)
        lineage = ckpt.get("lineage", [])
        why = C.tokenizers_differ(enc, s_enc)
        if why:
            raise M.UserError(f"teacher {cfg.teacher} ({enc.name}) and student {cfg.model} ({s_enc.name}) do not "
                              f"share a tokenizer ({why}): distillation compares their distributions id by id")
        if student.cfg.head != "lm":
            raise M.UserError(f"--model {cfg.model}: a reward model (scalar head), not a language model")
    for name, m in (("teacher", teacher), ("student", student)):
        if cfg.seq_len > m.cfg.max_seq_len:
            raise M.UserError(f"--seq-len {cfg.seq_len} exceeds the {name}'s max_seq_len {m.cfg.max_seq_len}")
    step, state = C.resume_and_peft(student, cfg)
    return student.to(device), teacher, enc, lineage, step, state


def layer_pairs(spec, student, teacher):
    """--hidden-layers "s:t,..." -> [(student block, teacher block)], negative indices counted from the end."""
    pairs = []
    for item in filter(None, spec.split(",")):
        try:
            s, t = (int(x) for x in item.split(":"))
        except ValueError:
            raise M.UserError(f"--hidden-layers {spec}: {item!r} is not student_block:teacher_block, e.g. 1:3")
        ns, nt = student.cfg.n_layer, teacher.cfg.n_layer
        if not (-ns <= s < ns and -nt <= t < nt):
            raise M.UserError(f"--hidden-layers {item}: the student has blocks 0..{ns - 1}, the teacher 0..{nt - 1}")
        pairs.append((s % ns, t % nt))
    return pairs


def check_flags(cfg):
    """Refuse impossible settings before anything is loaded."""
    if cfg.loss not in LOSSES or cfg.format not in ("chat", "text"):
        raise M.UserError(f"--loss must be one of {', '.join(LOSSES)}, --format chat or text")
    checks = [(0 <= cfg.beta <= 1, "--beta must be in [0, 1]"),
              (cfg.beta == 0.5 or cfg.loss == "jsd", "--beta is the JSD's interpolation: use it with --loss jsd"),
              (cfg.temperature > 0, "--temperature must be > 0"),
              (0 <= cfg.ce_weight <= 1, "--ce-weight must be in [0, 1]"),
              (0 <= cfg.lmbda <= 1, "--lmbda must be in [0, 1] (the probability of an on-policy step)"),
              (cfg.gen_temperature >= 0, "--gen-temperature must be >= 0"),
              (cfg.hidden_weight >= 0, "--hidden-weight must be >= 0"),
              (0 <= cfg.eval_frac < 1, "--eval-frac must be in [0, 1)"),
              (cfg.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
              (cfg.format == "chat" or not (cfg.lmbda or cfg.seq_kd),
               "--lmbda and --seq-kd answer prompts: they need chats (--format chat)"),
              (cfg.seq_len - cfg.max_new_tokens >= 8 or not (cfg.lmbda or cfg.seq_kd),
               f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in --seq-len {cfg.seq_len}"),
              (not (cfg.fsdp and cfg.hidden_layers), "--fsdp shards the student alone: --hidden-layers' projection "
               "trains with DDP (torchrun without --fsdp)")]
    for ok, message in checks:
        if not ok:
            raise M.UserError(message)


# -----------------------------------------------------------------------------


@torch.no_grad()
def evaluate(student, teacher, rows, cfg, device, vocab=None, loss="forward", beta=0.5, temperature=1.0):
    """Held-out rows -> {eval_kd: the mean `loss` divergence to the teacher, eval_loss: the student's CE}, per
    supervised token (cfg: batch_size, compile, dtype)."""
    if rows is None:
        return {}
    student.eval()
    sums = dict(kd=0.0, ce=0.0, n=0.0)
    for i in range(0, len(rows[0]), cfg.batch_size):
        ids, mask, doc = sft.batch_of(rows, slice(i, i + cfg.batch_size), device, trim=not cfg.compile)
        batch = dict(ids=ids, doc=doc)
        with C.autocast(device, cfg.dtype):
            s, t = forward(student, batch, vocab), forward(teacher, batch, vocab)
        _, kd, ce = distill_loss(s[:, :-1], t[:, :-1], mask[:, 1:], loss, beta, temperature, ids[:, 1:], n_tokens=1)
        sums = dict(kd=sums["kd"] + kd.item(), ce=sums["ce"] + ce.item(), n=sums["n"] + mask[:, 1:].sum().item())
    total = C.reduce_sums(sums, device)
    student.train()
    return {"eval_kd": total["kd"] / max(total["n"], 1), "eval_loss": total["ce"] / max(total["n"], 1)}


def main(argv=None):
    cfg = C.parse_config(Config, argv, description=__doc__)
    check_flags(cfg)
    rank, world, device = C.setup_ddp(cfg.device)
    torch.manual_seed(cfg.seed)
    student, teacher, enc, lineage, start_step, state = load_models(cfg, device)
    C.check_out(cfg.out, student)
    C.catch_interrupts(cfg.save_on_interrupt)
    last_saved = f"{cfg.resume} (step {start_step})" if cfg.resume else None
    student.grad_checkpointing = cfg.grad_checkpointing
    pad_id = C.special_id(enc, "<|pad|>")
    vocab = enc.n_vocab if student.cfg.vocab_size != teacher.cfg.vocab_size else None

    pairs = layer_pairs(cfg.hidden_layers, student, teacher)
    proj = None
    if pairs and student.cfg.d_model != teacher.cfg.d_model:
        proj = Projection(len(pairs), student.cfg.d_model, teacher.cfg.d_model).to(device)
        if state is not None:
            if "projection" not in state:
                raise M.UserError(f"{cfg.resume}: no hidden-state projection saved: resume with the run's own "
                                  "--hidden-layers")
            proj.load_state_dict(state["projection"])
    s_hidden = capture(student, [s for s, _ in pairs])
    t_hidden = capture(teacher, [t for _, t in pairs])

    examples, prompts, n_truncated = load_examples(cfg, enc, cfg.lmbda > 0 or cfg.seq_kd)
    train, held_out = sft.split(examples, cfg.eval_frac, cfg.seed)
    train_prompts = sft.split(prompts, cfg.eval_frac, cfg.seed)[0] if prompts is not None else None
    if not train:
        raise M.UserError(f"{cfg.data}: no training examples left after holding out --eval-frac")
    note = ""
    if cfg.seq_kd:
        t0 = time.perf_counter()
        train, unfinished = teacher_answers(teacher, train_prompts, cfg, enc, device, rank)
        note = (f"; --seq-kd: {len(train)} teacher answers in {time.perf_counter() - t0:.0f} s ({unfinished} cut at "
                f"--max-new-tokens), written to {cfg.out}.seqkd.jsonl")
    rows = sft.make_rows(train, cfg, pad_id)
    eval_rows = sft.make_rows(held_out, cfg, pad_id) if held_out else None
    n_rows = len(rows[0])
    if rank == 0:
        print(f"{len(train)} train / {len(held_out)} eval examples -> {n_rows} rows of {cfg.seq_len}, {n_truncated} "
              f"truncated{note}; student {student.num_params():,} params ({student.num_params(True):,} trainable), "
              f"teacher {teacher.num_params():,}; {cfg.loss}, T {cfg.temperature}, lmbda {cfg.lmbda}"
              + (f", hidden pairs {pairs}" + (" via a learned projection" if proj else "") if pairs else ""))

    model, raw, optimizer = C.wrap_for_training(student, cfg, state, world, device)
    opts, params = [optimizer], list(raw.parameters())
    if proj is not None:
        proj_model, proj, proj_opt = C.wrap_for_training(proj, cfg, state, world, device, key="projection_optimizer")
        opts, params = opts + [proj_opt], params + list(proj.parameters())

    per_step = cfg.batch_size * cfg.grad_accum * world
    mine = slice(rank * cfg.batch_size * cfg.grad_accum, (rank + 1) * cfg.batch_size * cfg.grad_accum)
    metrics = {}
    model.train()
    bar, end = C.step_range(cfg, start_step, rank, "distill")
    for step in bar:
        t0 = time.perf_counter()
        lr = C.set_lr(step, cfg, *opts)
        on_policy = on_policy_step(cfg.seed, step, cfg.lmbda)
        if on_policy:  # the student answers the step's prompts; all micro-batches first: the denominator needs them
            idx = C.step_indices(step, len(train_prompts), per_step, mine, cfg.seed)
            gen = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step * 1_009 + rank)  # resume-exact
            raw.eval()
            batches = [rollout(raw, [train_prompts[i][1] for i in idx[j:j + cfg.batch_size]], cfg, enc, device, gen)
                       for j in range(0, len(idx), cfg.batch_size)]
            raw.train()
        else:
            idx = C.step_indices(step, n_rows, per_step, mine, cfg.seed)
            batches = [dict(zip(("ids", "mask", "doc"), sft.batch_of(rows, idx[j:j + cfg.batch_size], device,
                                                                     trim=not cfg.compile)))
                       for j in range(0, len(idx), cfg.batch_size)]
        t_gen = time.perf_counter() - t0
        # the step's total number of supervised tokens, over micro-batches and ranks: every term's denominator
        n_sup = C.all_reduce_sum(sum(b["mask"][:, 1:].sum() for b in batches).to(device).float()).clamp(min=1)
        sums, t_teacher = dict(loss=0.0, kd=0.0, ce=0.0, hidden=0.0), 0.0
        for j, b in enumerate(batches):
            with contextlib.ExitStack() as stack:
                if world > 1 and j < len(batches) - 1:  # gradients are all-reduced on the last micro-batch only
                    for m in (model, proj_model) if proj is not None else (model,):
                        stack.enter_context(m.no_sync())
                t1 = time.perf_counter()
                with torch.no_grad(), C.autocast(device, cfg.dtype):
                    t_logits = forward(teacher, b, vocab)
                t_teacher += time.perf_counter() - t1
                with C.autocast(device, cfg.dtype):
                    s_logits = forward(model, b, vocab)
                target = b["mask"][:, 1:]
                labels = None if on_policy else b["ids"][:, 1:]  # a sampled step's tokens are the student's own
                loss, kd, ce = distill_loss(s_logits[:, :-1], t_logits[:, :-1], target, cfg.loss, cfg.beta,
                                            cfg.temperature, labels, 0.0 if on_policy else cfg.ce_weight, n_sup)
                hidden = torch.zeros((), device=device)
                if pairs:  # the state at t makes the prediction of t + 1: the same positions as the logits
                    hs = [s_hidden[s][:, :-1] for s, _ in pairs]
                    with C.autocast(device, cfg.dtype):
                        hs = proj_model(hs) if proj is not None else hs
                    hidden = hidden_state_loss(hs, [t_hidden[t][:, :-1] for _, t in pairs], target, n_sup)
                    loss = loss + cfg.hidden_weight * hidden
                (loss * world).backward()  # DDP averages gradients over ranks; * world undoes that
            for k, v in (("loss", loss), ("kd", kd), ("ce", ce), ("hidden", hidden)):
                sums[k] += v.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)

        record = {"step": step + 1, **C.reduce_sums(sums, device), "on_policy": int(on_policy), "lr": lr,
                  "grad_norm": grad_norm.item(), "tok_s": n_sup.item() / (time.perf_counter() - t0),
                  "teacher_s": t_teacher, "gen_s": t_gen if on_policy else 0.0}
        C.check_finite(record, ("loss", "grad_norm"), last_saved)
        last, stop = step + 1 == end, C.interrupted(device)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 or last:
            record.update(evaluate(raw, teacher, eval_rows, cfg, device, vocab, cfg.loss, cfg.beta, cfg.temperature))
        if rank == 0:
            bar.set_postfix(loss=f"{record['loss']:.3f}", kd=f"{record['kd']:.3f}", lr=f"{lr:.1e}")
            C.log_jsonl(cfg.log, record)
        metrics = {**metrics, **record}
        if last or stop or cfg.save_every and (step + 1) % cfg.save_every == 0:
            extra = {"projection": proj.state_dict(), "projection_optimizer": proj_opt.state_dict()} if proj else {}
            last_saved = C.save_training(cfg, raw, enc, optimizer, step + 1, metrics, lineage + ["distill"], rank,
                                         extra)
        if stop:
            raise C.Interrupted(f"saved {last_saved}; continue with --resume {cfg.out}")
    if rank == 0 and metrics:
        shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("loss", "kd", "eval_kd", "eval_loss") if k in metrics)
        print(f"saved {cfg.out}: step {metrics['step']}, {shown}")


if __name__ == "__main__":
    C.run(main)
