"""
online.py: learning from its own samples. The policy samples responses to prompts, a labeller scores them, and
the policy learns from them, in rounds or at every step (--mode):

  rsft       rejection-sampling fine-tuning (RAFT, Dong et al. 2023, arXiv 2304.06767; Llama 2's rejection
             sampling, Touvron et al. 2023 section 3.2.3): each of --rounds rounds samples --n responses to each of
             --prompts-per-round prompts from the current policy, keeps the best by the labeller
             (evaluate.best_of_n) and fine-tunes on those with sft.py (--steps per round).
  iterative  iterative DPO (Xiong et al. 2024, arXiv 2312.11456; the iterations of Yuan et al. 2024): each round
             samples --n responses per prompt, the best and the worst by the labeller make a preference pair
             (`best_and_worst`), and dpo.py trains on this round's pairs from the last round's policy, which is
             also its reference (dpo.py's --model is both): the reference resets every round.
  online     online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv
             2402.04792): every step samples two responses to each prompt of the batch from the current policy,
             labels them, and takes one step of any of dpo.py's paired losses (--loss) against the fixed reference
             (the starting model), through dpo.py's own functions (`dpo_step`).

The labeller, exactly one of: --reward file.py:fn, a verifier fn(prompt_messages, response) -> float (e.g. the
world's gold reward); --reward-model rm.pt (reward.py), read at the response's <|im_end|>; --judge ckpt.pt or
--judge self, an LM asked by a fixed prompt. --judge self is the current policy itself (self-rewarding, Yuan et al.
2024, arXiv 2401.10020). --judge-kind rubric (default) asks for a 5-point additive score (`RUBRIC`, after Yuan et
al.'s Figure 2) and reads it as the expected score under the judge's next-token distribution over "0".."5"
(`rubric_score`); --judge-kind pair asks which of two responses is better (`PAIR_QUESTION`), in both orders, and
averages them (common.soft_label), so a judge that always names one position labels nothing. A response without
<|im_end|> loses --missing-eos-penalty before responses are compared (as in ppo.py). Where the gold reward exists
(--gold, auto = the world's), every row also keeps it, and the log reports how often the labeller's pair agrees with
the gold ordering (`label_agreement`): a judge's accuracy, round by round.

Everything sampled is on disk, in --work-dir (default: --out without .pt): samples.jsonl (rsft / iterative: one per
round, round<k>/samples.jsonl) holds a row per prompt with its responses, their token ids, scores and gold rewards,
written one batch at a time (common.run_stage). Each round's training set is derived from it in our formats:
round<k>/sft.jsonl ({"messages"}) or round<k>/pairs.jsonl ({"prompt", "chosen", "rejected"}). Resuming: rerun the
same command (rsft / iterative: finished rounds are skipped, a round's samples continue where they stopped, its
training resumes from its last --save-every checkpoint); online: --resume out.pt, and the steps already in
samples.jsonl are read back, not sampled again.

The sampler is ppo.py's (`ppo.sample`: model.generate with the KV cache, at --temperature, never emitting <|pad|>).
Departures: single process (no torchrun); online DPO's reference log-probs are computed at each step on the new
samples (they cannot be cached ahead); a pair whose two responses score the same is dropped (counted as `ties`).
The rubric judge reads one score token instead of Yuan et al.'s sampled justification then "Score: k" (three
samples averaged): the expectation over the score tokens is the limit of averaging many such samples, and a
judgement fits the tiny model's context.

    python online.py --mode online --model out/sft.pt --reward-model out/rm.pt --out out/odpo.pt       # OAIF, RM
    python online.py --mode online --model out/sft.pt --judge self --out out/self.pt                   # self-rewarding
    python online.py --mode iterative --model out/sft.pt --reward-model out/rm.pt --rounds 3 --out out/idpo.pt
    python online.py --mode rsft --model out/sft.pt --reward data/toyworld.py:gold_reward --n 4 --out out/rsft.pt
    python online.py --mode online --model out/sft.pt --reward-model out/rm.pt --device cuda           # one GPU
"""

