"""
dpo.py: direct preference optimisation and its family, offline, from a fixed data set of preferences.

One loop, the loss picked by --loss:
  paired, with a reference (`preference_loss`; the names and formulas of TRL's DPOTrainer `loss_type`):
    sigmoid    DPO (Rafailov et al. 2023); with --label-smoothing e, conservative DPO (cDPO, Mitchell 2023)
    hinge      RSO / SLiC-HF hinge on the reference-normalised likelihood (Liu et al. 2023; Zhao et al. 2023)
    ipo        IPO (Azar et al. 2023), on per-token average log-probs as TRL computes it
    robust     robust DPO, unbiased under label flips with rate --label-smoothing (Chowdhury et al. 2024)
    bco_pair   binary-classifier optimisation, pairwise (Jung et al. 2024)
    sppo_hard  SPPO with hard win probabilities (Wu et al. 2024)
    nca_pair   noise-contrastive alignment, pairwise (Chen et al. 2024)
    apo_zero, apo_down   anchored preference optimisation (D'Oosterlinck et al. 2024)
  paired, reference-free: simpo (`simpo_loss`, Meng et al. 2024), orpo (`orpo_loss`, Hong et al. 2024)
  unpaired: kto (`kto_loss`, Ethayarajh et al. 2024) on {"prompt", "completion", "label"} data
Each loss function's docstring gives its formula, its paper and, where checked, the equation number.

A response's log-probability is sum_t log pi(y_t | x, y_<t) over its content and closing `<|im_end|>` (fp32);
ipo, simpo and orpo use the per-token average (`loss_terms`). The chosen and rejected sequences go through one
forward (`forward_logps`). The reference's log-probs are computed once, before the first step, and cached
(`reference_cache`): no reference model stays in memory, and with --lora-rank the reference is the same network
with its adapters off. KTO's reference point z0 is estimated per step on mismatched pairs (`kto_reference_point`).

A pair's optional "confidence" (P(chosen is better), a soft label such as cai.py's AI feedback) is its own label
smoothing e = 1 - confidence in sigmoid, robust and simpo (`smoothing_of`); the other losses read hard labels.

Departures: sigmoid's label smoothing is cDPO as in the DPO reference code and TRL up to v0.28 (TRL v0.29 on
ignores label_smoothing in sigmoid; with e = 0 the two agree; robust is the unbiased rDPO loss either way).
bco_pair omits BCO's running reward shift delta, as TRL's current DPOTrainer does. orpo's NLL term is each
example's per-token mean NLL of the chosen response (the paper's L_SFT); TRL averages over all chosen tokens of
the batch instead. A prompt is truncated from the left by the same amount for chosen and rejected (`fit`). A
response is its content and `<|im_end|>` (common.render_response); TRL, templating ChatML itself, also scores the
"\\n" after `<|im_end|>`.

    python dpo.py --model out/sft.pt --data data/toy/prefs.jsonl --out out/dpo.pt                  # CPU, DPO
    python dpo.py --model out/sft.pt --loss ipo --beta 0.5 --out out/ipo.pt                         # IPO
    python dpo.py --model out/sft.pt --loss kto --data data/toy/kto.jsonl --out out/kto.pt         # KTO
    python dpo.py --model out/sft.pt --loss simpo --beta 2.0 --simpo-gamma 0.5 --out out/simpo.pt  # SimPO
    python dpo.py --model out/sft.pt --lora-rank 16 --lr 1e-3 --out out/dpo_lora.pt                # LoRA
    python dpo.py --model out/sft.pt --limit 768 --steps 12 --out out/dpo.pt                       # first 768 pairs
    python dpo.py --model out/sft.pt --out out/dpo.pt --device cuda                                # one GPU, bf16
    torchrun --nproc_per_node=2 dpo.py --model out/sft.pt --out out/dpo.pt                         # DDP
    torchrun --nproc_per_node=2 dpo.py --fsdp --model out/sft.pt --out out/dpo.pt   # FSDP2, shards in out/dpo.dcp/
    torchrun --nproc_per_node=2 dpo.py -- --log out/dpo.log.jsonl   # `--` first, or torchrun reads --log as its own
    python dpo.py --model out/sft.pt --out out/dpo.pt --resume out/dpo.pt --steps 400              # continue
"""

