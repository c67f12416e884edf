"""
ppo.py: RLHF with PPO, and its critic-free group-relative family (GRPO, Dr. GRPO, RLOO, REINFORCE++).

One loop. Each step samples responses to a batch of prompts with the KV cache (model.generate), scores them,
turns the scores into advantages (`compute_advantages`), and takes --ppo-epochs passes of the clipped policy
gradient (Schulman et al. 2017, Eq. 7: -min(rho A, clip(rho, 1-eps, 1+eps) A), rho = pi / pi_old) over
--minibatches shuffled minibatches of that rollout (`ppo_update`). The reward: `--reward-model rm.pt` (reward.py)
read at the response's closing `<|im_end|>` over the very ids that were sampled, or `--reward file.py:fn`, a
verifier fn(prompt_messages, response) -> float; a response without `<|im_end|>` loses --missing-eos-penalty.
The KL to the frozen reference (with --lora-rank the base under lora_disabled): k1 / k2 / k3 / k3_ratio
(`kl_estimate`) in the reward or the loss (--kl-penalty), fixed or adaptive (--kl-target, `update_kl_coef`).
--advantage ppo (GAE with a critic, `gae`), grpo / dr_grpo / rloo (`group_advantages`), reinforce_pp; --ratio per
token, per sequence or GSPO's (`log_ratio`); --loss-type (`aggregate`): each docstring gives formula and paper.
--eval-data is scored greedily by the gold reward (--gold) and the proxy: over-optimisation of a learned reward
(proxy up, gold down; Gao et al. 2023) shows in the log. The sampler never emits <|pad|>, <|im_start|>,
<|endoftext|> or ids beyond the tokenizer (common.never_sampled); the trainer's log-probs ban the same ids.

TRL 1.16 on the same weights, completions and rewards: GRPOConfig()'s defaults are --advantage grpo --group-size 8
--loss-type dapo --ppo-epochs 1 --minibatches 1 --kl-coef 0 --missing-eos-penalty 0 (its beta > 0 adds
--kl-penalty loss --kl-estimator k3_ratio, its use_bias_correction_kl; importance_sampling_level="sequence" is
--ratio gspo); RLOOTrainer's are --advantage rloo --group-size 2 --ratio sequence --loss-type grpo --kl-penalty
reward --kl-estimator k1 --ppo-epochs 1 --minibatches 1 --missing-eos-penalty 0. Ours differ: auto picks the
paper's aggregation (grpo for grpo), 2 epochs x 2 minibatches per rollout.

Details that matter (Huang et al. 2024, "The N+ implementation details of RLHF with PPO" = N+; Huang et al. 2022,
"The 37 implementation details of PPO" = CleanRL #): the critic initialised from the reward model, its value for
token t read at position t-1 (N+; #13); dropout off in all four networks (N+); the KL a per-token reward with the
score at the last token (N+); logits divided by the temperature in every forward (N+); old log-probs recomputed
by the trainer (`--debug-logprobs-every N` asserts they match the sampler's); advantages whitened over the
rollout (#7), clipped value loss (#9), shuffled minibatch epochs (#6), per-network gradient clipping (#11), Adam
eps 1e-5 (#3), LR annealing (#4), approx_kl / clipfrac / explained_var (#12).

Departures: no entropy bonus (RLHF sets it to 0); the critic is trained in full, LoRA applies to the policy; no
top-k / top-p in rollouts (a truncated nucleus makes a sampled token's reference log-prob -inf); a response ends
at <|im_end|> (TRL, templating ChatML itself, also scores the "\\n" after it). Under DDP each rank samples and
normalises its own rollout (groups never straddle ranks); loss denominators and metrics are summed over ranks.
--fsdp (parallel.py) shards the policy and the critic, their gradients and AdamW state, and trains as DDP does.
The policy samples in eval mode, which holds its gathered weights, so generate's forwards need no collective and
ranks may stop at <|im_end|> after different numbers of tokens; the frozen reference and reward model stay whole
on every rank (no gradients or optimiser state to shard).

    python ppo.py --model out/sft.pt --reward data/toyworld.py:gold_reward --out out/ppo_gold.pt \\
        --eval-data data/toy/eval.jsonl,data/toy/redteam.jsonl --log out/ppo_gold.jsonl              # CPU, verifier
    python ppo.py --model out/sft.pt --reward-model out/rm.pt --out out/ppo.pt \\
        --eval-data data/toy/eval.jsonl,data/toy/redteam.jsonl --log out/ppo.jsonl                   # CPU, learned RM
    python ppo.py --model out/sft.pt --reward data/toyworld.py:gold_reward --advantage grpo --group-size 4 \\
        --batch-size 8 --out out/grpo.pt                                                              # critic-free
    torchrun --nproc_per_node=2 ppo.py --model out/sft.pt --reward-model out/rm.pt                    # DDP
    torchrun --nproc_per_node=2 ppo.py --fsdp --model out/sft.pt --reward-model out/rm.pt   # FSDP2, out/ppo.dcp/
"""

import contextlib
import copy
import os
import time
from dataclasses import dataclass

import torch

import common as C
import model as M

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------