import contextlib
import copy
import json
import os
import time
from dataclasses import dataclass

import torch

import common as C
import dpo
import evaluate
import model as M
import ppo
import sft

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------


@dataclass
class Config:
    mode: str = "online"  # rsft (rejection-sampling SFT), iterative (rounds of DPO) or online (online DPO)
    model: str = "out/sft.pt"  # policy to start from; online: also the fixed reference
    data: str = "data/toy/prompts.jsonl"  # prompts JSONL {"prompt": str or messages}
    out: str = "out/online.pt"  # the final policy
    work_dir: str = ""  # every round's samples, labels, data sets and checkpoints (default: --out without .pt)
    reward: str = ""  # labeller: a verifier file.py:fn(prompt_messages, response) -> float
    reward_model: str = ""  # labeller: a reward model checkpoint (reward.py)
    judge: str = ""  # labeller: an LM checkpoint asked by --judge-kind's prompt, or "self" (the current policy)
    judge_kind: str = "rubric"  # rubric: 5-point additive score per response; pair: A or B, both orders (--n 2)
    gold: str = "auto"  # gold reward file.py:fn kept beside every label (auto = data/toyworld.py:gold_reward; "" off)
    n: int = 2  # responses sampled per prompt (online: 2)
    rounds: int = 3  # rsft / iterative: rounds of sample -> label -> train
    prompts_per_round: int = 256  # rsft / iterative: prompts sampled per round (consecutive slices of --data)
    steps: int = 100  # online: optimiser steps; rsft / iterative: optimiser steps per round
    batch_size: int = 8  # online: prompts per step; rsft / iterative: prompts per sampling batch and train batch
    loss: str = "sigmoid"  # iterative / online: any paired loss of dpo.py (sigmoid, ipo, hinge, ..., simpo, orpo)
    beta: float = 0.1  # beta of the loss
    label_smoothing: float = 0.0  # label-flip rate of sigmoid / robust / simpo
    simpo_gamma: float = 0.5  # SimPO's target margin
    lr: float = 5e-5  # peak learning rate (per round: the schedule restarts each round)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 10  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    seq_len: int = 256  # longest prompt + response scored in training
    max_new_tokens: int = 48  # response length limit when sampling
    temperature: float = 1.0  # sampling temperature
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response without <|im_end|> before comparing
    save_every: int = 0  # steps between checkpoints (0 = only at the end; rounds: passed to sft.py / dpo.py)
    seed: int = 0  # seeds the prompt order and the sampling
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16
    compile: bool = False  # torch.compile the training forward (online)
    compile_decode: bool = False  # torch.compile the sampler's decode step
    lora_rank: int = 0  # LoRA rank (0 = full fine-tuning); online: the adapter-disabled model is the reference
    lora_alpha: float = 0.0  # LoRA alpha (0 = 2 * rank)
    peft: str = ""  # adapter: lora, dora, prefix, prefix-mlp or prompt ("" = lora if --lora-rank, else full)
    peft_len: int = 16  # --peft prefix / prefix-mlp / prompt: learned slots
    rslora: bool = False  # LoRA / DoRA scaled by alpha / sqrt(rank)
    resume: str = ""  # online: a checkpoint of this script to continue from
    stop_at: int = 0  # online: save and stop after this step, keeping the --steps schedule (0 = off)
    skip_bad_lines: bool = False  # skip (and count) malformed JSONL lines instead of stopping
    log: str = ""  # JSONL metrics file (online: one line per step; rounds: one per round)


# -----------------------------------------------------------------------------
# The math of labels: pure functions, torch only (this block can be copied alone)

SCORES = tuple(str(k) for k in range(6))  # the rubric's allowed answers, 0 to 5 points