import contextlib
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
    model: str = "out/sft.pt"  # checkpoint to start from; also the reference policy
    data: str = ""  # {"prompt", "chosen", "rejected", optional "confidence"} JSONL (kto: "completion", "label")
    limit: int = 0  # read only the first N records of --data, then hold out --eval-frac of them as usual (0 = all)
    out: str = "out/dpo.pt"  # output checkpoint
    loss: str = "sigmoid"  # sigmoid hinge ipo robust bco_pair sppo_hard nca_pair apo_zero apo_down simpo orpo kto
    beta: float = 0.1  # beta of the loss (IPO's tau; ORPO's lambda; SimPO wants ~2)
    label_smoothing: float = 0.0  # label-flip rate for sigmoid (cDPO), robust and simpo; 0 = off
    simpo_gamma: float = 0.5  # SimPO's target reward margin gamma
    desirable_weight: float = 1.0  # KTO's lambda_D, weight of desirable examples
    undesirable_weight: float = 1.0  # KTO's lambda_U, weight of undesirable examples
    steps: int = 150  # optimiser steps
    batch_size: int = 16  # pairs (kto: examples) per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 5e-5  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 10  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    seq_len: int = 256  # longest prompt + response in tokens (longer ones are truncated and counted)
    eval_frac: float = 0.05  # fraction of prompts held out (with all their examples) for eval metrics
    eval_every: int = 50  # steps between held-out evaluations (0 = only at the end)
    kl_prompts: int = 32  # held-out prompts sampled for kl_ref at each evaluation (0 = off)
    kl_max_new_tokens: int = 48  # length limit of those samples
    ref_batch_size: int = 64  # sequences per forward when caching the reference log-probs
    save_every: int = 0  # steps between checkpoints (0 = only at the end)
    seed: int = 0  # seeds the data order, the held-out split and the KL samples
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # recompute activations in backward to save memory
    offload_activations: bool = False  # keep the tensors saved for backward in CPU memory (parallel.py)
    fsdp: bool = False  # FSDP2 under torchrun: shard weights, gradients and AdamW state over ranks (parallel.py)
    lora_rank: int = 0  # LoRA rank (0 = full fine-tuning); the adapter-disabled model is the reference
    lora_alpha: float = 0.0  # LoRA alpha (0 = 2 * rank)
    lora_dropout: float = 0.0  # dropout on the LoRA branch
    peft: str = ""  # adapter: lora, dora, prefix, prefix-mlp or prompt ("" = lora if --lora-rank, else full)
    peft_len: int = 16  # --peft prefix / prefix-mlp / prompt: learned slots (keys and values, or embeddings)
    rslora: bool = False  # LoRA / DoRA scaled by alpha / sqrt(rank) (rsLoRA) instead of alpha / rank
    resume: str = ""  # checkpoint of this script to continue from (model, optimiser, RNG, data position, ref cache)
    stop_at: int = 0  # save and stop after this step, keeping the --steps schedule (time-sliced jobs); 0 = off
    save_on_interrupt: bool = False  # Ctrl-C / SIGTERM: save a resumable checkpoint at the end of the step, then stop
    skip_bad_lines: bool = False  # skip (and count) malformed JSONL lines instead of stopping
    log: str = ""  # JSONL metrics file (one line per step)


# -----------------------------------------------------------------------------
# The losses: pure functions of (B,) sequence log-probs, torch and math only (this block can be copied alone)

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down")