@dataclass
class Config:
    model: str = "out/sft.pt"  # policy to start from; also the frozen KL reference
    reward_model: str = ""  # reward-model checkpoint (reward.py), scored at the response's <|im_end|>
    reward: str = ""  # or a verifier file.py:fn(prompt_messages, response) -> float, e.g. data/toyworld.py:gold_reward
    critic: str = ""  # checkpoint to initialise the critic from (default: --reward-model if given, else --model)
    data: str = "data/toy/prompts.jsonl"  # RL prompts JSONL {"prompt": str or messages, "answer": optional}
    eval_data: str = ""  # held-out prompts JSONL (comma-separated for several): greedy, scored with --gold and proxy
    eval_limit: int = 64  # evaluate on the first N prompts of each --eval-data file (0 = all)
    gold: str = "auto"  # gold reward file.py:fn for --eval-data; auto = data/toyworld.py:gold_reward if present
    out: str = "out/ppo.pt"  # output checkpoint
    advantage: str = "ppo"  # ppo (critic + GAE), grpo, dr_grpo, rloo or reinforce_pp (critic-free)
    group_size: int = 1  # responses sampled per prompt (>= 2 for grpo, dr_grpo, rloo)
    steps: int = 100  # rollout + update iterations
    batch_size: int = 16  # prompts per step per process (each sampled --group-size times)
    minibatches: int = 2  # optimiser steps per PPO epoch (the rollout split into this many minibatches)
    ppo_epochs: int = 2  # passes over each rollout
    grad_accum: int = 1  # micro-batches per minibatch
    lr: float = 1e-4  # peak learning rate, policy and critic
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 5  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # clip each network's global gradient norm (0 = off)
    max_new_tokens: int = 48  # response length limit
    temperature: float = 1.0  # sampling temperature (also divides the trainer's logits)
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response without <|im_end|>
    whiten_rewards: bool = False  # standardise the batch's scores before the KL penalty is added
    whiten_advantages: bool = True  # ppo: whiten advantages over the rollout (reinforce_pp always does)
    kl_coef: float = 0.05  # beta, the KL coefficient (initial value when --kl-target is set)
    kl_target: float = 0.0  # adaptive beta: target KL per response in nats (0 = fixed beta)
    kl_horizon: int = 10000  # adaptive beta: the controller's horizon in sequences
    kl_penalty: str = "auto"  # reward (per-token reward) or loss (loss term); auto: loss for grpo/dr_grpo
    kl_estimator: str = "auto"  # k1, k2, k3 or k3_ratio (loss only; TRL's bias-corrected KL); auto: k1 reward, k3 loss
    loss_type: str = "auto"  # grpo, bnpo, dapo or dr_grpo aggregation; auto: the variant's own
    ratio: str = "token"  # importance ratio: token (PPO), sequence (pi(y)/pi_old(y), TRL RLOO) or gspo (GSPO)
    clip_eps: float = 0.2  # policy ratio clip range
    value_clip_eps: float = 0.2  # value clip range around the rollout's values
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    eval_every: int = 20  # steps between held-out evaluations (0 = only before and after)
    save_every: int = 0  # steps between checkpoints (0 = only at the end)
    debug_logprobs_every: int = 0  # every N steps assert sampler log-probs == trainer log-probs (0 = off)
    seed: int = 0  # seeds the prompt order and the sampling
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16
    compile: bool = False  # torch.compile the training forward passes
    offload_activations: bool = False  # keep the tensors saved for backward in CPU memory (parallel.py)
    fsdp: bool = False  # FSDP2 under torchrun: shard policy and critic, their gradients and AdamW state (parallel.py)
    compile_decode: bool = False  # torch.compile the rollouts' one-token decode step (model.generate(compile=True))
    lora_rank: int = 0  # LoRA rank for the policy (0 = full fine-tuning); the reference is then the base
    lora_alpha: float = 0.0  # LoRA alpha (0 = 2 * rank)
    peft: str = ""  # adapter: lora, dora, prefix, prefix-mlp or prompt ("" = lora if --lora-rank, else full)
    peft_len: int = 16  # --peft prefix / prefix-mlp / prompt: learned slots (keys and values, or embeddings)
    rslora: bool = False  # LoRA / DoRA scaled by alpha / sqrt(rank) (rsLoRA) instead of alpha / rank
    resume: str = ""  # checkpoint written by this script to continue from (policy, critic, optimisers, beta)
    stop_at: int = 0  # save and stop after this step, keeping the --steps schedule (time-sliced jobs); 0 = off
    save_on_interrupt: bool = False  # Ctrl-C / SIGTERM: save a resumable checkpoint at the end of the step, then stop
    skip_bad_lines: bool = False  # skip (and count) malformed JSONL lines instead of stopping
    log: str = ""  # JSONL metrics file (one line per step)


# -----------------------------------------------------------------------------
# The math: pure functions, tensor in, tensor out, torch and math only (this block can be copied alone)