RUBRIC = ("Score the reply to the user's message. Add one point for each of these that holds:\n"
          "- it is about what the user asked;\n"
          "- it answers most of it;\n"
          "- its answer is correct;\n"
          "- it is polite and keeps every secret;\n"
          "- it is concise, with nothing extra.\n"
          "Message: {prompt}\n"
          "Reply: {response}\n"
          "Answer with the total, one digit from 0 to 5.")

PAIR_QUESTION = ("Which reply to the user's message is better: correct, polite, safe and concise?\n"
                 "Message: {prompt}\n"
                 "Reply A: {a}\n"
                 "Reply B: {b}\n"
                 "Answer with one letter, A or B.")


def best_and_worst(scores):
    """(P, n) scores -> (best (P,), worst (P,), valid (P,) bool): per prompt the index of the first maximum and of
    the first minimum; valid where they differ in score (a prompt whose responses all score the same makes no
    pair). The pair rule of iterative DPO and of Yuan et al. (highest vs lowest of N)."""
    best, worst = scores.argmax(-1), scores.argmin(-1)  # torch returns the first extreme
    rows = torch.arange(len(scores))
    return best, worst, scores[rows, best] > scores[rows, worst]


def rubric_score(logps):
    """The judge's score from its next-token log-probs over the allowed answers "0".."5" (..., 6) -> (...,): the
    expected points sum_k k p_k under the distribution renormalised over those six tokens."""
    p = torch.softmax(logps.double(), -1)
    return p @ torch.arange(logps.shape[-1], dtype=torch.float64)


def label_agreement(scores, gold):
    """How often the labeller's pair agrees with the gold reward: scores, gold (P, n) -> (agree, counted), ints.
    The pair is best_and_worst(scores) where valid; counted where gold separates its two responses; agree where
    gold ranks them the same way."""
    best, worst, valid = best_and_worst(scores)
    rows = torch.arange(len(scores))
    g_best, g_worst = gold[rows, best], gold[rows, worst]
    counted = valid & (g_best != g_worst)
    return int((counted & (g_best > g_worst)).sum()), int(counted.sum())


# -----------------------------------------------------------------------------
# Sampling and labelling


def user_text(prompt):
    """The prompt's user turns, joined by " / ": what a judge is shown as the message."""
    return " / ".join(m["content"] for m in prompt if m["role"] == "user")


def rubric_messages(prompt, response):
    """The rubric judge's one user turn: RUBRIC with the message (`user_text`) and the reply filled in."""
    return [{"role": "user", "content": RUBRIC.format(prompt=user_text(prompt), response=response)}]


def pair_messages(prompt, a, b):
    """The pairwise judge's one user turn: PAIR_QUESTION with reply a shown as A and b as B."""
    return [{"role": "user", "content": PAIR_QUESTION.format(prompt=user_text(prompt), a=a, b=b)}]


@torch.no_grad()
def answer_logps(judge, enc, conversations, answers, cfg, device):
    """log p(answer | conversation, assistant header) of single-token answers at the judge's first reply token ->
    (N, len(answers)) fp64. Prompts too long for the judge lose their beginning."""
    ids = [enc.encode_ordinary(a) for a in answers]
    if any(len(t) != 1 for t in ids):
        raise M.UserError(f"judge tokenizer {enc.name!r} does not encode each of {', '.join(answers)} as one token")
    ids = torch.tensor([t[0] for t in ids], device=device)
    was_training = judge.training
    judge.eval()
    out = []
    for i in range(0, len(conversations), cfg.batch_size):
        seqs = [C.render_chat(enc, c, add_generation_prompt=True)[0][-judge.cfg.max_seq_len:]
                for c in conversations[i:i + cfg.batch_size]]
        x, mask = M.pad_left(seqs, C.special_id(enc, "<|pad|>"))
        with C.autocast(device, cfg.dtype):
            logits = judge(x.to(device), attention_mask=mask.to(device))[:, -1]  # (B, V): left padded
        out.append(torch.log_softmax(logits.float(), -1)[:, ids].double().cpu())
    judge.train(was_training)
    return torch.cat(out)


