"""
reward.py: a Bradley-Terry reward model trained on preference pairs.

The model is the project's transformer with a scalar head (`common.load_model(path, head="scalar")` turns an LM
checkpoint into one, with a fresh zero-initialised head). A (prompt, response) pair is rendered with the ChatML
template and its score is the head's output at the response's closing `<|im_end|>`: the last real token of the
sequence, never a pad (batches are right-padded and the index comes from the real-token mask).

The loss is the Bradley-Terry negative log-likelihood of the human label (Bradley & Terry 1952; InstructGPT,
Ouyang et al. 2022, Eq. 1, with K = 2 responses per prompt):
    L = - log sigmoid(r(x, y_c) - r(x, y_r) - m)
m is an optional per-pair margin (Llama 2, Touvron et al. 2023, Eq. 2: a larger margin for pairs rated "much
better"); a record may carry it as a number in a "margin" field, as TRL's RewardTrainer reads it. A
Bradley-Terry reward is only defined up to a constant; `--center-rewards-coef c` adds
    c * mean((r(x, y_c) + r(x, y_r))^2)
which pins the mean reward near zero (Eisenstein et al. 2023, "Helping or Herding?", arXiv 2312.09244, Eq. 2;
TRL's `center_rewards_coefficient`, 0.01 recommended), so rewards of different runs share a scale for PPO.

Reported: held-out preference accuracy (pairs whose label the model reproduces; ties count half) on a
held-out --eval-frac of the prompts (a prompt's pairs are all train or all held out). With `--gold
file.py:fn` also the ceiling: the accuracy of the gold reward itself on the same noisy held-out labels, which no
model can beat in expectation (the built-in world samples its labels from Bradley-Terry on the gold reward),
and how often the reward model orders held-out pairs as the gold reward does (`rm_gold_agreement`, gold ties left
out).

evaluate.py scores responses with `common.score_responses` (left padded), ppo.py its rollouts (right padded):
both read the value with `model.last_token_values`, as this file does.

Departures: truncation follows common.truncate (prompt cut from the left, response from the right), so the score
of an over-long example is read at its last kept token instead of `<|im_end|>` (counted and reported). With
--lora-rank the scalar head is trained in full beside the adapters (a fresh head has nothing to adapt). The score
is read at `<|im_end|>`; TRL's RewardTrainer, templating ChatML itself, reads it at the "\\n" after it.

    python reward.py --model out/sft.pt --data data/toy/prefs.jsonl --out out/rm.pt \\
        --gold data/toyworld.py:gold_reward                                          # CPU
    python reward.py --model out/sft.pt --out out/rm.pt --device cuda               # one GPU, bf16 autocast
    torchrun --nproc_per_node=2 reward.py --model out/sft.pt --out out/rm.pt        # DDP
    torchrun --nproc_per_node=2 reward.py --fsdp --model out/sft.pt --out out/rm.pt   # FSDP2, shards in out/rm.dcp/
    torchrun --nproc_per_node=2 reward.py -- --log out/rm.log.jsonl   # `--` first, or torchrun reads --log as its own
    python reward.py --model out/sft.pt --out out/rm.pt --resume out/rm.pt --steps 600   # continue
"""

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import common as C
import model as M

# -----------------------------------------------------------------------------


