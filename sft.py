"""
sft.py: supervised fine-tuning on chats, and plain language-model training on raw text.

Two formats, one loop:
  --format chat  `{"messages": [...]}` JSONL rendered with the model's chat template; the loss is on the assistant's
                 tokens only (content and its end token, the mask from common.render_chat), multi-turn included.
                 `--template NAME` renders with another of common.CHAT_TEMPLATES instead (the checkpoint keeps
                 it); `--template plain` is the no-template ablation (common.render_plain).
  --format text  a `.txt` file (one stream) or `{"text": ...}` JSONL: every token is a target. With
                 `--init tiny` it pre-trains a fresh model from a preset; with `--model` it is continued
                 pre-training / domain adaptation.

The objective is next-token cross-entropy (Radford et al. 2018; for chats, InstructGPT's SFT stage, Ouyang et
al. 2022, with the prompt tokens masked out):
    L = - sum_{t in S} log p(x_t | x_<t) / |S|,   S = supervised tokens of every micro-batch on every rank
Normalising by |S| over the whole optimiser step (not per micro-batch, not per rank) makes k micro-batches of
B/k exactly one batch of B, and DDP exactly one process on the concatenated batch.

Speed: examples are packed into --seq-len rows with a block-diagonal causal mask and per-document positions
(common.pack), so no compute is spent on padding and no example attends to another. `--no-packing` pads each
example to its own row instead (same loss; the benchmark compares the two). AdamW, linear warmup + cosine
decay, gradient clipping, bf16 autocast on GPU, optional torch.compile, LoRA (`--lora-rank`), gradient
checkpointing.

Forgetting (continued pre-training on a domain costs general ability, McCloskey & Cohen 1989; Luo et al. 2023 for
LLM fine-tuning): `--replay FILE:FRACTION` puts rows of general raw text beside each micro-batch, ~FRACTION of the
step's rows. `--replay-loss lm` trains them as data (replay, as in Scialom et al. 2022's rehearsal); `--replay-loss
kl` instead adds --kl-coef x KL(p_start || p) per token of them, the starting model's distribution held on general
text (with an adapter, the start is the network with it off: no second copy). Fewer trainable parameters (--peft)
are the third mitigation.

Truncation: an example longer than --seq-len keeps its first --seq-len tokens (counted and reported);
raw text is cut into --seq-len windows. Departure from TRL: the "\\n" after each `<|im_end|>` is template, never
supervised (TRL's assistant-only mask comes from the chat template's generation markers, which may include it).

    python sft.py --format text --init tiny --data data/toy/pretrain.txt --out out/base.pt       # CPU
    python sft.py --model out/base.pt --data data/toy/sft.jsonl --out out/sft.pt                 # CPU
    python sft.py --model out/base.pt --data data/toy/sft.jsonl --out out/sft.pt --device cuda   # one GPU, bf16
    torchrun --nproc_per_node=2 sft.py --model out/base.pt --data data/toy/sft.jsonl --out out/sft.pt  # DDP
    torchrun --nproc_per_node=2 sft.py -- --log out/sft.log.jsonl ...   # `--` first, or torchrun reads --log as its own
    torchrun --nproc_per_node=2 sft.py --fsdp --model out/base.pt --data data/toy/sft.jsonl --out out/sft.pt  # FSDP2
    python sft.py --resume out/sft.pt --steps 600 ...                                            # continue
"""

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import common as C
import model as M

# -----------------------------------------------------------------------------