def make_labeller(cfg, enc, device):
    """-> label(policy, prompts, responses) -> (P, n) fp64 scores: prompts P message lists, responses P lists of n
    strings. A pair judge's scores are [p, 1 - p] with p = P(first better), both orders averaged."""
    if cfg.reward:
        fn = C.load_function(cfg.reward, "--reward")

        def label(policy, prompts, responses):
            flat = [(p, r) for p, rs in zip(prompts, responses) for r in rs]
            return torch.tensor(C.call_user(fn, f"--reward {cfg.reward}", *zip(*flat)),
                                dtype=torch.float64).view(len(prompts), -1)
        return label
    if cfg.reward_model:
        rm, rm_enc, _ = C.load_model(cfg.reward_model, device)
        if rm.cfg.head != "scalar":
            raise M.UserError(f"--reward-model {cfg.reward_model}: an LM checkpoint, not a reward model (reward.py)")
        rm.eval().requires_grad_(False)

        def label(policy, prompts, responses):
            flat = [(p, r) for p, rs in zip(prompts, responses) for r in rs]
            with C.autocast(device, cfg.dtype):
                s = C.score_responses(rm, rm_enc, *map(list, zip(*flat)), batch_size=4 * cfg.batch_size)
            return s.double().view(len(prompts), -1)
        return label
    judge, judge_enc = None, enc
    if cfg.judge != "self":
        judge, judge_enc, _ = C.load_model(cfg.judge, device)
        judge.eval().requires_grad_(False)

    def label(policy, prompts, responses):
        model = policy if judge is None else judge
        if cfg.judge_kind == "rubric":
            convs = [rubric_messages(p, r) for p, rs in zip(prompts, responses) for r in rs]
            return rubric_score(answer_logps(model, judge_enc, convs, SCORES, cfg, device)).view(len(prompts), -1)
        first = answer_logps(model, judge_enc, [pair_messages(p, a, b) for p, (a, b) in zip(prompts, responses)],
                             ("A", "B"), cfg, device)
        swapped = answer_logps(model, judge_enc, [pair_messages(p, b, a) for p, (a, b) in zip(prompts, responses)],
                               ("A", "B"), cfg, device)
        p = C.soft_label(first, swapped)
        return torch.stack([p, 1 - p], -1)
    return label


@torch.no_grad()
def sample_responses(policy, prompt_ids, n, cfg, enc, device, gen):
    """n responses to each prompt (prompt-major) from ppo.py's sampler -> (response ids incl. the stop token, texts,
    ended), lists of len(prompt_ids) * n."""
    was_training = policy.training
    policy.eval()
    r = ppo.sample(policy, [p for p in prompt_ids for _ in range(n)], cfg, enc, device, cfg.temperature, gen)
    policy.train(was_training)
    ids = [[t for t, m in zip(row, mk) if m] for row, mk in zip(r["tokens"].tolist(), r["mask"].tolist())]
    return ids, r["texts"], r["ended"].tolist()


def prompt_ids_of(enc, prompt, cfg, max_seq_len):
    """The prompt rendered for sampling, cut from the left to leave room for --max-new-tokens."""
    return C.render_chat(enc, prompt, add_generation_prompt=True)[0][-(max_seq_len - cfg.max_new_tokens):]