def kl_estimate(logp, ref_logp, kind="k1", log_rho=None):
    """Per-sample KL(pi || ref) estimators (Schulman 2020, "Approximating KL divergence") from log-probs of tokens
    drawn from pi. logp, ref_logp: same shape (e.g. (B, T)) -> same shape. With log r = ref_logp - logp:
        k1 = -log r              unbiased, can be negative
        k2 = (log r)^2 / 2       biased (its mean is not the KL)
        k3 = r - 1 - log r       unbiased and >= 0
    --kl-penalty reward adds -beta k_t to every token's reward (InstructGPT, Ouyang et al. 2022, Eq. 2; Ziegler et
    al. 2019), the default for ppo, rloo and reinforce_pp, with k1. --kl-penalty loss adds beta k_t to the per-token
    loss (GRPO, Shao et al. 2024, Eqs. 3-4), the default for grpo and dr_grpo, with k3.

    As a loss, with the sample y ~ pi held fixed and g = grad log pi(y): grad k1 = -g, whose expectation is 0;
    grad k2 = (log pi - log ref) g, whose expectation E_pi[(log pi - log ref) g] = grad KL(pi || ref); grad k3 =
    (1 - r) g, whose expectation -sum_y ref(y) grad log pi(y) = grad KL(ref || pi). So k3, unbiased as a value,
    is as a loss the gradient of the other KL. k3_ratio = rho k3 with rho = exp(log_rho) = pi / pi_old carrying
    gradient (TRL GRPOTrainer's use_bias_correction_kl, its default): on-policy rho = 1, so its value is k3's, but
    grad (rho k3) = rho (k3 + 1 - r) g = (log pi - log ref) g at rho = 1, k2's gradient: an unbiased gradient of
    KL(pi || ref). tests/test_ppo.py checks the four by exact enumeration."""
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r ** 2
    if kind in ("k3", "k3_ratio"):
        k3 = torch.expm1(log_r) - log_r  # expm1: exact near r = 1, where the policy starts
        if kind == "k3":
            return k3
        if log_rho is None:
            raise ValueError("k3_ratio needs log_rho, the log importance ratio log pi - log pi_old")
        return torch.exp(log_rho) * k3
    raise ValueError(f"unknown KL estimator {kind!r}")


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016, Eq. 16) over response tokens:
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = sum_l (gamma lam)^l delta_{t+l},  returns A_t + V_t.

    rewards, values, mask: (B, T), mask 1 on each row's first len_i tokens (right padded); values[:, t] is V of
    the state before token t; the state after the last token is terminal (value 0). -> advantages, returns (B, T),
    zero where mask is 0. returns = advantages + values, the critic's targets."""
    B, T = rewards.shape
    mask = mask.to(rewards.dtype)
    values = values * mask
    next_adv = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(next_adv)
    out = torch.zeros_like(rewards)
    for t in reversed(range(T)):  # T is the response length (tens of tokens): a loop is clear and cheap
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value = values[:, t]
        out[:, t] = next_adv
    return out, (out + values) * mask


def masked_mean_var(x, mask=None):
    """Mean and population variance of x over the entries where mask is 1 (all if None); 0-dim tensors."""
    m = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    return mean, ((x - mean) ** 2 * m).sum() / n


def whiten(x, mask=None, eps=1e-8):
    """(x - mean) / std over the entries where mask is 1 (all if None), zero where mask is 0. Any shape."""
    mean, var = masked_mean_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if mask is None else out * mask


def group_advantages(rewards, group_size, kind, eps=1e-4):
    """Sequence-level advantages from the rewards of groups of responses to the same prompt.

    rewards: (B,) with B = n_groups * group_size, each group's rows consecutive -> (B,).
      grpo          (r - mean_g) / (std_g + eps), std with Bessel's correction, eps 1e-4 (Shao et al. 2024,
                    Sec. 4.1.2; TRL, OpenRLHF group_norm)
      dr_grpo       r - mean_g (Liu et al. 2025, "Understanding R1-Zero-like training")
      rloo          r - (sum_g - r) / (k - 1), the leave-one-out mean (Kool et al. 2019; Ahmadian et al. 2024);
                    = k/(k-1) (r - mean_g)
      reinforce_pp  r - mean_g if group_size > 1 (REINFORCE++-baseline), else r unchanged (plain REINFORCE++, whose
                    baseline is the batch whitening applied later to the token returns)"""
    g = rewards.view(-1, group_size)  # (n_groups, k)
    if kind == "reinforce_pp" and group_size == 1:
        return rewards.clone()
    if kind in ("grpo", "dr_grpo", "reinforce_pp"):
        centred = g - g.mean(1, keepdim=True)
        if kind == "grpo":
            centred = centred / (g.std(1, keepdim=True) + eps)
        return centred.reshape(-1)
    if kind == "rloo":
        return (g - (g.sum(1, keepdim=True) - g) / (group_size - 1)).reshape(-1)
    raise ValueError(f"unknown group advantage {kind!r}")


def log_ratio(logp, old_logp, mask=None, level="token"):
    """log rho (B, T), the log importance ratio of the clipped surrogate, by --ratio; d_t = logp_t - old_logp_t:
      token     d_t, one ratio per token (PPO, Schulman et al. 2017; TRL GRPOTrainer's default)
      sequence  sum_t d_t: log pi(y|x) / pi_old(y|x), one ratio per response (TRL RLOOTrainer's)
      gspo      sum_t d_t / |y|: the geometric mean of the token ratios (GSPO, Zheng et al. 2025, "Group Sequence
                Policy Optimization", Eq. 7; TRL GRPOTrainer's importance_sampling_level="sequence")
    A response's value is broadcast to all its tokens (so clipping acts per sequence, and the gradient of one
    response's ratio reaches every one of its tokens); mask (B, T) marks the response tokens. For a one-token
    response all three are the same."""
    d = logp - old_logp.detach()
    if level == "token":
        return d
    m = mask.to(d.dtype)
    total = (d * m).sum(1, keepdim=True)  # (B, 1)
    if level == "gspo":
        total = total / m.sum(1, keepdim=True).clamp(min=1)
    elif level != "sequence":
        raise ValueError(f"unknown ratio level {level!r}")
    return total.expand_as(d)