@dataclass
class Config:
    model: str = ""  # checkpoint to start from (ckpt.pt, .safetensors or HF directory); empty with --init
    init: str = ""  # preset for a fresh model instead of --model: tiny, small, ...; resized: tiny:d_model=64,d_ff=192
    tokenizer: str = "byte"  # tokenizer of a fresh --init model: byte, gpt2 or a .tiktoken path
    data: str = "data/toy/sft.jsonl"  # training data: chats JSONL, or .txt / {"text"} JSONL with --format text
    format: str = "chat"  # chat (assistant-only loss) or text (every token)
    template: str = "auto"  # auto (the model's own chat template), plain (ablation), or chatml/smollm2/qwen2.5/llama3
    out: str = "out/sft.pt"  # output checkpoint
    steps: int = 400  # optimiser steps
    batch_size: int = 16  # rows per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-3  # peak learning rate (use ~1e-4 for full fine-tuning of real models)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 20  # linear warmup steps
    weight_decay: float = 0.1  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    seq_len: int = 256  # tokens per row
    packing: bool = True  # pack examples into rows (else one padded example per row)
    eval_frac: float = 0.05  # fraction of examples held out for the eval loss
    eval_every: int = 100  # steps between eval losses (0 = only at the end)
    save_every: int = 0  # steps between checkpoints (0 = only at the end)
    seed: int = 0  # seeds the data order, the split and the init
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # recompute activations in backward to save memory
    offload_activations: bool = False  # keep the tensors saved for backward in CPU memory (parallel.py)
    fsdp: bool = False  # FSDP2 under torchrun: shard weights, gradients and AdamW state over ranks (parallel.py)
    lora_rank: int = 0  # LoRA rank (0 = full fine-tuning)
    lora_alpha: float = 0.0  # LoRA alpha (0 = 2 * rank)
    lora_dropout: float = 0.0  # dropout on the LoRA branch
    peft: str = ""  # adapter: lora, dora, prefix, prefix-mlp or prompt ("" = lora if --lora-rank, else full)
    peft_len: int = 16  # --peft prefix / prefix-mlp / prompt: learned slots (keys and values, or embeddings)
    rslora: bool = False  # LoRA / DoRA scaled by alpha / sqrt(rank) (rsLoRA) instead of alpha / rank
    replay: str = ""  # FILE:FRACTION: general raw text mixed in at that share of each step's rows (against forgetting)
    replay_loss: str = "lm"  # what the --replay rows train: lm (their next-token loss) or kl (KL(start || model))
    kl_coef: float = 1.0  # --replay-loss kl: weight of the per-token KL to the starting model on the replay rows
    resume: str = ""  # checkpoint written by this script to continue from (model, optimiser, RNG, data position)
    stop_at: int = 0  # save and stop after this step, keeping the --steps schedule (time-sliced jobs); 0 = off
    save_on_interrupt: bool = False  # Ctrl-C / SIGTERM: save a resumable checkpoint at the end of the step, then stop
    skip_bad_lines: bool = False  # skip (and count) malformed JSONL lines instead of stopping
    log: str = ""  # JSONL metrics file (one line per step)


# -----------------------------------------------------------------------------
# The loss: a pure function of tensors, torch and math only (this block can be copied alone)

IGNORE = -100  # the target id F.cross_entropy skips


def lm_loss_sum(logits, ids, mask):
    """Summed next-token NLL over supervised tokens and their count.

    logits (B, T, V), ids (B, T), mask (B, T) aligned with ids (1 = ids[t] is a target) -> (sum, count)."""
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)  # (B, T-1)
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                          ignore_index=IGNORE, reduction="sum")
    return nll, (targets != IGNORE).sum()


# -----------------------------------------------------------------------------
# Data


def tokenize(cfg, enc):
    """Examples as (ids, mask) lists, and how many were truncated. A chat left with no supervised token in its
    first seq_len (its assistant turns all beyond it, or weight 0) is dropped: it would train on nothing."""
    if cfg.format == "text":
        eot = C.special_id(enc, "<|endoftext|>")
        stream = []
        for doc in C.read_text(cfg.data):
            stream += enc.encode_ordinary(doc) + [eot]
        windows = [stream[i:i + cfg.seq_len] for i in range(0, len(stream), cfg.seq_len)]
        return [(w, [1] * len(w)) for w in windows if len(w) > 1], 0
    render = C.render_plain if cfg.template == "plain" else C.render_chat
    examples, truncated = [], 0
    for rec in C.read_jsonl(cfg.data, "chat", cfg.skip_bad_lines):
        ids, mask = render(enc, rec["messages"])
        truncated += len(ids) > cfg.seq_len
        if any(mask[:cfg.seq_len]):
            examples.append((ids[:cfg.seq_len], mask[:cfg.seq_len]))
    if not examples:
        raise M.UserError(f"{cfg.data}: no chat has an assistant token within --seq-len {cfg.seq_len}")
    return examples, truncated