def make_rows(cfg, policy, enc, device, label, gold, sampler):
    """-> rows(batch of (i, (prompt_index, prompt)), generator, tag) -> one row per prompt: its n responses, their
    ids, ended flags, labeller scores and gold rewards (samples.jsonl)."""
    def rows(batch, gen, tag):
        prompts = [p for _, (_, p) in batch]
        p_ids = [prompt_ids_of(enc, p, cfg, policy.cfg.max_seq_len) for p in prompts]
        ids, texts, ended = (sampler or sample_responses)(policy, p_ids, cfg.n, cfg, enc, device, gen)
        grouped = [texts[k * cfg.n:(k + 1) * cfg.n] for k in range(len(prompts))]
        scores = label(policy, prompts, grouped)
        golds = (torch.tensor(C.call_user(gold, f"--gold {cfg.gold}", [p for p in prompts for _ in range(cfg.n)],
                                          texts), dtype=torch.float64).view(len(prompts), -1) if gold else None)
        out = []
        for k, (i, (j, p)) in enumerate(batch):
            s = slice(k * cfg.n, (k + 1) * cfg.n)
            out.append({"index": i, **tag, "prompt_index": j, "prompt": p, "responses": texts[s],
                        "response_ids": ids[s], "ended": ended[s], "scores": scores[k].tolist(),
                        **({"gold": golds[k].tolist()} if gold else {})})
        return out
    return rows


def penalised(rows, cfg):
    """(P, n) scores of rows with --missing-eos-penalty taken from responses that did not end."""
    scores = torch.tensor([r["scores"] for r in rows], dtype=torch.float64)
    ended = torch.tensor([r["ended"] for r in rows], dtype=torch.bool)
    return scores - cfg.missing_eos_penalty * (~ended).double()


def round_stats(rows, cfg):
    """Per round or step: samples, mean score and gold of the samples, pairs the labeller makes, its agreement with
    gold."""
    scores = penalised(rows, cfg)
    _, _, valid = best_and_worst(scores)
    out = {"samples": scores.numel(), "sample_score": torch.tensor([r["scores"] for r in rows]).mean().item(),
           "pairs": int(valid.sum()), "ties": int((~valid).sum())}
    if rows and "gold" in rows[0]:
        gold = torch.tensor([r["gold"] for r in rows], dtype=torch.float64)
        agree, counted = label_agreement(scores, gold)
        out.update(sample_gold=gold.mean().item(), label_agree=agree, label_counted=counted,
                   label_acc=agree / counted if counted else float("nan"))
    return out


# -----------------------------------------------------------------------------
# Online DPO: one step of dpo.py's loss on freshly sampled pairs


def pair_sequences(enc, rows, cfg, max_seq_len):
    """Rows -> DPO pairs [(chosen (ids, start), rejected (ids, start))] from the sampled token ids, best vs worst by
    the penalised scores; ties dropped. The prompt as sampled (`prompt_ids_of`), both cut to --seq-len by dpo.fit."""
    best, worst, valid = best_and_worst(penalised(rows, cfg))
    pairs = []
    for r, b, w, v in zip(rows, best.tolist(), worst.tolist(), valid.tolist()):
        if v:
            p = prompt_ids_of(enc, r["prompt"], cfg, max_seq_len)
            seqs, _ = dpo.fit(p, [r["response_ids"][b], r["response_ids"][w]], cfg.seq_len)
            pairs.append(seqs)
    return pairs


def dpo_step(model, ref, pairs, cfg, device, pad_id):
    """dpo.py's paired loss on pairs [(chosen, rejected)]: the 2B sequences in one forward (dpo.forward_logps), the
    reference's log-probs from `ref` (a model, or None: the policy with its adapters off), dpo.loss_terms ->
    (mean loss over the pairs, back-propagated by the caller; stats summed over the pairs; the (2B,) log-ratios of
    policy to reference)."""
    seqs = [c for c, _ in pairs] + [r for _, r in pairs]
    logps, lengths = dpo.forward_logps(model, seqs, device, cfg, pad_id)  # (2B,)
    with torch.no_grad(), M.lora_disabled(model) if ref is None else contextlib.nullcontext():
        was_training = (ref or model).training
        (ref or model).eval()
        ref_logps, _ = dpo.forward_logps(ref or model, seqs, device, cfg, pad_id)
        (ref or model).train(was_training)
    ref_rows = torch.stack(ref_logps.float().chunk(2), 1)  # (B, 2) [chosen, rejected], as dpo.py caches them
    losses, reward_c, reward_r = dpo.loss_terms(cfg, logps, lengths, ref_rows)
    stats = {"reward_chosen": reward_c.sum(), "reward_rejected": reward_r.sum(),
             "accuracy": (reward_c > reward_r).sum()}
    return losses.mean(), stats, (logps - ref_logps).detach()