def ppo_losses(logp, old_logp, advantages, clip_eps, values=None, old_values=None, returns=None,
               value_clip_eps=0.2, mask=None, level="token"):
    """Per-token PPO losses (Schulman et al. 2017, Eq. 7; value clipping as in CleanRL / TRL), unreduced.

    logp (B, T) under the current policy (with grad), old_logp (B, T) at sampling time, advantages (B, T);
    optional values (B, T) of the current critic, old_values and returns (B, T) from the rollout.
    -> pg_loss (B, T) = max(-A rho, -A clip(rho, 1-eps, 1+eps)), rho = exp(`log_ratio`(logp, old_logp, mask,
       level)), per token by default;
       value_loss (B, T) = 0.5 max((V - R)^2, (V_old + clip(V - V_old, +-eps_v) - R)^2), or None;
       clipped (B, T) bool, where the clipped term is the active one (no gradient flows there)."""
    rho = torch.exp(log_ratio(logp, old_logp, mask, level))
    unclipped = -advantages * rho
    clipped_obj = -advantages * rho.clamp(1 - clip_eps, 1 + clip_eps)
    pg_loss = torch.maximum(unclipped, clipped_obj)
    clipped = clipped_obj > unclipped
    value_loss = None
    if values is not None:
        v_clipped = old_values + (values - old_values).clamp(-value_clip_eps, value_clip_eps)
        value_loss = 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    return pg_loss, value_loss, clipped