def make_rows(examples, cfg, pad_id):
    """(ids, mask, doc_ids) rows of seq_len: packed, or one right-padded example per row (doc_ids None)."""
    if cfg.packing:
        return C.pack(examples, cfg.seq_len, pad_id)
    ids = C.pad_right([e[0] for e in examples], pad_id, cfg.seq_len)
    mask = C.pad_right([e[1] for e in examples], 0, cfg.seq_len)
    return ids, mask, None


def split(examples, frac, seed):
    """Hold out a deterministic fraction of examples for the eval loss."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = int(len(examples) * frac) if frac > 0 else 0
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def batch_of(rows, b, device, trim=True):
    """Rows b of (ids, mask, doc_ids) on the device. With `trim`, columns after the batch's last supervised token
    are dropped: attention is causal, so they change no loss term, and a padded batch costs its longest example,
    not seq_len (--compile keeps the fixed width instead, to avoid recompiling per shape)."""
    ids, mask, doc = rows
    ids, mask, doc = ids[b], mask[b], doc[b] if doc is not None else None
    if trim and mask.any():
        width = int(mask.any(0).nonzero().max()) + 1
        ids, mask, doc = ids[:, :width], mask[:, :width], doc[:, :width] if doc is not None else None
    return ids.to(device), mask.to(device), doc.to(device) if doc is not None else None


@torch.no_grad()
def eval_loss(model, rows, cfg, device):
    if rows is None:
        return float("nan")
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for i in range(0, len(rows[0]), cfg.batch_size):
        ids, mask, doc = batch_of(rows, slice(i, i + cfg.batch_size), device, trim=not cfg.compile)
        with C.autocast(device, cfg.dtype):
            logits = model(ids, doc_ids=doc)
        s, n = lm_loss_sum(logits, ids, mask)
        total += s
        count += n
    C.all_reduce_sum(total), C.all_reduce_sum(count)
    model.train()
    return (total / count.clamp(min=1)).item()


# -----------------------------------------------------------------------------


def chat_template(cfg):
    """--template as a common.CHAT_TEMPLATES name, None for the model's own."""
    return None if cfg.template in ("auto", "plain") else cfg.template


def load_start(cfg, device):
    """The model to train (and its tokenizer, lineage, start step, saved train state)."""
    if bool(cfg.model) == bool(cfg.init):
        raise M.UserError("give exactly one of --model (a checkpoint) or --init (a preset for a fresh model); "
                          "--resume goes with the same flags as the run it continues")
    if cfg.init:
        if cfg.format != "text":
            raise M.UserError("--init trains a fresh model: use it with --format text (pre-training)")
        torch.manual_seed(cfg.seed)
        enc = C.get_tokenizer(cfg.tokenizer, chat_template(cfg))
        preset, sizes = C.parse_init(cfg.init)
        max_seq_len = max(cfg.seq_len, M.PRESETS.get(preset, {}).get("max_seq_len", 0))
        model, lineage = M.build_model(preset, enc, **{"max_seq_len": max_seq_len, **sizes}), [f"init:{cfg.init}"]
    else:
        model, enc, ckpt = C.load_model(cfg.model)
        lineage = ckpt.get("lineage", [])
        if chat_template(cfg) not in (None, enc.chat_template):  # the model's own template, overridden
            enc = C.get_tokenizer(enc.name, chat_template(cfg))
            if enc.n_vocab > model.cfg.vocab_size:
                raise M.UserError(f"--template {cfg.template} needs {enc.n_vocab} token ids, {cfg.model} has "
                                  f"{model.cfg.vocab_size}: pre-train with --init ... --template {cfg.template}")
    if cfg.seq_len > model.cfg.max_seq_len:
        raise M.UserError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    step, state = C.resume_and_peft(model, cfg)
    return model.to(device), enc, lineage, step, state