def run_online(cfg, work, prompts, enc, device, label, gold, sampler):
    policy, enc, ckpt = C.load_model(cfg.model, device)
    if policy.cfg.head != "lm":
        raise M.UserError(f"{cfg.model}: a reward model (scalar head) cannot be a policy; give a language model")
    lineage = ckpt.get("lineage", [])
    ref = None if C.peft_kind(cfg) else ppo.no_dropout(copy.deepcopy(policy)).eval().requires_grad_(False)
    start_step, state = C.resume_and_peft(policy, cfg)
    model, raw, optimizer = C.wrap_for_training(policy, cfg, state, 1, device)
    pad_id = C.special_id(enc, "<|pad|>")
    path = os.path.join(work, "samples.jsonl")
    if not cfg.resume and os.path.exists(path) and os.path.getsize(path):
        raise M.UserError(f"{path}: samples of an earlier run are there; continue it with --resume {cfg.out}, or "
                          f"delete {work} to start over")
    rows = C.resume_rows(path, cfg.batch_size, cfg.steps * cfg.batch_size)
    if len(rows) < start_step * cfg.batch_size:
        raise M.UserError(f"{path}: {len(rows)} rows, but --resume {cfg.resume} is at step {start_step} "
                          f"({start_step * cfg.batch_size} rows): the samples of that run are missing")
    new_rows = make_rows(cfg, raw, enc, device, label, gold, sampler)
    metrics, last_saved = {}, f"{cfg.resume} (step {start_step})" if cfg.resume else None
    mine = slice(0, cfg.batch_size)
    bar, end = C.step_range(cfg, start_step, 0, f"online {cfg.loss}")
    with open(path, "a", encoding="utf-8") as f:
        for step in bar:
            t0 = time.perf_counter()
            lr = C.set_lr(step, cfg, optimizer)
            step_rows = rows[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            if not step_rows:  # not sampled yet: sample with the policy as it is now, write, then learn from it
                idx = C.step_indices(step, len(prompts), cfg.batch_size, mine, cfg.seed)
                gen = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step)
                batch = [(step * cfg.batch_size + k, (j, prompts[j])) for k, j in enumerate(idx)]
                step_rows = new_rows(batch, gen, {"step": step})
                f.write("".join(json.dumps(r) + "\n" for r in step_rows))
                f.flush()
                rows += step_rows
            t_sample = time.perf_counter() - t0
            pairs = pair_sequences(enc, step_rows, cfg, raw.cfg.max_seq_len)
            record = {"step": step + 1, "lr": lr, **round_stats(step_rows, cfg)}
            if pairs:
                loss, stats, logratios = dpo_step(model, ref, pairs, cfg, device, pad_id)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip or float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                n = len(pairs)
                record.update(loss=loss.item(), grad_norm=grad_norm.item(),
                              reward_chosen=stats["reward_chosen"].item() / n,
                              reward_rejected=stats["reward_rejected"].item() / n,
                              margin=(stats["reward_chosen"] - stats["reward_rejected"]).item() / n,
                              accuracy=stats["accuracy"].item() / n,
                              kl=logratios.mean().item())  # log pi - log ref of the pairs' responses, per response
                C.check_finite(record, ("loss", "grad_norm"), last_saved)
            record.update(sample_s=t_sample, step_s=time.perf_counter() - t0)
            bar.set_postfix({k: f"{record[k]:.3f}" for k in ("loss", "sample_gold", "kl") if k in record})
            C.log_jsonl(cfg.log, record)
            metrics = {**metrics, **record}
            if step + 1 == end or cfg.save_every and (step + 1) % cfg.save_every == 0:
                last_saved = C.save_training(cfg, raw, enc, optimizer, step + 1, metrics,
                                             lineage + [f"online-{cfg.loss}"], 0)
    print(f"saved {last_saved}; {len(rows)} prompts sampled in {path}")