@dataclass
class Config:
    model: str = "out/sft.pt"  # LM checkpoint to start from (its LM head is replaced by a fresh scalar head)
    data: str = "data/toy/prefs.jsonl"  # preference pairs JSONL {"prompt", "chosen", "rejected", optional "margin"}
    out: str = "out/rm.pt"  # output checkpoint (head="scalar")
    steps: int = 250  # optimiser steps
    batch_size: int = 16  # pairs per micro-batch per process (each pair is two sequences in one forward)
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 10  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    center_rewards_coef: float = 0.0  # weight of mean((r_c + r_r)^2), keeps rewards centred on 0 (0 = off)
    seq_len: int = 256  # longest prompt + response in tokens (longer ones are truncated and counted)
    eval_frac: float = 0.1  # fraction of prompts held out (with all their pairs) for held-out accuracy
    eval_every: int = 50  # steps between held-out evaluations (0 = only at the end)
    gold: str = ""  # file.py:fn(prompt, response) -> float, a gold reward: report the ceiling accuracy
    save_every: int = 0  # steps between checkpoints (0 = only at the end)
    seed: int = 0  # seeds the data order and the held-out split
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # recompute activations in backward to save memory
    offload_activations: bool = False  # keep the tensors saved for backward in CPU memory (parallel.py)
    fsdp: bool = False  # FSDP2 under torchrun: shard weights, gradients and AdamW state over ranks (parallel.py)
    lora_rank: int = 0  # LoRA rank (0 = full fine-tuning); the scalar head is always trained in full
    lora_alpha: float = 0.0  # LoRA alpha (0 = 2 * rank)
    lora_dropout: float = 0.0  # dropout on the LoRA branch
    peft: str = ""  # adapter: lora, dora, prefix, prefix-mlp or prompt ("" = lora if --lora-rank, else full)
    peft_len: int = 16  # --peft prefix / prefix-mlp / prompt: learned slots (keys and values, or embeddings)
    rslora: bool = False  # LoRA / DoRA scaled by alpha / sqrt(rank) (rsLoRA) instead of alpha / rank
    resume: str = ""  # checkpoint written by this script to continue from (model, optimiser, RNG, data position)
    stop_at: int = 0  # save and stop after this step, keeping the --steps schedule (time-sliced jobs); 0 = off
    save_on_interrupt: bool = False  # Ctrl-C / SIGTERM: save a resumable checkpoint at the end of the step, then stop
    skip_bad_lines: bool = False  # skip (and count) malformed JSONL lines instead of stopping
    log: str = ""  # JSONL metrics file (one line per step)


# -----------------------------------------------------------------------------
# The loss: pure functions of tensors, torch and math only (this block can be copied alone)


def bradley_terry_loss(chosen, rejected, margin=None):
    """-log sigmoid(r_c - r_r - margin) per pair: chosen, rejected (B,) rewards, margin None, a float or (B,)
    -> (B,) losses. logsigmoid keeps it finite for any reward gap."""
    logits = chosen - rejected
    if margin is not None:
        logits = logits - margin
    return -F.logsigmoid(logits)


def center_penalty(chosen, rejected):
    """mean((r_c + r_r)^2) over the batch, a scalar: zero when every pair's rewards sum to zero."""
    return ((chosen + rejected) ** 2).mean()


def preference_accuracy(chosen, rejected):
    """(B,) scores of chosen and rejected -> (B,) 1 where chosen scores higher, 0.5 on a tie, else 0."""
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()


# -----------------------------------------------------------------------------
# Data


def tokenize_response(enc, prompt, response, seq_len):
    """prompt (message list) + response string -> (ids, truncated): ChatML up to and including the response's
    `<|im_end|>` (the token the score is read at), cut to seq_len by common.truncate."""
    prompt_ids, response_ids = C.render_response(enc, prompt, response)
    p, r, truncated = C.truncate(prompt_ids, response_ids, seq_len)
    return p + r, truncated


def load_pairs(cfg, enc):
    """-> train and held-out lists of dicts {prompt, chosen, rejected, ids_c, ids_r, margin}, number truncated."""
    records = C.read_jsonl(cfg.data, "pref", cfg.skip_bad_lines)
    has_margin = any(rec.get("margin") is not None for rec in records)  # read_jsonl checked each is finite
    train, held, truncated = [], [], 0
    for rec in records:
        ids_c, tc = tokenize_response(enc, rec["prompt"], rec["chosen"], cfg.seq_len)
        ids_r, tr = tokenize_response(enc, rec["prompt"], rec["rejected"], cfg.seq_len)
        truncated += tc + tr
        pair = {"prompt": rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"], "ids_c": ids_c,
                "ids_r": ids_r, "margin": float(rec.get("margin") or 0.0)}
        (held if C.held_out(rec["prompt"], cfg.eval_frac, cfg.seed) else train).append(pair)
    return train, held, truncated, has_margin