def replay_rows(cfg, enc, pad_id):
    """--replay FILE:FRACTION -> (its packed raw-text rows, replay rows per micro-batch): round(B f / (1 - f)), at
    least 1, beside the B data rows, so the replay share of a step is ~f."""
    path, _, frac = cfg.replay.rpartition(":")
    try:
        frac = float(frac)
    except ValueError:
        frac = -1.0
    if not path or not 0 < frac < 1 or cfg.replay_loss not in ("lm", "kl"):
        raise M.UserError(f"--replay {cfg.replay} --replay-loss {cfg.replay_loss}: expected FILE:FRACTION with "
                          "0 < FRACTION < 1, and lm or kl")
    text = dataclasses.replace(cfg, data=path, format="text", packing=True)
    return make_rows(tokenize(text, enc)[0], text, pad_id), max(1, round(cfg.batch_size * frac / (1 - frac)))


def main(argv=None):
    cfg = C.parse_config(Config, argv, description=__doc__)
    if cfg.format not in ("chat", "text") or cfg.template not in ("auto", "plain", *C.CHAT_TEMPLATES):
        raise M.UserError(f"--format must be chat or text, --template auto, plain or one of "
                          f"{', '.join(C.CHAT_TEMPLATES)}")
    rank, world, device = C.setup_ddp(cfg.device)
    torch.manual_seed(cfg.seed)
    model, enc, lineage, start_step, state = load_start(cfg, device)
    C.check_out(cfg.out, model)
    C.catch_interrupts(cfg.save_on_interrupt)
    last_saved = f"{cfg.resume} (step {start_step})" if cfg.resume else None
    model.grad_checkpointing = cfg.grad_checkpointing
    pad_id = C.special_id(enc, "<|pad|>")

    examples, n_truncated = tokenize(cfg, enc)
    train, held_out = split(examples, cfg.eval_frac, cfg.seed)
    if not train:
        raise M.UserError(f"{cfg.data}: no training examples left after holding out --eval-frac")
    rows = make_rows(train, cfg, pad_id)
    eval_rows = make_rows(held_out, cfg, pad_id) if held_out else None
    n_rows = len(rows[0])
    if rank == 0:
        n_tok = sum(int(m.sum()) for m in rows[1])
        print(f"{len(train)} train / {len(held_out)} eval examples -> {n_rows} rows of {cfg.seq_len} "
              f"({n_tok / rows[1].numel():.0%} supervised), {n_truncated} truncated; "
              f"{model.num_params():,} params, {model.num_params(trainable=True):,} trainable")

    replay, k = replay_rows(cfg, enc, pad_id) if cfg.replay else (None, 0)
    if cfg.replay_loss == "kl" and not cfg.replay:
        raise M.UserError("--replay-loss kl measures the KL to the start on general text: give --replay FILE:FRACTION")
    start = None  # KL-to-start's frozen starting model: with an adapter, the same network with the adapter off
    if replay is not None and cfg.replay_loss == "kl" and not C.peft_kind(cfg):
        start = copy.deepcopy(model).eval().requires_grad_(False)

    model, raw, optimizer = C.wrap_for_training(model, cfg, state, world, device)

    rows_per_step = cfg.batch_size * cfg.grad_accum * world
    mine = slice(rank * cfg.batch_size * cfg.grad_accum, (rank + 1) * cfg.batch_size * cfg.grad_accum)
    metrics = {}
    model.train()
    bar, end = C.step_range(cfg, start_step, rank, "sft")
    for step in bar:
        t0 = time.perf_counter()
        lr = C.set_lr(step, cfg, optimizer)
        idx = C.step_indices(step, n_rows, rows_per_step, mine, cfg.seed)
        micro = [idx[i:i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)]
        # the step's total number of supervised tokens, over micro-batches and ranks: the loss denominator
        n_sup = sum(rows[1][b, 1:].sum() for b in micro).to(device).float()
        if replay is not None:  # k replay rows beside each micro-batch, from their own stream
            r_idx = C.step_indices(step, len(replay[0]), k * len(micro) * world,
                                   slice(rank * k * len(micro), (rank + 1) * k * len(micro)), cfg.seed + 1)
            r_micro = [r_idx[i:i + k] for i in range(0, len(r_idx), k)]
            r_sup = sum(replay[1][b, 1:].sum() for b in r_micro).to(device).float()
            n_replay = C.all_reduce_sum(r_sup.clone()).clamp(min=1)  # all_reduce works in place
            if cfg.replay_loss == "lm":  # replay: its tokens are supervised tokens like the data's
                n_sup = n_sup + r_sup
        n_sup = C.all_reduce_sum(n_sup).clamp(min=1)
        total, total_kl = torch.zeros((), device=device), torch.zeros((), device=device)
        for j, b in enumerate(micro):
            ids, mask, doc = batch_of(rows, b, device, trim=not cfg.compile)
            sync = j == len(micro) - 1 or world == 1
            ctx = model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with ctx:
                with C.autocast(device, cfg.dtype):
                    logits = model(ids, doc_ids=doc)
                nll, _ = lm_loss_sum(logits, ids, mask)
                objective = nll / n_sup
                if replay is not None:
                    r_ids, r_mask, r_doc = batch_of(replay, r_micro[j], device, trim=not cfg.compile)
                    with C.autocast(device, cfg.dtype):
                        r_logits = model(r_ids, doc_ids=r_doc)
                    if cfg.replay_loss == "lm":
                        r_nll = lm_loss_sum(r_logits, r_ids, r_mask)[0]
                        objective, nll = objective + r_nll / n_sup, nll + r_nll
                    else:
                        with torch.no_grad(), C.autocast(device, cfg.dtype):
                            with M.lora_disabled(raw) if start is None else contextlib.nullcontext():
                                s_logits = (raw if start is None else start)(r_ids, doc_ids=r_doc)
                        kl = (M.kl_divergence(s_logits[:, :-1], r_logits[:, :-1]) * r_mask[:, 1:]).sum()
                        objective = objective + cfg.kl_coef * kl / n_replay
                        total_kl += kl.detach()
                (objective * world).backward()  # DDP averages gradients over ranks; * world undoes that
            total += nll.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        loss = (C.all_reduce_sum(total) / n_sup).item()
        tok_s = n_sup.item() / (time.perf_counter() - t0)
        record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm.item(), "tok_s": tok_s,
                  "step_s": time.perf_counter() - t0}
        if replay is not None and cfg.replay_loss == "kl":
            record["kl_start"] = (C.all_reduce_sum(total_kl) / n_replay).item()  # per replay token
        C.check_finite(record, ("loss", "grad_norm"), last_saved)
        last, stop = step + 1 == end, C.interrupted(device)
        if last:
            record["peak_rss_mb"] = C.peak_rss_mb()
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 or last:
            record["eval_loss"] = eval_loss(model, eval_rows, cfg, device)
        if rank == 0:
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:.0f}")
            C.log_jsonl(cfg.log, record)
        metrics = {**metrics, **record}
        if last or stop or cfg.save_every and (step + 1) % cfg.save_every == 0:
            stage = "pretrain" if cfg.format == "text" else "sft"
            last_saved = C.save_training(cfg, raw, enc, optimizer, step + 1, metrics, lineage + [stage], rank)
        if stop:
            raise C.Interrupted(f"saved {last_saved}; continue with --resume {cfg.out}")
    if rank == 0 and metrics:
        eval_loss_ = metrics.get("eval_loss", float("nan"))
        eval_part = "" if math.isnan(eval_loss_) else f", eval loss {eval_loss_:.4f}"
        print(f"saved {cfg.out}: step {metrics['step']}, loss {metrics['loss']:.4f}{eval_part}")


if __name__ == "__main__":
    C.run(main)