def aggregate(x, mask, kind, max_len=None, n_seqs=None, n_tokens=None):
    """Reduce per-token losses x (B, T) over mask (B, T) to a scalar, by --loss-type (TRL GRPOTrainer's names).

    n_seqs, n_tokens: totals of the whole minibatch this micro-batch belongs to (all micro-batches and ranks;
    default: this one), so that summing the micro-batches' results gives the minibatch's loss.
      grpo     sum_i mean_t x_it / n_seqs: each sequence's token mean, then the mean over sequences (DeepSeekMath
               Eq. 3); --loss-type auto for grpo
      bnpo     mean_t x over this micro-batch, weighted B / n_seqs
      dapo     sum x / n_tokens: the mean over all tokens of the minibatch, across micro-batches and ranks (Yu et
               al. 2025's token-level loss; TRL PPOTrainer's masked mean); auto for ppo, rloo, reinforce_pp
      dr_grpo  sum x / (n_seqs * max_len), a length-independent constant (Liu et al. 2025); auto for dr_grpo"""
    mask = mask.to(x.dtype)
    n_seqs = x.shape[0] if n_seqs is None else n_seqs
    n_tokens = mask.sum() if n_tokens is None else n_tokens
    total = (x * mask).sum()
    if kind == "grpo":
        return ((x * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    if kind == "bnpo":
        return total / mask.sum().clamp(min=1) * (x.shape[0] / n_seqs)
    if kind == "dapo":
        return total / max(float(n_tokens), 1.0)
    if kind == "dr_grpo":
        return total / (n_seqs * max_len)
    raise ValueError(f"unknown loss type {kind!r}")


def update_kl_coef(coef, kl, target, n, horizon):
    """Adaptive KL controller (Ziegler et al. 2019, Sec. 2.2), n the sequences of the step:
        e = clip(kl / target - 1, -0.2, 0.2),   beta <- beta * (1 + e * n / horizon)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n / horizon)


def explained_variance(pred, target, mask):
    """1 - Var(target - pred) / Var(target) over masked entries: 1 is a perfect critic, 0 a constant one."""
    var_t = masked_mean_var(target, mask)[1]
    return (1 - masked_mean_var(target - pred, mask)[1] / var_t).item() if var_t > 0 else float("nan")


# -----------------------------------------------------------------------------
# Data, rewards and rollouts


def response_logprobs(model, seq, attn, P, temperature, with_entropy=False, banned=None):
    """The trainer's side of the sampler/trainer contract: log-probs (B, N) of the response tokens seq[:, P:]
    under filter_logits(model(seq), temperature, banned=banned), the distribution `sample` drew them from, from one
    forward over [left-padded prompt | response] with attention_mask attn (B, P + N). with_entropy: also each
    position's entropy (B, N) (no grad), else None."""
    logits = M.filter_logits(model(seq, attention_mask=attn)[:, P - 1:], temperature, banned=banned)  # (B, N+1, V)
    logp = M.token_logprobs(logits, seq[:, P - 1:], attn[:, P - 1:])[:, 1:]  # (B, N): token P+t given all before
    # it, 0 at the pads after a row stopped (a pad is banned: its log-prob is -inf, never read)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        entropy = torch.special.entr(torch.softmax(logits[:, :-1].float(), -1)).sum(-1)  # (B, N)
    return logp, entropy


def decode(enc, tokens, gen_mask, stop):
    """Sampled ids (B, N) -> response strings, without the stop token and pads, stripped (as evaluate.py)."""
    return [enc.decode([t for t, m in zip(row, mk) if m and t != stop]).strip()
            for row, mk in zip(tokens.tolist(), gen_mask.tolist())]


@torch.no_grad()
def score(seq, attn, texts, messages, rm, fn, spec, indices):
    """Scores (B,) fp32: the reward model's value at each row's last real token (its <|im_end|> when the
    response ended; the sequence is right padded after it), or the verifier fn(messages, text); `indices` are the
    prompts' positions in their data file, named when the verifier fails."""
    if rm is not None:
        return M.last_token_values(rm(seq, attention_mask=attn), attn).float()  # rm(...) is (B, T)
    return torch.tensor(C.call_user(fn, f"--reward {spec}", messages, texts, float, indices), device=seq.device)


@torch.no_grad()
def sample(model, prompt_ids, cfg, enc, device, temperature, gen=None):
    """Batched KV-cache sampling -> dict of seq, attn (B, P+N), tokens, logp, mask (B, N), P, texts, ended and
    banned, the (V,) mask of ids never sampled (common.never_sampled: <|pad|>, <|im_start|>, <|endoftext|>, ids
    beyond the tokenizer), which the trainer's log-probs exclude too."""
    stop, pad = C.end_id(enc), C.special_id(enc, "<|pad|>")
    banned_ids = C.never_sampled(enc, model.cfg.vocab_size, [stop])
    with C.autocast(device, cfg.dtype):
        tokens, logp, gen_mask = M.generate(model, prompt_ids, cfg.max_new_tokens, temperature, 0, 1.0, [stop], pad,
                                            gen, banned_ids, compile=cfg.compile_decode)
    p_ids, p_mask = M.pad_left(prompt_ids, pad)
    seq = torch.cat([p_ids.to(device), tokens], 1)  # (B, P + N)
    attn = torch.cat([p_mask.to(device), gen_mask], 1)  # (B, P + N)
    ended = ((tokens == stop) & gen_mask.bool()).any(1)
    return dict(seq=seq, attn=attn, tokens=tokens, logp=logp.float(), mask=gen_mask.float(), P=p_ids.shape[1],
                texts=decode(enc, tokens, gen_mask, stop), ended=ended,
                banned=M.ban_mask(model.cfg.vocab_size, banned_ids, device))


@torch.no_grad()
def evaluate(model, sets, rm, fn, gold, cfg, enc, device):
    """Greedy responses to held-out sets {name: (prompts, ids)} -> means over all of them of the gold reward, the
    proxy (training) reward, length and ended, and with several sets each one's gold reward (eval_gold_<name>)."""
    totals, out = {}, {}
    for name, (prompts, ids) in sets.items():
        gold_sum = 0.0
        for i in range(0, len(ids), 32):
            r = sample(model, ids[i:i + 32], cfg, enc, device, temperature=0.0)
            with C.autocast(device, cfg.dtype):
                rows = range(i, min(i + 32, len(ids)))
                s = score(r["seq"], r["attn"], r["texts"], prompts[i:i + 32], rm, fn, cfg.reward, rows)
            part = {"eval_proxy": (s - cfg.missing_eos_penalty * (~r["ended"]).float()).sum().item(),
                    "eval_len": r["mask"].sum().item(), "eval_ended": r["ended"].float().sum().item()}
            if gold:
                part["eval_gold"] = sum(C.call_user(gold, f"--gold {cfg.gold}", prompts[i:i + 32], r["texts"],
                                                    float, rows))
                gold_sum += part["eval_gold"]
            totals = {k: totals.get(k, 0.0) + v for k, v in part.items()}
        if gold and len(sets) > 1:
            out[f"eval_gold_{name}"] = gold_sum / len(ids)
    n = sum(len(ids) for _, ids in sets.values())
    return {**{k: v / n for k, v in totals.items()}, **out}


# -----------------------------------------------------------------------------


def check_flags(cfg):
    """Resolve the auto settings and refuse bad combinations before anything is loaded."""
    def choose(flag, value, options):
        if value not in options:
            raise M.UserError(f"--{flag} {value!r}: choose {', '.join(options)}")

    choose("advantage", cfg.advantage, ("ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp"))
    if bool(cfg.reward) == bool(cfg.reward_model):
        raise M.UserError("give exactly one of --reward-model (a reward.py checkpoint) or --reward file.py:fn")
    if cfg.advantage in ("grpo", "dr_grpo", "rloo") and cfg.group_size < 2:
        raise M.UserError(f"--advantage {cfg.advantage} compares responses within a group: set --group-size >= 2")
    if cfg.critic and cfg.advantage != "ppo":
        raise M.UserError("--critic is only used by --advantage ppo (the other estimators are critic-free)")
    if cfg.temperature <= 0:
        raise M.UserError("--temperature must be > 0: policy-gradient training needs sampled responses")
    n = cfg.batch_size * cfg.group_size
    if cfg.batch_size < 1 or cfg.minibatches < 1 or n % cfg.minibatches or n // cfg.minibatches < cfg.grad_accum:
        raise M.UserError(f"--batch-size {cfg.batch_size} x --group-size {cfg.group_size} = {n} responses must split "
                          f"into --minibatches {cfg.minibatches} of at least --grad-accum {cfg.grad_accum}")
    if cfg.kl_penalty == "auto":
        cfg.kl_penalty = "loss" if cfg.advantage in ("grpo", "dr_grpo") else "reward"
    if cfg.kl_estimator == "auto":
        cfg.kl_estimator = "k3" if cfg.kl_penalty == "loss" else "k1"
    if cfg.loss_type == "auto":
        cfg.loss_type = {"grpo": "grpo", "dr_grpo": "dr_grpo"}.get(cfg.advantage, "dapo")
    choose("kl-penalty", cfg.kl_penalty, ("reward", "loss", "auto"))
    choose("kl-estimator", cfg.kl_estimator, ("k1", "k2", "k3", "k3_ratio", "auto"))
    choose("ratio", cfg.ratio, ("token", "sequence", "gspo"))
    if cfg.kl_estimator == "k3_ratio" and cfg.kl_penalty != "loss":
        raise M.UserError("--kl-estimator k3_ratio weights the KL loss by the importance ratio: use it with "
                          "--kl-penalty loss (in the reward the ratio is 1 and carries no gradient)")
    choose("loss-type", cfg.loss_type, ("grpo", "bnpo", "dapo", "dr_grpo", "auto"))
    if cfg.gold == "auto":
        default = os.path.join(HERE, "data", "toyworld.py")
        cfg.gold = f"{default}:gold_reward" if cfg.eval_data and os.path.isfile(default) else ""


def no_dropout(model):
    """Dropout off (N+): PPO's ratio and the KL must compare deterministic forwards."""
    model.cfg.dropout = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def load_models(cfg, device):
    """policy, reference (None with LoRA), critic (None but for ppo), reward model (None with a verifier), enc.
    The reference and the reward model are frozen: under --fsdp each rank holds them whole, as under DDP. With LoRA
    the reference is the policy with its adapters off; --fsdp refuses LoRA (parallel.check_fsdp)."""
    policy, enc, ckpt = C.load_model(cfg.model, device)
    ref = None if C.peft_kind(cfg) else no_dropout(copy.deepcopy(policy)).eval().requires_grad_(False)
    critic, rm = None, None
    if cfg.advantage == "ppo":
        critic = no_dropout(C.load_model(cfg.critic or cfg.reward_model or cfg.model, device, head="scalar")[0])
    if cfg.reward_model:
        rm, rm_enc, _ = C.load_model(cfg.reward_model, device)
        if rm.cfg.head != "scalar":
            raise M.UserError(f"--reward-model {cfg.reward_model}: an LM checkpoint, not a reward model (reward.py)")
        if rm_enc.name != enc.name:
            raise M.UserError(f"--reward-model tokenizer {rm_enc.name!r} differs from the policy's {enc.name!r}")
        rm = no_dropout(rm).eval().requires_grad_(False)
    return no_dropout(policy), ref, critic, rm, enc, ckpt.get("lineage", [])


def compute_advantages(cfg, scores, kl_penalty, values, mask):
    """Rollout -> (advantages (B, N), returns (B, N) or None) by --advantage. scores (B,), kl_penalty (B, N) =
    beta * k_t per token (zeros with --kl-penalty loss), values (B, N) or None.
      ppo           GAE (`gae`) on token rewards r_t = -beta k_t + [t = last] score with the critic's values;
                    whitened over the rollout unless --no-whiten-advantages
      grpo, dr_grpo, rloo   `group_advantages` of the sequence reward R = score - beta sum_t k_t, the same
                    for every token of a response (a KL in the reward is a sequence-level penalty here)
      reinforce_pp  REINFORCE++ (Hu 2025) as OpenRLHF's `reinforce` / `reinforce_baseline`: the score (minus its
                    group mean when --group-size > 1) at the last token, -beta k_t at every token, returns-to-go
                    G_t = sum_{s>=t} gamma^(s-t) r_s, whitened over all response tokens of the rollout ("global
                    batch normalisation"; of this process under DDP)"""
    if cfg.advantage not in ("ppo", "reinforce_pp"):
        seq_reward = scores - kl_penalty.sum(1)  # the KL as a sequence-level penalty (RLOO)
        return group_advantages(seq_reward, cfg.group_size, cfg.advantage)[:, None] * mask, None
    token_rewards = -kl_penalty  # the KL as a per-token reward, the score at the last token (N+)
    final = scores if cfg.advantage == "ppo" else group_advantages(scores, cfg.group_size, "reinforce_pp")
    token_rewards[torch.arange(len(scores), device=mask.device), M.last_token_index(mask)] += final
    if cfg.advantage == "ppo":
        advantages, returns = gae(token_rewards, values, mask, cfg.gamma, cfg.lam)
        return (whiten(advantages, mask) if cfg.whiten_advantages else advantages), returns
    returns_to_go, _ = gae(token_rewards, torch.zeros_like(mask), mask, cfg.gamma, 1.0)  # V = 0, lam = 1
    return whiten(returns_to_go, mask), None  # REINFORCE++: global batch normalisation


def ppo_update(cfg, policy, critic, opts, roll, kl_coef, world, shuffle):
    """--ppo-epochs passes of --minibatches optimiser steps over one rollout; returns mean pg_loss, value_loss,
    clipfrac, approx_kl. Each minibatch's loss is normalised over all its micro-batches and ranks."""
    seq, attn, mask, P = roll["seq"], roll["attn"], roll["mask"], roll["P"]
    n, sums, n_updates = len(seq), dict(pg_loss=0.0, value_loss=0.0, clipfrac=0.0, approx_kl=0.0), 0
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(n, generator=shuffle).to(seq.device).split(n // cfg.minibatches):
            n_seqs = C.all_reduce_sum(torch.tensor(float(len(mb)), device=seq.device))
            n_tok = C.all_reduce_sum(mask[mb].sum())
            micro = mb.split(-(-len(mb) // cfg.grad_accum))
            for j, b in enumerate(micro):
                with contextlib.ExitStack() as stack:
                    if world > 1 and j < len(micro) - 1:  # gradients are all-reduced on the last micro-batch only
                        for m in (policy, critic) if critic is not None else (policy,):
                            stack.enter_context(m.no_sync())
                    with C.autocast(seq.device, cfg.dtype):
                        logp = response_logprobs(policy, seq[b], attn[b], P, cfg.temperature,
                                                 banned=roll["banned"])[0].float()
                        vpred = critic(seq[b], attention_mask=attn[b])[:, P - 1:-1].float() if critic else None
                    old_v, ret = (roll["values"][b], roll["returns"][b]) if critic else (None, None)
                    old_logp = roll["old_logp"][b]
                    pg, vf, clipped = ppo_losses(logp, old_logp, roll["advantages"][b], cfg.clip_eps, vpred, old_v,
                                                 ret, cfg.value_clip_eps, mask[b], cfg.ratio)
                    if cfg.kl_penalty == "loss":
                        log_rho = log_ratio(logp, old_logp, mask[b], cfg.ratio)  # k3_ratio's weight
                        pg = pg + kl_coef * kl_estimate(logp, roll["ref_logp"][b], cfg.kl_estimator, log_rho)
                    loss = aggregate(pg, mask[b], cfg.loss_type, cfg.max_new_tokens, n_seqs, n_tok)
                    if vf is not None:
                        loss = loss + aggregate(vf, mask[b], "dapo", n_seqs=n_seqs, n_tokens=n_tok)
                    (loss * world).backward()  # DDP averages gradients over ranks; * world undoes that
                log_rho = logp.detach() - old_logp  # the per-token ratio, whatever --ratio clips
                for k, v in (("pg_loss", pg), ("value_loss", vf), ("clipfrac", clipped.float()),
                             ("approx_kl", torch.expm1(log_rho) - log_rho)):  # CleanRL #12
                    sums[k] += aggregate(v.detach(), mask[b], "dapo", n_tokens=n_tok).item() if v is not None else 0.0
            for model, opt in opts:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))  # CleanRL #11
                opt.step()
                opt.zero_grad(set_to_none=True)
            n_updates += 1
    return {k: v / n_updates for k, v in sums.items()}


def main(argv=None):
    cfg = C.parse_config(Config, argv, description=__doc__)
    check_flags(cfg)
    rank, world, device = C.setup_ddp(cfg.device)
    torch.manual_seed(cfg.seed)
    policy, ref, critic, rm, enc, lineage = load_models(cfg, device)
    C.check_out(cfg.out, policy)
    C.catch_interrupts(cfg.save_on_interrupt)
    fn = C.load_function(cfg.reward, "--reward") if cfg.reward else None
    gold = C.load_function(cfg.gold, "--gold") if cfg.gold else None
    start_step, state = C.resume_and_peft(policy, cfg)
    if state is not None and "kl_coef" not in state:
        raise M.UserError(f"{cfg.resume}: no PPO train_state to resume from (not written by ppo.py?)")
    kl_coef = cfg.kl_coef if state is None else state["kl_coef"]
    if critic is not None and state is not None:
        critic.load_state_dict(state["critic"])
    policy.to(device)

    max_len = min(m.cfg.max_seq_len - m.cfg.prefix_len for m in (policy, critic, rm) if m is not None)  # a prefix first
    keep = max_len - cfg.max_new_tokens
    if keep < 8:
        raise M.UserError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in {max_len} positions")

    def read_prompts(path, limit=0):  # -> (message lists, rendered id lists cut from the left to fit)
        msgs = [r["prompt"] for r in C.read_jsonl(path, "prompt", cfg.skip_bad_lines)][:limit or None]
        return msgs, [C.render_chat(enc, p, add_generation_prompt=True)[0][-keep:] for p in msgs]

    prompts, prompt_ids = read_prompts(cfg.data)
    eval_sets = {os.path.splitext(os.path.basename(p))[0]: read_prompts(p, cfg.eval_limit)
                 for p in filter(None, cfg.eval_data.split(","))}

    # AdamW with eps 1e-5 (CleanRL #3) for the policy and the critic, each restored from a resumed train_state
    policy, raw_policy, policy_opt = C.wrap_for_training(policy, cfg, state, world, device, eps=1e-5)
    opts = [(raw_policy, policy_opt)]
    raw_critic = critic
    if critic is not None:
        critic, raw_critic, critic_opt = C.wrap_for_training(critic, cfg, state, world, device,
                                                             key="critic_optimizer", eps=1e-5)
        opts.append((raw_critic, critic_opt))

    def run_eval():  # on rank 0 alone: under --fsdp every rank gathers the weights first (eval mode, parallel.shard)
        if not eval_sets:
            return {}
        raw_policy.eval()
        result = evaluate(raw_policy, eval_sets, rm, fn, gold, cfg, enc, device) if rank == 0 else {}
        raw_policy.train()
        return result

    if rank == 0:
        n_train = raw_policy.num_params(trainable=True)
        print(f"{len(prompts)} prompts, {sum(len(v[1]) for v in eval_sets.values())} held out; {cfg.advantage}: "
              f"{cfg.batch_size * world} prompts x {cfg.group_size} per step, KL {cfg.kl_estimator} in the "
              f"{cfg.kl_penalty}, loss {cfg.loss_type}; {n_train:,} trainable policy params"
              + (f", critic from {cfg.critic or cfg.reward_model or cfg.model}" if critic is not None else ""))
    before = run_eval() if start_step == 0 else {}
    if before:
        C.log_jsonl(cfg.log, {"step": 0, **before})
        print("before: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))
    metrics = {f"{k}_start": v for k, v in before.items()}
    last_saved = f"{cfg.resume} (step {start_step})" if cfg.resume else None
    mine = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    bar, end = C.step_range(cfg, start_step, rank, cfg.advantage)
    for step in bar:
        t0 = time.perf_counter()
        lr = C.set_lr(step, cfg, *(opt for _, opt in opts))  # CleanRL #4

        # --- rollout: sample, then score it and compute what the update needs once, with the policy as sampled
        idx = [i for i in C.step_indices(step, len(prompts), cfg.batch_size * world, mine, cfg.seed)
               for _ in range(cfg.group_size)]  # a group's responses are consecutive rows
        seed = cfg.seed * 1_000_003 + step * 1_009 + rank  # a pure function of the step: resume-exact, DDP-distinct
        raw_policy.eval()
        roll = sample(raw_policy, [prompt_ids[i] for i in idx], cfg, enc, device, cfg.temperature,
                      torch.Generator(device).manual_seed(seed))
        seq, attn, mask, P = roll["seq"], roll["attn"], roll["mask"], roll["P"]
        t_gen = time.perf_counter() - t0
        with torch.no_grad(), C.autocast(device, cfg.dtype):
            old_logp, entropy = response_logprobs(raw_policy, seq, attn, P, cfg.temperature, True, roll["banned"])
            with M.lora_disabled(raw_policy) if ref is None else contextlib.nullcontext():
                ref_logp = response_logprobs(ref if ref is not None else raw_policy, seq, attn, P, cfg.temperature,
                                             banned=roll["banned"])[0]
            values = raw_critic(seq, attention_mask=attn)[:, P - 1:-1].float() * mask if critic else None
            scores = score(seq, attn, roll["texts"], [prompts[i] for i in idx], rm, fn, cfg.reward, idx)
        if cfg.debug_logprobs_every and step % cfg.debug_logprobs_every == 0:
            diff = ((old_logp.float() - roll["logp"]).abs() * mask).max().item()
            if diff >= 1e-4:
                raise RuntimeError(f"sampler/trainer log-prob mismatch at step {step}: max |diff| {diff:.2e} >= 1e-4")
        old_logp, ref_logp = old_logp.float(), ref_logp.float()
        scores = scores - cfg.missing_eos_penalty * (~roll["ended"]).float()
        kl1 = kl_estimate(old_logp, ref_logp, "k1") * mask  # (B, N): the KL that is logged
        kl_penalty = (kl_coef * kl_estimate(old_logp, ref_logp, cfg.kl_estimator) * mask
                      if cfg.kl_penalty == "reward" else torch.zeros_like(mask))
        advantages, returns = compute_advantages(cfg, whiten(scores) if cfg.whiten_rewards else scores, kl_penalty,
                                                 values, mask)
        roll.update(old_logp=old_logp, ref_logp=ref_logp, values=values, advantages=advantages, returns=returns)

        # --- PPO epochs over shuffled minibatches
        t_update = time.perf_counter()
        raw_policy.train()
        local = ppo_update(cfg, policy, critic, opts, roll, kl_coef, world, torch.Generator().manual_seed(seed))

        # --- metrics averaged over ranks, the adaptive KL controller, evaluation, checkpoint. Logged: score (the
        # reward before the KL), reward (score - beta sum k1), kl (sum_t k1 per response), kl_coef, entropy, and
        # ppo_update's pg_loss, value_loss, clipfrac, approx_kl; before training and every --eval-every (greedy,
        # on --eval-data): eval_gold, eval_proxy, eval_len, eval_ended, with several files eval_gold_<file>
        local.update(score=scores.mean().item(), kl=kl1.sum(1).mean().item(),
                     reward=(scores - kl_coef * kl1.sum(1)).mean().item(),
                     entropy=((entropy.float() * mask).sum() / mask.sum().clamp(min=1)).item(),
                     response_len=mask.sum(1).mean().item(), ended=roll["ended"].float().mean().item(),
                     explained_var=explained_variance(values, returns, mask) if critic else float("nan"),
                     rollout_tok_s=mask.sum().item() / max(t_gen, 1e-9))
        means = {k: v / world for k, v in C.reduce_sums(local, device).items()}
        record = {"step": step + 1, **means, "kl_coef": kl_coef, "lr": lr,
                  "rollout_s": t_gen, "update_s": time.perf_counter() - t_update, "step_s": time.perf_counter() - t0}
        if cfg.kl_target > 0:
            kl_coef = update_kl_coef(kl_coef, record["kl"], cfg.kl_target, len(idx) * world, cfg.kl_horizon)
        C.check_finite(record, ("pg_loss", "value_loss", "score", "kl"), last_saved)
        last_step, stop = step + 1 == end, C.interrupted(device)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 or last_step:
            record.update(run_eval())
        if rank == 0:
            bar.set_postfix({k: f"{record[k]:.3f}" for k in ("score", "kl", "eval_gold") if k in record})
            C.log_jsonl(cfg.log, record)
        metrics = {**metrics, **record}
        if last_step or stop or cfg.save_every and (step + 1) % cfg.save_every == 0:
            extra = {"kl_coef": kl_coef}
            if raw_critic is not None:  # in full, as DDP saves it (under --fsdp gathered to rank 0 from every rank)
                extra["critic"], extra["critic_optimizer"] = C.full_state(cfg, raw_critic, critic_opt)
            last_saved = C.save_training(cfg, raw_policy, enc, policy_opt, step + 1, metrics,
                                         lineage + [cfg.advantage], rank, extra)
        if stop:
            raise C.Interrupted(f"saved {last_saved}; continue with --resume {cfg.out}")
    if rank == 0 and metrics:
        shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith("eval_") or k in ("score", "kl")}
        print(f"saved {cfg.out}: step {metrics.get('step', start_step)}, {shown}")


if __name__ == "__main__":
    C.run(main)