def collate(pairs, pad_id):
    """Pairs -> ids, mask (2B, T): the B chosen sequences then the B rejected ones, right-padded together so one
    forward scores both (right pads cannot change causal attention on the real tokens before them)."""
    seqs = [p["ids_c"] for p in pairs] + [p["ids_r"] for p in pairs]
    ids = C.pad_right(seqs, pad_id)  # (2B, T)
    mask = C.pad_right([[1] * len(s) for s in seqs], 0)  # (2B, T)
    return ids, mask


def gold_report(gold, spec, pairs, rm_chosen, rm_rejected):
    """The gold reward's accuracy on the held-out labels (the ceiling) and the reward model's agreement with the
    gold ordering on pairs the gold reward does not tie. A failing gold function is named with the held-out pair."""
    prompts = [p["prompt"] for p in pairs]
    g_c = torch.tensor(C.call_user(gold, spec, prompts, [p["chosen"] for p in pairs]), dtype=torch.float64)
    g_r = torch.tensor(C.call_user(gold, spec, prompts, [p["rejected"] for p in pairs]), dtype=torch.float64)
    untied = g_c != g_r
    agree = ((rm_chosen > rm_rejected) == (g_c > g_r))[untied].double()
    return {"gold_accuracy": preference_accuracy(g_c, g_r).mean().item(),
            "rm_gold_agreement": agree.mean().item() if untied.any() else float("nan"),
            "gold_ties": (~untied).double().mean().item()}


# -----------------------------------------------------------------------------


def pair_rewards(model, ids, mask, device, cfg):
    """One forward over the concatenated (2B, T) batch -> chosen (B,), rejected (B,) rewards in fp32."""
    with C.autocast(device, cfg.dtype):
        values = model(ids.to(device))  # (2B, T); right padding with plain causal attention
    rewards = M.last_token_values(values.float(), mask.to(device))  # (2B,)
    return rewards.chunk(2)


@torch.no_grad()
def evaluate_pairs(model, pairs, cfg, device, pad_id, rank, world):
    """Held-out loss, accuracy and margin, each rank scoring every world-th pair -> (metrics, chosen (N,), rejected
    (N,)): the scores of all pairs in their order, gathered over ranks."""
    if not pairs:
        return {}, None, None
    model.eval()
    mine = list(range(rank, len(pairs), world))
    scores = torch.zeros(2, len(pairs), device=device, dtype=torch.float64)  # chosen, rejected; others' are 0
    for i in range(0, len(mine), cfg.batch_size):
        rows = mine[i:i + cfg.batch_size]
        r_c, r_r = pair_rewards(model, *collate([pairs[k] for k in rows], pad_id), device, cfg)
        scores[:, rows] = torch.stack([r_c, r_r]).double()
    C.all_reduce_sum(scores)
    model.train()
    r_c, r_r = scores.cpu()
    margin = torch.tensor([p["margin"] for p in pairs], dtype=torch.float64)
    metrics = {"eval_loss": bradley_terry_loss(r_c, r_r, margin).mean().item(),
               "eval_accuracy": preference_accuracy(r_c, r_r).mean().item(), "eval_margin": (r_c - r_r).mean().item()}
    return metrics, r_c, r_r


def load_start(cfg, device):
    """The reward model to train, its tokenizer and lineage, the start step and the saved train state."""
    model, enc, ckpt = C.load_model(cfg.model, head="scalar")
    lineage = ckpt.get("lineage", [])
    if cfg.seq_len > model.cfg.max_seq_len:
        raise M.UserError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    step, state = C.resume_and_peft(model, cfg,
                                    train_also=("score",))  # a fresh head must be learnt in full
    return model.to(device), enc, lineage, step, state