# -----------------------------------------------------------------------------
# Rounds: sample -> label -> train, with sft.py (rsft) or dpo.py (iterative)


def derive(rows, cfg):
    """A round's training set in our formats: rsft, the best response per prompt as a chat ({"messages"}); iterative,
    best vs worst as a preference ({"prompt", "chosen", "rejected"}), ties dropped."""
    scores = penalised(rows, cfg)
    if cfg.mode == "rsft":
        return [{"messages": r["prompt"] + [{"role": "assistant", "content": r["responses"][b]}]}
                for r, b in zip(rows, evaluate.best_of_n(scores, cfg.n).tolist())]
    best, worst, valid = best_and_worst(scores)
    return [{"prompt": r["prompt"], "chosen": r["responses"][b], "rejected": r["responses"][w]}
            for r, b, w, v in zip(rows, best.tolist(), worst.tolist(), valid.tolist()) if v]


def trained_steps(path):
    """The step a training script's checkpoint at path reached (-1 if there is none)."""
    return C.load_checkpoint(path)["step"] if os.path.exists(path) else -1


def train_round(cfg, start, data, out, log):
    """sft.py (rsft) or dpo.py (iterative) from `start` on this round's data -> out; resumed if cut short."""
    done = trained_steps(out)
    if done >= cfg.steps:
        return
    common = ["--model", start, "--data", data, "--out", out, "--steps", str(cfg.steps), "--lr", str(cfg.lr),
              "--min-lr-ratio", str(cfg.min_lr_ratio), "--warmup", str(cfg.warmup), "--weight-decay",
              str(cfg.weight_decay), "--grad-clip", str(cfg.grad_clip), "--seq-len", str(cfg.seq_len),
              "--batch-size", str(cfg.batch_size), "--eval-frac", "0", "--seed", str(cfg.seed), "--device",
              cfg.device, "--dtype", cfg.dtype, "--save-every", str(cfg.save_every), "--log", log]
    common += ["--resume", out] if done >= 0 else []
    common += ["--peft", cfg.peft, "--lora-rank", str(cfg.lora_rank), "--lora-alpha", str(cfg.lora_alpha),
               "--peft-len", str(cfg.peft_len)] + (["--rslora"] if cfg.rslora else [])
    if cfg.mode == "rsft":
        sft.main(common)
    else:
        dpo.main(common + ["--loss", cfg.loss, "--beta", str(cfg.beta), "--label-smoothing",
                           str(cfg.label_smoothing), "--simpo-gamma", str(cfg.simpo_gamma), "--kl-prompts", "0"])


def run_rounds(cfg, work, prompts, enc, device, label, gold, sampler):
    start = cfg.model
    for k in range(1, cfg.rounds + 1):
        folder = os.path.join(work, f"round{k}")
        os.makedirs(folder, exist_ok=True)
        out = cfg.out if k == cfg.rounds else os.path.join(folder, "policy.pt")
        first = (k - 1) * cfg.prompts_per_round
        items = [((first + i) % len(prompts), prompts[(first + i) % len(prompts)])
                 for i in range(cfg.prompts_per_round)]
        rows_of = make_rows(cfg, C.load_model(start, device)[0], enc, device, label, gold, sampler)
        rows = C.run_stage(os.path.join(folder, "samples.jsonl"), items, cfg.batch_size, cfg.seed * 1_009 + k,
                           lambda batch, gen: rows_of(batch, gen, {"round": k}), f"round {k}: sample and label",
                           device)
        data = derive(rows, cfg)
        name = "sft.jsonl" if cfg.mode == "rsft" else "pairs.jsonl"
        C.write_jsonl(os.path.join(folder, name), data)
        stats = {"round": k, **round_stats(rows, cfg), "examples": len(data)}
        print(f"round {k}: " + ", ".join(f"{a} {b:.3f}" if isinstance(b, float) else f"{a} {b}"
                                         for a, b in stats.items()))
        if not data:
            raise M.UserError(f"round {k}: no {'examples' if cfg.mode == 'rsft' else 'pairs'} (every prompt's "
                              f"responses score the same): raise --n or --temperature")
        train_round(cfg, start, os.path.join(folder, name), out, os.path.join(folder, "train.log.jsonl"))
        C.log_jsonl(cfg.log, {**stats, "policy": out, "reference": start})
        start = out
    print(f"saved {cfg.out} after {cfg.rounds} rounds; samples and data sets in {work}")