def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1,
                    loss_type="sigmoid", label_smoothing=0.0):
    """Paired preference losses against a reference policy. Inputs (B,) log-probs of the chosen (y_c) and rejected
    (y_r) responses under the policy and the reference -> (losses (B,), chosen_rewards (B,), rejected_rewards (B,)).

    With the log-ratios c = log pi(y_c|x) - log ref(y_c|x), r = log pi(y_r|x) - log ref(y_r|x), d = c - r,
    e = label_smoothing and s = sigmoid, each loss_type is TRL DPOTrainer's formula of the same name:
      sigmoid    -(1 - e) log s(beta d) - e log s(-beta d)
                 DPO, Rafailov et al. 2023 (arXiv 2305.18290) Eq. 7; e > 0 is conservative DPO (Mitchell 2023, "A
                 note on DPO with noisy preferences", the BCE against smoothed labels 1 - e).
      hinge      max(0, 1 - beta d)
                 the "hinge-norm" loss of RSO, Liu et al. 2023 (arXiv 2309.06657): SLiC-HF's calibration loss
                 (Zhao et al. 2023, arXiv 2305.10425) on reference-normalised likelihoods, margin 1/beta.
      ipo        (d - 1 / (2 beta))^2
                 IPO, Azar et al. 2023 (arXiv 2310.12036) Eq. 17, beta = their tau. TRL applies it to per-token
                 average log-probs: pass averaged log-probs (the loop does for --loss ipo).
      robust     (-(1 - e) log s(beta d) + e log s(-beta d)) / (1 - 2 e),   0 <= e < 1/2
                 robust DPO (rDPO), Chowdhury et al. 2024 (arXiv 2403.00409), their de-biased loss: unbiased for
                 labels flipped at rate e.
      bco_pair   -log s(beta c) - log s(-beta r)
                 BCO, Jung et al. 2024 (arXiv 2404.04656): binary cross-entropy on the implicit rewards, with the
                 paper's reward shift delta = 0 (TRL's current choice).
      sppo_hard  (c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2
                 SPPO, Wu et al. 2024 (arXiv 2405.00675) Eq. 4.7 with the win probability set to 1 for y_c, 0 for y_r.
      nca_pair   -log s(beta c) - 1/2 log s(-beta c) - 1/2 log s(-beta r)
                 NCA, Chen et al. 2024 (arXiv 2402.05369), its pairwise-preference form (K = 2 responses).
      apo_zero   (1 - s(beta c)) + s(beta r)
                 APO-zero, D'Oosterlinck et al. 2024 (arXiv 2408.06266) Eq. 7: raise y_c, lower y_r.
      apo_down   s(beta c) + (1 - s(beta d))
                 APO-down, same paper Eq. 8: lower both, y_r more.
    Rewards are beta * c and beta * r (DPO's implicit reward, Eq. 5), detached."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,) c
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,) r
    d = chosen_logratios - rejected_logratios  # (B,)
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * d) - e * F.logsigmoid(-beta * d)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * d)
    elif loss_type == "ipo":
        losses = (d - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        losses = (-(1 - e) * F.logsigmoid(beta * d) + e * F.logsigmoid(-beta * d)) / (1 - 2 * e)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    elif loss_type == "sppo_hard":
        losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    elif loss_type == "nca_pair":
        losses = (-F.logsigmoid(beta * chosen_logratios) - 0.5 * F.logsigmoid(-beta * chosen_logratios)
                  - 0.5 * F.logsigmoid(-beta * rejected_logratios))
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * d))
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def simpo_loss(policy_chosen_logps, policy_rejected_logps, beta=2.0, gamma=0.5, label_smoothing=0.0):
    """SimPO, Meng et al. 2024 (arXiv 2405.14734) Eq. 6: reference-free, length-normalised, with a target margin.

    Inputs are per-token AVERAGE log-probs (B,) (log pi(y|x) / |y|) -> (losses, chosen_rewards, rejected_rewards):
        z = beta * (avg log pi(y_c|x) - avg log pi(y_r|x)) - gamma
        loss = -(1 - e) log sigmoid(z) - e log sigmoid(-z)
    (e = label_smoothing, 0 in the paper; TRL's CPOTrainer loss_type="simpo" with simpo_gamma = gamma). Rewards are
    beta * avg log pi, SimPO's implicit reward (Eq. 4), detached."""
    z = beta * (policy_chosen_logps - policy_rejected_logps) - gamma  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it (Maechler 2012's two branches)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy_chosen_logps, policy_rejected_logps, beta=0.1, chosen_nll=None):
    """ORPO, Hong et al. 2024 (arXiv 2403.07691) Eqs. 4, 6, 7: SFT plus an odds-ratio penalty, no reference.

    Inputs are per-token AVERAGE log-probs (B,) -> (losses, chosen_rewards, rejected_rewards), beta = the paper's
    lambda:
        odds(y|x) = P / (1 - P) with P = exp(avg log pi(y|x))                                    (Eq. 4)
        log OR = log odds(y_c|x) - log odds(y_r|x)
               = (lc - lr) - (log(1 - exp(lc)) - log(1 - exp(lr)))
        loss = L_SFT - beta * log sigmoid(log OR)                                                (Eqs. 6, 7)
    L_SFT is chosen_nll if given (a scalar or (B,)), else -avg log pi(y_c|x), the example's mean token NLL.
    Log-probs are clamped to <= -1e-6 so a response of probability 1 gives a large finite loss, not inf.
    Rewards are beta * avg log pi (TRL's ORPOTrainer), detached."""
    lc = policy_chosen_logps.clamp(max=-1e-6)
    lr = policy_rejected_logps.clamp(max=-1e-6)
    log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr))  # (B,)
    nll = -policy_chosen_logps if chosen_nll is None else chosen_nll
    losses = nll - beta * F.logsigmoid(log_odds)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def kto_kl(kl_logratios):
    """KTO's reference point z0 = max(0, mean(log pi(y'|x) - log ref(y'|x))) over mismatched (x, y') pairs of the
    batch: (N,) log-ratios -> scalar, detached (Ethayarajh et al. 2024: z0 is estimated, not back-propagated)."""
    return kl_logratios.detach().mean().clamp(min=0)