def main(argv=None):
    cfg = C.parse_config(Config, argv, description=__doc__)
    if not 0 <= cfg.eval_frac < 1:
        raise M.UserError(f"--eval-frac {cfg.eval_frac} must be in [0, 1)")
    if cfg.center_rewards_coef < 0:
        raise M.UserError("--center-rewards-coef must be >= 0")
    gold = C.load_function(cfg.gold, "--gold") if cfg.gold else None
    rank, world, device = C.setup_ddp(cfg.device)
    torch.manual_seed(cfg.seed)
    model, enc, lineage, start_step, state = load_start(cfg, device)
    C.check_out(cfg.out, model)
    C.catch_interrupts(cfg.save_on_interrupt)
    last_saved = f"{cfg.resume} (step {start_step})" if cfg.resume else None
    model.grad_checkpointing = cfg.grad_checkpointing
    pad_id = C.special_id(enc, "<|pad|>")

    train, held, n_truncated, has_margin = load_pairs(cfg, enc)
    if not train:
        raise M.UserError(f"{cfg.data}: no training pairs left after holding out --eval-frac")
    if rank == 0:
        print(f"{len(train)} train / {len(held)} held-out pairs, {n_truncated} sequences truncated, margins "
              f"{'from the data' if has_margin else 'off'}; {model.num_params():,} params, "
              f"{model.num_params(trainable=True):,} trainable")

    model, raw, optimizer = C.wrap_for_training(model, cfg, state, world, device)

    per_rank = cfg.batch_size * cfg.grad_accum
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    metrics = {}
    model.train()
    bar, end = C.step_range(cfg, start_step, rank, "reward")
    for step in bar:
        t0 = time.perf_counter()
        lr = C.set_lr(step, cfg, optimizer)
        idx = C.step_indices(step, len(train), per_rank * world, mine, cfg.seed)
        sums = {}  # over this rank's pairs
        for j in range(cfg.grad_accum):
            batch = [train[i] for i in idx[j * cfg.batch_size:(j + 1) * cfg.batch_size]]
            sync = j == cfg.grad_accum - 1 or world == 1
            with model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext():
                r_c, r_r = pair_rewards(model, *collate(batch, pad_id), device, cfg)
                margin = torch.tensor([p["margin"] for p in batch], device=device) if has_margin else None
                losses = bradley_terry_loss(r_c, r_r, margin)
                loss = losses.sum() / per_rank  # every rank holds per_rank pairs: DDP's mean is the global mean
                if cfg.center_rewards_coef:
                    loss = loss + cfg.center_rewards_coef * center_penalty(r_c, r_r) / cfg.grad_accum
                loss.backward()
            r_c, r_r = r_c.detach(), r_r.detach()
            for k, v in (("loss", losses.detach().sum()), ("accuracy", preference_accuracy(r_c, r_r).sum()),
                         ("margin", (r_c - r_r).sum()), ("mean_reward", (r_c + r_r).sum() / 2)):
                sums[k] = sums.get(k, 0.0) + v.double()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        means = {k: v / (per_rank * world) for k, v in C.reduce_sums(sums, device).items()}
        record = {"step": step + 1, **means, "lr": lr, "grad_norm": grad_norm.item(),
                  "pairs_s": per_rank * world / (time.perf_counter() - t0)}
        C.check_finite(record, ("loss", "grad_norm"), last_saved)
        last, stop = step + 1 == end, C.interrupted(device)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 or last:
            eval_metrics, held_c, held_r = evaluate_pairs(raw, held, cfg, device, pad_id, rank, world)
            record.update(eval_metrics)
            if last and gold is not None and held:
                record.update(gold_report(gold, f"--gold {cfg.gold}", held, held_c, held_r))
        if rank == 0:
            held_acc = record.get("eval_accuracy", metrics.get("eval_accuracy", float("nan")))  # the latest
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}", eval_acc=f"{held_acc:.2f}")
            C.log_jsonl(cfg.log, record)
        metrics = {**metrics, **record}
        if last or stop or cfg.save_every and (step + 1) % cfg.save_every == 0:
            last_saved = C.save_training(cfg, raw, enc, optimizer, step + 1, metrics, lineage + ["rm"], rank)
        if stop:
            raise C.Interrupted(f"saved {last_saved}; continue with --resume {cfg.out}")
    if rank == 0 and metrics:
        parts = [f"saved {cfg.out}: step {metrics['step']}, loss {metrics['loss']:.4f}"]
        if "eval_accuracy" in metrics:
            parts.append(f"held-out accuracy {metrics['eval_accuracy']:.3f} on {len(held)} pairs")
        if "gold_accuracy" in metrics:
            parts.append(f"gold-reward ceiling {metrics['gold_accuracy']:.3f}, agreement with gold ordering "
                         f"{metrics['rm_gold_agreement']:.3f}")
        print(", ".join(parts))


if __name__ == "__main__":
    C.run(main)