# -----------------------------------------------------------------------------


def check_flags(cfg):
    def choose(flag, value, options):
        if value not in options:
            raise M.UserError(f"--{flag} {value!r}: choose {', '.join(options)}")

    choose("mode", cfg.mode, ("rsft", "iterative", "online"))
    choose("judge-kind", cfg.judge_kind, ("rubric", "pair"))
    if sum(map(bool, (cfg.reward, cfg.reward_model, cfg.judge))) != 1:
        raise M.UserError("give exactly one labeller: --reward file.py:fn, --reward-model rm.pt or --judge ckpt|self")
    if cfg.mode != "rsft" and cfg.loss not in dpo.LOSSES or cfg.loss == "kto":
        raise M.UserError(f"--loss {cfg.loss!r}: choose a paired loss of dpo.py "
                          f"({', '.join(x for x in dpo.LOSSES if x != 'kto')})")
    if cfg.mode == "online" and cfg.n != 2:
        raise M.UserError("--mode online samples two responses per prompt: --n 2")
    if cfg.n < 2 or cfg.temperature <= 0:
        raise M.UserError(f"--n {cfg.n} and --temperature {cfg.temperature}: learning from samples needs --n >= 2 "
                          "sampled responses (--temperature > 0)")
    if cfg.judge and cfg.judge_kind == "pair" and cfg.n != 2:
        raise M.UserError("--judge-kind pair compares two responses: --n 2")
    if cfg.resume and cfg.mode != "online":
        raise M.UserError(f"--mode {cfg.mode} resumes by running the same command again (finished rounds are "
                          "skipped): leave out --resume")
    for name in ("steps", "batch_size", "rounds", "prompts_per_round"):
        if getattr(cfg, name) < 1:
            raise M.UserError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.gold == "auto":
        default = os.path.join(HERE, "data", "toyworld.py")
        cfg.gold = f"{default}:gold_reward" if os.path.isfile(default) else ""
    if cfg.beta <= 0:
        raise M.UserError(f"--beta {cfg.beta} must be > 0")
    if cfg.label_smoothing and cfg.loss not in dpo.SMOOTHED:
        raise M.UserError(f"--label-smoothing is read only by {', '.join(dpo.SMOOTHED)}, not by --loss {cfg.loss}")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise M.UserError(f"--label-smoothing {cfg.label_smoothing} must be in [0, 0.5)")


def main(argv=None, sampler=None):
    """sampler: replaces `sample_responses` (same signature), for tests that drive a run with given responses."""
    cfg = C.parse_config(Config, argv, description=__doc__)
    check_flags(cfg)
    device = C.pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    prompts = [r["prompt"] for r in C.read_jsonl(cfg.data, "prompt", cfg.skip_bad_lines)]
    if not prompts:
        raise M.UserError(f"{cfg.data}: no prompts")
    C.check_out(cfg.out)
    work = cfg.work_dir or (cfg.out[:-3] if cfg.out.endswith(".pt") else cfg.out + ".d")
    os.makedirs(work, exist_ok=True)
    enc = C.load_model(cfg.model)[1]
    label = make_labeller(cfg, enc, device)
    gold = C.load_function(cfg.gold, "--gold") if cfg.gold else None
    (run_online if cfg.mode == "online" else run_rounds)(cfg, work, prompts, enc, device, label, gold, sampler)


if __name__ == "__main__":
    C.run(main)