def kto_loss(policy_logps, ref_logps, labels, kl, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO, Ethayarajh et al. 2024 (arXiv 2402.01306) Eq. 7: unpaired, each completion labelled desirable or not.

    policy_logps, ref_logps (B,), labels (B,) bool (True = desirable), kl the reference point z0 (`kto_kl`)
    -> (losses (B,), rewards (B,)), with r = log pi(y|x) - log ref(y|x):
        desirable:   lambda_D * (1 - sigmoid(beta * (r - z0)))
        undesirable: lambda_U * (1 - sigmoid(beta * (z0 - r)))
    TRL's KTOTrainer loss_type="kto" (it averages the losses over the batch). Rewards are beta * r, detached."""
    logratios = policy_logps - ref_logps  # (B,)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(labels, desirable, undesirable), beta * logratios.detach()


# -----------------------------------------------------------------------------
# Data: (prompt, response) sequences, the held-out split, batches

LOSSES = LOSS_TYPES + ("simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")
AVERAGED = ("ipo", "simpo", "orpo")  # losses defined on per-token average log-probs
SMOOTHED = ("sigmoid", "robust", "simpo")  # losses that read label_smoothing


def fit(prompt_ids, responses, seq_len):
    """Cut prompt + each response to seq_len with one prompt cut for all (common.truncate against the longest
    response), so a pair's responses are scored after the same context. -> [(ids, response start)], truncated."""
    longest = max(responses, key=len)
    p, _, truncated = C.truncate(prompt_ids, longest, seq_len)
    return [(p + r[:seq_len - len(p)], len(p)) for r in responses], truncated


def load_examples(cfg, enc):
    """-> (train, held, truncated). Pairs: {"prompt", "seqs": [chosen, rejected]}; kto: {"prompt", "seqs":
    [completion, mismatched completion], "label"}, the mismatched one being the previous example's completion in
    the same split (TRL's KL pairs). --limit N keeps the first N valid records before the split: the run is the
    one on a file of those N records (the split hashes each prompt, so it does not depend on what follows)."""
    kto = cfg.loss == "kto"
    records = C.read_jsonl(cfg.data, "kto" if kto else "pref", cfg.skip_bad_lines)
    if cfg.limit:
        records = records[:cfg.limit]
    splits, truncated = ([], []), 0
    for rec in records:
        splits[C.held_out(rec["prompt"], cfg.eval_frac, cfg.seed)].append(rec)
    out = []
    for recs in splits:
        examples = []
        for i, rec in enumerate(recs):
            if kto:
                responses = [rec["completion"], recs[i - 1]["completion"]]  # i - 1 wraps to the last at i = 0
            else:
                responses = [rec["chosen"], rec["rejected"]]
            p, rendered = None, []
            for resp in responses:
                p, r = C.render_response(enc, rec["prompt"], resp)
                rendered.append(r)
            seqs, t = fit(p, rendered, cfg.seq_len)
            truncated += t
            ex = {"prompt": rec["prompt"], "seqs": seqs}
            if rec.get("confidence") is not None:  # a soft label: its own label smoothing e = 1 - P(chosen better)
                ex["smoothing"] = 1.0 - rec["confidence"]
                if cfg.loss == "robust" and ex["smoothing"] >= 0.5:
                    raise M.UserError(f"{cfg.data}: --loss robust needs every 'confidence' above 0.5")
            if kto:
                ex["label"] = rec["label"]
            examples.append(ex)
        out.append(examples)
    return out[0], out[1], truncated


def collate(seqs, pad_id):
    """[(ids, response start)] -> ids, mask (N, T) right-padded; mask is 1 on response tokens only."""
    ids = C.pad_right([s for s, _ in seqs], pad_id)  # (N, T)
    mask = C.pad_right([[0] * start + [1] * (len(s) - start) for s, start in seqs], 0)  # (N, T)
    return ids, mask


# -----------------------------------------------------------------------------
# Forwards: the policy, the cached reference, the sampled KL


def sequence_logps(logits, ids, mask):
    """Summed log-probs of the masked tokens and their count: logits (B, T, V), ids, mask (B, T) -> (B,), (B,)."""
    return M.token_logprobs(logits, ids, mask).sum(-1), mask[:, 1:].sum(-1)


def forward_logps(model, seqs, device, cfg, pad_id):
    """One forward over all sequences (concatenated, right-padded) -> summed response log-probs (N,), lengths (N,).
    The loop passes the B chosen and B rejected sequences of a micro-batch together, as the DPO reference code
    does: right pads cannot change causal attention on the real tokens before them."""
    ids, mask = collate(seqs, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    with C.autocast(device, cfg.dtype):
        logits = model(ids)  # (N, T, V)
    sums, counts = sequence_logps(logits, ids, mask)
    return sums, counts.float()


@torch.no_grad()
def reference_logps(model, examples, cfg, device, pad_id, rank=0, world=1):
    """The reference log-probs of every example's sequences, (N, 2) fp32: [chosen, rejected] for pairs,
    [completion, mismatched completion] for kto. Eval mode, no_grad; sequences sorted by length so batches carry
    little padding; each rank scores every world-th batch and the results are summed over ranks."""
    flat = [(i, j) for i in range(len(examples)) for j in range(2)]
    flat.sort(key=lambda ij: len(examples[ij[0]]["seqs"][ij[1]][0]))
    out = torch.zeros(len(examples), 2, device=device)
    was_training = model.training
    model.eval()
    batches = [flat[k:k + cfg.ref_batch_size] for k in range(0, len(flat), cfg.ref_batch_size)]
    for batch in batches[rank::world]:
        sums, _ = forward_logps(model, [examples[i]["seqs"][j] for i, j in batch], device, cfg, pad_id)
        rows, cols = torch.tensor([i for i, _ in batch]), torch.tensor([j for _, j in batch])
        out[rows, cols] = sums.float()
    model.train(was_training)
    return C.all_reduce_sum(out).cpu()


def smoothing_of(cfg, examples):
    """Each pair's label smoothing (B,): 1 - its "confidence" (a soft label, e.g. cai.py's AI feedback), else
    --label-smoothing; a (B,) e in the smoothed losses is the cross-entropy against per-pair soft labels."""
    return torch.tensor([ex.get("smoothing", cfg.label_smoothing) for ex in examples])


def loss_terms(cfg, sums, counts, ref, smoothing=None):
    """The paired loss of one batch from the policy's summed log-probs (2B,) [all chosen, all rejected], their
    lengths and the cached reference rows (B, 2) -> (losses (B,), chosen_rewards, rejected_rewards). Not for kto.
    smoothing (B,), from smoothing_of, replaces --label-smoothing in the losses that read it (SMOOTHED).

    ipo, simpo and orpo are defined on per-token average log-probs: policy and reference sums are divided by the
    response length here, so the loss functions only ever see the log-probs they are given (TRL's
    `average_log_prob`; its newer code divides the log-ratios by the length inside the IPO branch, the same
    number)."""
    pc, pr = sums.chunk(2)
    e = cfg.label_smoothing if smoothing is None else smoothing.to(sums.device, sums.dtype)
    if cfg.loss in AVERAGED:
        nc, nr = counts.clamp(min=1).chunk(2)
        pc, pr = pc / nc, pr / nr
    if cfg.loss == "simpo":
        return simpo_loss(pc, pr, cfg.beta, cfg.simpo_gamma, e)
    if cfg.loss == "orpo":
        return orpo_loss(pc, pr, cfg.beta)
    rc, rr = ref[:, 0].to(sums.device), ref[:, 1].to(sums.device)
    if cfg.loss in AVERAGED:
        rc, rr = rc / nc, rr / nr
    return preference_loss(pc, pr, rc, rr, cfg.beta, cfg.loss, e)


def gather_rows(values, rows, n, device):
    """Put this rank's values (k,) at their rows of a zero (n,) vector and sum over ranks: every rank gets all."""
    out = torch.zeros(n, device=device, dtype=torch.float64)
    out[rows] = values.double()
    return C.all_reduce_sum(out)


@torch.no_grad()
def kto_reference_point(model, examples, idx, ref, cfg, device, pad_id, rank, world):
    """KTO's reference point for an optimiser step (the "batch KL estimate"):
        z0 = max(0, mean over the step's examples of log pi(y'|x) - log ref(y'|x)),
    y' the completion of the example before it (paired once, at load time: TRL's mismatched pairs), gathered over
    ranks and micro-batches; a no_grad forward, so grad accumulation equals one big batch, never differentiated."""
    logratios = []
    for k in range(0, len(idx), cfg.batch_size):
        b = idx[k:k + cfg.batch_size]
        sums, _ = forward_logps(model, [examples[i]["seqs"][1] for i in b], device, cfg, pad_id)
        logratios.append(sums - ref[b, 1].to(device))
    mine = torch.cat(logratios)  # (per_rank,)
    n = len(idx)
    everyone = gather_rows(mine, torch.arange(rank * n, (rank + 1) * n, device=device), n * world, device)
    return kto_kl(everyone).float()


@torch.no_grad()
def evaluate_held_out(model, held, ref_held, cfg, device, pad_id, rank, world):
    """eval_loss, eval_accuracy, eval_margin on the held-out --eval-frac of prompts (kto: eval_loss, eval_kl = z0
    and the mean reward by label), eval mode."""
    if not held:
        return {}
    was_training = model.training
    model.eval()
    rows = list(range(rank, len(held), world))
    n = len(held)
    cols = {k: torch.zeros(n, device=device, dtype=torch.float64) for k in ("first", "second", "count1", "count2")}
    for k in range(0, len(rows), cfg.batch_size):
        b = rows[k:k + cfg.batch_size]
        seqs = [held[i]["seqs"][0] for i in b] + [held[i]["seqs"][1] for i in b]
        sums, counts = forward_logps(model, seqs, device, cfg, pad_id)
        for name, v in zip(("first", "second", "count1", "count2"), (*sums.chunk(2), *counts.chunk(2))):
            cols[name][b] = v.double()
    for v in cols.values():
        C.all_reduce_sum(v)
    model.train(was_training)
    ref = ref_held.double().to(device) if ref_held is not None else None
    if cfg.loss == "kto":
        kl = kto_kl(cols["second"] - ref[:, 1])
        labels = torch.tensor([ex["label"] for ex in held], device=device)
        losses, rewards = kto_loss(cols["first"], ref[:, 0], labels, kl, cfg.beta, cfg.desirable_weight,
                                   cfg.undesirable_weight)
        out = {"eval_loss": losses.mean().item(), "eval_kl": kl.item()}
        if labels.any():
            out["eval_reward_desirable"] = rewards[labels].mean().item()
        if (~labels).any():
            out["eval_reward_undesirable"] = rewards[~labels].mean().item()
        return out
    sums = torch.cat([cols["first"], cols["second"]])
    counts = torch.cat([cols["count1"], cols["count2"]])
    losses, rc, rr = loss_terms(cfg, sums, counts, ref, smoothing_of(cfg, held))
    return {"eval_loss": losses.mean().item(), "eval_accuracy": (rc > rr).double().mean().item(),
            "eval_margin": (rc - rr).mean().item()}


@torch.no_grad()
def kl_to_reference(policy, reference, prompts, cfg, enc, device, pad_id, stop_id, rank=0, world=1):
    """kl_ref: the mean over up to --kl-prompts held-out prompts of sum_t KL(pi(.|x, y_<t) || ref(.|x, y_<t))
    along a response y sampled from the policy at temperature 1, in nats per response: the exact per-token KL of
    the two distributions (as evaluate.py's kl_ref). `reference` is a model (without LoRA the loop loads it for
    the evaluation's duration), or the policy itself under LoRA (then it runs with its adapters off). A fixed
    generator: the same random stream at every evaluation, no global RNG consumed."""
    if not prompts:
        return float("nan")
    was_training = policy.training
    policy.eval()
    gen = torch.Generator(device).manual_seed(cfg.seed)
    total = torch.zeros(2, device=device, dtype=torch.float64)  # KL sum, prompts
    banned = C.never_sampled(enc, policy.cfg.vocab_size, [stop_id])
    mine = prompts[rank::world]
    for k in range(0, len(mine), cfg.batch_size):
        batch = mine[k:k + cfg.batch_size]
        with C.autocast(device, cfg.dtype):
            tokens, _, resp_mask = M.generate(policy, batch, cfg.kl_max_new_tokens, 1.0, 0, 1.0, (stop_id,), pad_id,
                                              gen, banned)
        prompt_ids, prompt_mask = M.pad_left(batch, pad_id)
        P = prompt_ids.shape[1]
        ids = torch.cat([prompt_ids.to(device), tokens], 1)  # (B, P + N)
        att = torch.cat([prompt_mask.to(device), resp_mask], 1)  # (B, P + N)
        with C.autocast(device, cfg.dtype):
            logits_p = policy(ids, attention_mask=att)[:, P - 1:-1]  # (B, N, V): the distributions tokens came from
            with M.lora_disabled(policy) if reference is policy else contextlib.nullcontext():
                logits_q = reference(ids, attention_mask=att)[:, P - 1:-1]
        kl = M.kl_divergence(logits_p, logits_q)  # (B, N)
        total += torch.stack([(kl * resp_mask).sum().double(), torch.tensor(float(len(batch)), device=device,
                                                                             dtype=torch.float64)])
    policy.train(was_training)
    C.all_reduce_sum(total)
    return (total[0] / total[1]).item()


# -----------------------------------------------------------------------------


def check_flags(cfg):
    if cfg.loss not in LOSSES:
        raise M.UserError(f"--loss {cfg.loss!r}: choose from {', '.join(LOSSES)}")
    if cfg.beta <= 0:
        raise M.UserError(f"--beta {cfg.beta} must be > 0")
    if cfg.label_smoothing and cfg.loss not in SMOOTHED:
        raise M.UserError(f"--label-smoothing is read only by {', '.join(SMOOTHED)}, not by --loss {cfg.loss}")
    if cfg.loss == "robust" and not 0 <= cfg.label_smoothing < 0.5:
        raise M.UserError(f"--loss robust needs 0 <= --label-smoothing < 0.5 (got {cfg.label_smoothing})")
    if not 0 <= cfg.label_smoothing <= 0.5:
        raise M.UserError(f"--label-smoothing {cfg.label_smoothing} must be in [0, 0.5]")
    if not 0 <= cfg.eval_frac < 1:
        raise M.UserError(f"--eval-frac {cfg.eval_frac} must be in [0, 1)")
    if cfg.limit < 0:
        raise M.UserError(f"--limit {cfg.limit} must be >= 0 (0 = every record of --data)")
    if cfg.loss != "kto" and (cfg.desirable_weight != 1 or cfg.undesirable_weight != 1):
        raise M.UserError("--desirable-weight / --undesirable-weight are KTO's: use them with --loss kto")
    if not cfg.data:
        cfg.data = "data/toy/kto.jsonl" if cfg.loss == "kto" else "data/toy/prefs.jsonl"


def load_start(cfg, device):
    """The policy (LoRA-wrapped with --lora-rank), tokenizer, lineage, start step and saved train state."""
    model, enc, ckpt = C.load_model(cfg.model)
    if model.cfg.head != "lm":
        raise M.UserError(f"{cfg.model}: a reward model (scalar head) cannot be a policy; give a language model")
    lineage = ckpt.get("lineage", [])
    if cfg.seq_len > model.cfg.max_seq_len:
        raise M.UserError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    step, state = C.resume_and_peft(model, cfg)
    return model.to(device), enc, lineage, step, state


def reference_cache(model, cfg, train, held, state, device, pad_id, rank, world):
    """(N, 2) reference log-probs for train and held-out examples: from the resumed train state, else one pass
    of the reference now (no_grad, eval mode), before the first update: the untouched starting weights, or the
    LoRA model with its adapters off (model.lora_disabled). Kept as a tensor indexed by example, so no reference
    model stays in memory during training; saved in the checkpoint's train_state, so --resume does not recompute
    it."""
    if cfg.loss in REFERENCE_FREE:
        return None, None
    if state is not None:
        ref, ref_held = state.get("ref_logps"), state.get("ref_logps_held")
        if ref is None or ref.shape[0] != len(train) or (0 if ref_held is None else ref_held.shape[0]) != len(held):
            raise M.UserError(f"{cfg.resume}: its reference cache does not match --data (resume with the same data, "
                              f"--limit, --loss, --eval-frac and --seed)")
        return ref, ref_held
    t0 = time.perf_counter()
    with M.lora_disabled(model) if C.peft_kind(cfg) else contextlib.nullcontext():
        ref = reference_logps(model, train, cfg, device, pad_id, rank, world)
        ref_held = reference_logps(model, held, cfg, device, pad_id, rank, world) if held else None
    if rank == 0:
        print(f"reference log-probs of {2 * (len(train) + len(held))} sequences cached in "
              f"{time.perf_counter() - t0:.1f}s")
    return ref, ref_held


def kl_prompt_ids(enc, held, cfg, max_seq_len):
    """Up to --kl-prompts distinct held-out prompts, in file order, rendered for sampling and cut to leave room for
    --kl-max-new-tokens."""
    out = []
    for ex in held:
        ids = C.render_chat(enc, ex["prompt"], add_generation_prompt=True)[0][-(max_seq_len - cfg.kl_max_new_tokens):]
        if ids not in out and len(out) < cfg.kl_prompts:
            out.append(ids)
    return out


def kto_batch(model, examples, b, ref, z0, cfg, device, pad_id):
    """KTO's micro-batch: one forward over the completions of examples b, each scored against the step's reference
    point z0 -> (losses (B,), this batch's sums by name: rewards and log-probs by label, label counts)."""
    logps, _ = forward_logps(model, [examples[i]["seqs"][0] for i in b], device, cfg, pad_id)
    labels = torch.tensor([examples[i]["label"] for i in b], device=device)
    losses, rewards = kto_loss(logps, ref[b, 0].to(device), labels, z0, cfg.beta, cfg.desirable_weight,
                               cfg.undesirable_weight)
    good, logps = labels.double(), logps.detach().double()
    return losses, {"reward_desirable": rewards.double() @ good, "reward_undesirable": rewards.double() @ (1 - good),
                    "logp_desirable": logps @ good, "logp_undesirable": logps @ (1 - good),
                    "desirable": good.sum(), "undesirable": (1 - good).sum()}


def kto_record(sums, z0):
    """The logged KTO statistics, in the paired losses' names: chosen = desirable, rejected = undesirable."""
    n_good, n_bad = max(sums["desirable"], 1), max(sums["undesirable"], 1)
    reward_good, reward_bad = sums["reward_desirable"] / n_good, sums["reward_undesirable"] / n_bad
    return dict(reward_chosen=reward_good, reward_rejected=reward_bad, margin=reward_good - reward_bad,
                logp_chosen=sums["logp_desirable"] / n_good, logp_rejected=sums["logp_undesirable"] / n_bad,
                kl=z0.item())


def main(argv=None):
    cfg = C.parse_config(Config, argv, description=__doc__)
    check_flags(cfg)
    rank, world, device = C.setup_ddp(cfg.device)
    torch.manual_seed(cfg.seed)
    model, enc, lineage, start_step, state = load_start(cfg, device)
    C.check_out(cfg.out, model)
    C.catch_interrupts(cfg.save_on_interrupt)
    last_saved = f"{cfg.resume} (step {start_step})" if cfg.resume else None
    model.grad_checkpointing = cfg.grad_checkpointing
    pad_id, stop_id = C.special_id(enc, "<|pad|>"), C.end_id(enc)

    train, held, n_truncated = load_examples(cfg, enc)
    if not train:
        raise M.UserError(f"{cfg.data}: no training examples left after holding out --eval-frac"
                          + (f" of the first --limit {cfg.limit}" if cfg.limit else ""))
    if rank == 0:
        kind = "examples" if cfg.loss == "kto" else "pairs"
        n_good = sum(ex.get("label", 0) for ex in train)
        extra = f" ({n_good} desirable, {len(train) - n_good} undesirable)" if cfg.loss == "kto" else ""
        print(f"--loss {cfg.loss}: {len(train)} train / {len(held)} held-out {kind}{extra}, {n_truncated} truncated; "
              f"{model.num_params():,} params, {model.num_params(trainable=True):,} trainable")
    ref, ref_held = reference_cache(model, cfg, train, held, state, device, pad_id, rank, world)
    kl_prompts = kl_prompt_ids(enc, held, cfg, model.cfg.max_seq_len)

    model, raw, optimizer = C.wrap_for_training(model, cfg, state, world, device)

    per_rank = cfg.batch_size * cfg.grad_accum
    n_all = per_rank * world  # examples per optimiser step, over all ranks
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    metrics = {}
    model.train()
    bar, end = C.step_range(cfg, start_step, rank, cfg.loss)
    for step in bar:
        t0 = time.perf_counter()
        lr = C.set_lr(step, cfg, optimizer)
        idx = C.step_indices(step, len(train), n_all, mine, cfg.seed)
        z0 = kto_reference_point(raw, train, idx, ref, cfg, device, pad_id, rank, world) if cfg.loss == "kto" else None
        # Every rank holds batch_size * grad_accum examples per step, the loss is the sum of per-example losses over
        # that number, and DDP's gradient mean makes it the mean over the global batch. Logged: loss, reward_chosen
        # / reward_rejected (beta * log-ratio to the reference, TRL's "rewards/chosen"; beta * log pi for simpo and
        # orpo), margin (their difference), accuracy (pairs with margin > 0), logp_chosen / logp_rejected (policy
        # sums), kl (KTO's z0); at --eval-every and the end, evaluate_held_out's and kl_to_reference's
        sums = {}  # over this rank's examples, by name
        for j in range(cfg.grad_accum):
            b = idx[j * cfg.batch_size:(j + 1) * cfg.batch_size]
            sync = j == cfg.grad_accum - 1 or world == 1
            with model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext():
                if cfg.loss == "kto":
                    losses, stats = kto_batch(model, train, b, ref, z0, cfg, device, pad_id)
                else:  # the B chosen and the B rejected sequences in one (2B, T) forward
                    seqs = [train[i]["seqs"][0] for i in b] + [train[i]["seqs"][1] for i in b]
                    logps, lengths = forward_logps(model, seqs, device, cfg, pad_id)  # (2B,) sums, token counts
                    losses, reward_c, reward_r = loss_terms(cfg, logps, lengths, ref[b] if ref is not None else None,
                                                            smoothing_of(cfg, [train[i] for i in b]))
                    logp_c, logp_r = logps.detach().chunk(2)
                    stats = {"reward_chosen": reward_c.sum(), "reward_rejected": reward_r.sum(),
                             "accuracy": (reward_c > reward_r).sum(), "logp_chosen": logp_c.sum(),
                             "logp_rejected": logp_r.sum()}
                (losses.sum() / per_rank).backward()  # DDP's gradient mean over ranks makes it the global mean
            for k, v in {"loss": losses.detach().sum(), **stats}.items():
                sums[k] = sums.get(k, 0.0) + v.double()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        sums = C.reduce_sums(sums, device)
        record = {"step": step + 1, "loss": sums["loss"] / n_all, "lr": lr, "grad_norm": grad_norm.item()}
        if cfg.loss == "kto":
            record.update(kto_record(sums, z0))
        else:
            record.update(reward_chosen=sums["reward_chosen"] / n_all, reward_rejected=sums["reward_rejected"] / n_all,
                          margin=(sums["reward_chosen"] - sums["reward_rejected"]) / n_all,
                          accuracy=sums["accuracy"] / n_all, logp_chosen=sums["logp_chosen"] / n_all,
                          logp_rejected=sums["logp_rejected"] / n_all)
        record["examples_s"] = n_all / (time.perf_counter() - t0)
        C.check_finite(record, ("loss", "grad_norm"), last_saved)
        last, stop = step + 1 == end, C.interrupted(device)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 or last:
            record.update(evaluate_held_out(raw, held, ref_held, cfg, device, pad_id, rank, world))
            if cfg.kl_prompts and kl_prompts:
                reference = raw if C.peft_kind(cfg) else C.load_model(cfg.model, device)[0].eval()
                record["kl_ref"] = kl_to_reference(raw, reference, kl_prompts, cfg, enc, device, pad_id, stop_id,
                                                   rank, world)
                del reference
        if rank == 0:
            post = {"loss": f"{record['loss']:.3f}", "margin": f"{record['margin']:.2f}"}
            post.update({short: f"{record[k]:.2f}" for k, short in (("accuracy", "acc"), ("kl_ref", "kl_ref"))
                         if k in record})
            bar.set_postfix(post)
            C.log_jsonl(cfg.log, record)
        metrics = {**metrics, **record}
        if last or stop or cfg.save_every and (step + 1) % cfg.save_every == 0:
            cache = {"ref_logps": ref, "ref_logps_held": ref_held} if ref is not None else {}
            last_saved = C.save_training(cfg, raw, enc, optimizer, step + 1, metrics,
                                         lineage + [cfg.loss if cfg.loss in ("kto", "simpo", "orpo") else "dpo"],
                                         rank, extra={k: v for k, v in cache.items() if v is not None})
        if stop:
            raise C.Interrupted(f"saved {last_saved}; continue with --resume {cfg.out}")
    if rank == 0 and metrics:
        parts = [f"saved {cfg.out}: step {metrics['step']}, loss {metrics['loss']:.4f}"]
        parts += [f"{key} {metrics[key]:.3f}" for key in ("eval_accuracy", "eval_margin", "kl_ref") if key in metrics]
        print(", ".join(parts))


if __name__ == "__main__":
    C.run(main)
