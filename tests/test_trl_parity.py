"""Slow: our losses and gradients against TRL's trainers on the same weights and the same fixed inputs.

    make bench-trl      (installs TRL, a benchmark-only dependency; this file skips where it is not installed)

The same weights: our tiny Llama and its `export_hf` copy loaded by transformers. The same inputs: completions
sampled once by our sampler, fixed rewards, the same advantages, handed to TRL's `compute_loss` as the
pre-generated batch its trainers build for themselves (so nothing is generated twice). Our side runs the
functions ppo.py's loop runs, with the flags its docstring names for TRL's settings. Checked: the loss, and the
gradient of every parameter, to 1e-4 relative (float32; the two forwards differ only in reduction order).
Off-policy rows use "old" log-probs of a perturbed copy, so ratios leave 1 and clipping acts.
"""
import copy

import pytest
import torch

import common as C
import formats
import model as M
import ppo
from conftest import hf_tokenizer

trl = pytest.importorskip("trl", reason="TRL is not installed here (make bench-trl installs it)")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.slow

GROUP, PROMPTS, NEW = 2, 4, 12


def perturbed(model, std, seed):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return out


def hf_copy(model, enc, path):
    formats.export_hf(model, enc, str(path))
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                             attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The policy, the reference (its starting weights), an "old" policy, their HF copies, a fixed rollout."""
    tmp = tmp_path_factory.mktemp("parity")
    enc = C.get_tokenizer("byte")
    torch.manual_seed(0)
    ref = M.build_model("tiny", enc, n_layer=2, d_model=64, d_ff=128, n_head=4, n_kv_head=2, max_seq_len=256,
                        dropout=0.0)
    policy, old = perturbed(ref, 0.02, 1), perturbed(ref, 0.02, 2)
    chats = ["What is 2 + 3?", "Reverse the word 'cat'.", "Hi", "Name a colour."]
    prompt_ids = [C.render_chat(enc, [{"role": "user", "content": c}], add_generation_prompt=True)[0]
                  for c in chats for _ in range(GROUP)]
    cfg = ppo.Config(max_new_tokens=NEW, dtype="fp32")
    roll = ppo.sample(policy.eval(), prompt_ids, cfg, enc, torch.device("cpu"), 1.0, torch.Generator().manual_seed(0))
    rewards = torch.randn(len(prompt_ids), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the full softmax, as TRL scores tokens (our trainer also bans never-sampled ids)
        ref_logp = ppo.response_logprobs(ref, roll["seq"], roll["attn"], roll["P"], 1.0)[0]
        old_logp = ppo.response_logprobs(old, roll["seq"], roll["attn"], roll["P"], 1.0)[0]
    return dict(enc=enc, ref=ref.eval(), policy=policy.train(), hf_policy=hf_copy(policy, enc, tmp / "policy").train(),
                roll=roll, rewards=rewards, ref_logp=ref_logp, old_logp=old_logp, tmp=tmp)


def our_grads(model):
    return formats.ours_to_hf({n: p.grad for n, p in model.named_parameters()}, model.cfg)


WORST = {"loss": 0.0, "grad": 0.0}  # largest |loss difference| and relative gradient difference, printed (-s)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print(f"\nTRL parity: largest |loss difference| {WORST['loss']:.1e}, largest gradient difference "
          f"{WORST['grad']:.1e} of the tensor's largest entry")


def assert_close_grads(ours, hf_model, rel=1e-4):
    """Every parameter's gradient: max |ours - theirs| <= rel * max |theirs| over that tensor."""
    for name, p in hf_model.named_parameters():
        scale = max(p.grad.abs().max().item(), 1e-6)
        diff = (ours[name] - p.grad).abs().max().item()
        WORST["grad"] = max(WORST["grad"], diff / scale)
        assert diff <= rel * scale, (name, diff, scale)


def assert_same(loss, theirs, model, hf_model, rel=1e-4):
    WORST["loss"] = max(WORST["loss"], abs(loss.item() - theirs.item()))
    assert loss.item() == pytest.approx(theirs.item(), rel=rel, abs=1e-7)
    assert_close_grads(our_grads(model), hf_model, rel)


def zero(*models):
    for m in models:
        m.zero_grad(set_to_none=True)


def grpo_trainer(world, **kw):
    args = trl.GRPOConfig(output_dir=str(world["tmp"] / "grpo"), per_device_train_batch_size=GROUP * PROMPTS,
                          num_generations=GROUP, max_completion_length=NEW, report_to="none", use_cpu=True,
                          bf16=False, fp16=False, logging_steps=1, save_strategy="no", **kw)
    data = datasets.Dataset.from_dict({"prompt": ["x"] * (GROUP * PROMPTS)})
    trainer = trl.GRPOTrainer(model=world["hf_policy"], reward_funcs=lambda completions, **_: [0.0] * len(completions),
                              args=args, train_dataset=data, processing_class=hf_tokenizer(world["enc"]))
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def trl_inputs(world, advantages, off_policy, beta):
    r = world["roll"]
    P = r["P"]
    inputs = {"prompt_ids": r["seq"][:, :P], "prompt_mask": r["attn"][:, :P], "completion_ids": r["seq"][:, P:],
              "completion_mask": r["attn"][:, P:], "advantages": advantages,
              "num_items_in_batch": r["mask"].sum()}
    if off_policy:
        inputs["old_per_token_logps"] = world["old_logp"]
    if beta:
        inputs["ref_per_token_logps"] = world["ref_logp"]
    return inputs


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("off_policy", [False, True])
def test_grpo_loss_and_gradients_equal_trl(world, loss_type, level, beta, off_policy):
    """GRPOTrainer (its defaults but for the named settings) == ppo.py --advantage grpo --loss-type <loss_type>
    --ratio <token | gspo> --kl-penalty loss --kl-estimator k3_ratio --kl-coef <beta>."""
    trainer = grpo_trainer(world, loss_type=loss_type, importance_sampling_level=level, beta=beta)
    r, policy, hf_policy = world["roll"], world["policy"], world["hf_policy"]
    mask, P = r["mask"], r["P"]
    advantages = ppo.group_advantages(world["rewards"], GROUP, "grpo")
    zero(policy, hf_policy)
    theirs = trainer.compute_loss(hf_policy, trl_inputs(world, advantages, off_policy, beta))
    theirs.backward()

    ratio = {"token": "token", "sequence": "gspo"}[level]
    logp = ppo.response_logprobs(policy, r["seq"], r["attn"], P, 1.0)[0]
    old = world["old_logp"] if off_policy else logp.detach()
    pg, _, _ = ppo.ppo_losses(logp, old, advantages[:, None] * mask, 0.2, mask=mask, level=ratio)
    if beta:
        pg = pg + beta * ppo.kl_estimate(logp, world["ref_logp"], "k3_ratio", ppo.log_ratio(logp, old, mask, ratio))
    ours = ppo.aggregate(pg, mask, loss_type, NEW)
    ours.backward()
    assert_same(ours, theirs, policy, hf_policy)


@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("off_policy", [False, True])
def test_rloo_loss_and_gradients_equal_trl(world, beta, off_policy):
    """RLOOTrainer == ppo.py --advantage rloo --ratio sequence --loss-type grpo --kl-penalty reward --kl-estimator k1
    --kl-coef <beta>: the advantages (KL in the reward, leave-one-out baseline), the loss and every gradient."""
    args = trl.RLOOConfig(output_dir=str(world["tmp"] / "rloo"), per_device_train_batch_size=GROUP * PROMPTS,
                          num_generations=GROUP, max_completion_length=NEW, report_to="none", use_cpu=True,
                          bf16=False, fp16=False, logging_steps=1, save_strategy="no", beta=beta)
    data = datasets.Dataset.from_dict({"prompt": ["x"] * (GROUP * PROMPTS)})
    trainer = trl.RLOOTrainer(model=world["hf_policy"], reward_funcs=lambda completions, **_: [0.0] * len(completions),
                              args=args, train_dataset=data, processing_class=hf_tokenizer(world["enc"]))
    trainer.current_gradient_accumulation_steps = 1
    r, policy, hf_policy = world["roll"], world["policy"], world["hf_policy"]
    mask, P = r["mask"], r["P"]
    with torch.no_grad():
        now = ppo.response_logprobs(policy, r["seq"], r["attn"], P, 1.0)[0]
    sampled = world["old_logp"] if off_policy else now  # the log-probs at sampling time
    # TRL's advantages, as RLOOTrainer computes them: rewards - beta * sum_t (old - ref), minus the mean of the others
    rewards = world["rewards"] - beta * ((sampled - world["ref_logp"]) * mask).sum(1)
    grouped = rewards.view(-1, GROUP)
    theirs_adv = (grouped - (grouped.sum(1, keepdim=True) - grouped) / (GROUP - 1)).reshape(-1)
    cfg = ppo.Config(advantage="rloo", group_size=GROUP, kl_penalty="reward", kl_estimator="k1", kl_coef=beta)
    ours_adv, _ = ppo.compute_advantages(cfg, world["rewards"], beta * ppo.kl_estimate(sampled, world["ref_logp"])
                                         * mask, None, mask)
    torch.testing.assert_close(ours_adv, theirs_adv[:, None] * mask, rtol=1e-6, atol=1e-6)

    zero(policy, hf_policy)
    inputs = {"prompt_ids": r["seq"][:, :P], "prompt_mask": r["attn"][:, :P], "completion_ids": r["seq"][:, P:],
              "completion_mask": r["attn"][:, P:], "advantages": theirs_adv, "old_logps": (sampled * mask).sum(1)}
    theirs = trainer.compute_loss(hf_policy, inputs)
    theirs.backward()
    logp = ppo.response_logprobs(policy, r["seq"], r["attn"], P, 1.0)[0]
    pg, _, _ = ppo.ppo_losses(logp, sampled, ours_adv, 0.2, mask=mask, level="sequence")
    ours = ppo.aggregate(pg, mask, "grpo")
    ours.backward()
    assert_same(ours, theirs, policy, hf_policy)


# ----------------------------------------------------------------------------- DPO and the reward model


@pytest.fixture(scope="module")
def pairs(world, toy_dir):
    """Eight preference pairs of the built-in world as dpo.py tokenises them, and the reference log-probs."""
    import dpo
    cfg = dpo.Config(data=f"{toy_dir}/prefs.jsonl", seq_len=128, eval_frac=0.0)
    train, _, _ = dpo.load_examples(cfg, world["enc"])
    return train[:8]


class PreTokenizedDPOTrainer(trl.DPOTrainer):
    def _prepare_dataset(self, dataset, *args, **kwargs):
        return dataset


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
                                  "robust"])
def test_dpo_loss_and_gradients_equal_trl(world, pairs, loss):
    """DPOTrainer(loss_type=[loss]) on pre-tokenised rows with precomputed reference log-probs == dpo.py --loss
    <loss>: the batch mean of the loss and every gradient."""
    import dpo
    enc, policy, hf_policy = world["enc"], world["policy"], world["hf_policy"]
    pad, cpu = C.special_id(enc, "<|pad|>"), torch.device("cpu")
    smoothing = 0.1 if loss == "robust" else 0.0
    cfg = dpo.Config(loss=loss, beta=0.1, label_smoothing=smoothing, dtype="fp32")
    with torch.no_grad():
        ref = dpo.reference_logps(world["ref"], pairs, cfg, cpu, pad)  # (N, 2), as dpo.py caches it
    rows = [{"prompt_ids": c[:s], "chosen_ids": c[s:], "rejected_ids": r[s:], "ref_chosen_logps": ref[i, 0].item(),
             "ref_rejected_logps": ref[i, 1].item()} for i, ex in enumerate(pairs)
            for (c, s), (r, _) in [ex["seqs"]]]
    args = trl.DPOConfig(output_dir=str(world["tmp"] / "dpo"), per_device_train_batch_size=len(rows), beta=0.1,
                         loss_type=[loss], label_smoothing=smoothing, precompute_ref_log_probs=True,
                         report_to="none", use_cpu=True, bf16=False, fp16=False, save_strategy="no", max_length=None)
    plain = [{k: v for k, v in row.items() if not k.startswith("ref_")} for row in rows]  # TRL caches its own
    trainer = PreTokenizedDPOTrainer(model=world["hf_policy"], args=args,
                                     train_dataset=datasets.Dataset.from_list(plain),
                                     processing_class=hf_tokenizer(enc))  # ...but compute_loss reads ours
    zero(policy, hf_policy)
    theirs = trainer.compute_loss(hf_policy, trainer.data_collator(rows))
    theirs.backward()
    seqs = [ex["seqs"][0] for ex in pairs] + [ex["seqs"][1] for ex in pairs]
    sums, counts = dpo.forward_logps(policy, seqs, cpu, cfg, pad)
    ours = dpo.loss_terms(cfg, sums, counts, ref)[0].mean()
    ours.backward()
    assert_same(ours, theirs, policy, hf_policy)


@pytest.mark.parametrize("margin,center", [(False, None), (True, 0.01)])
def test_reward_model_loss_and_gradients_equal_trl(world, pairs, margin, center):
    """RewardTrainer on pre-tokenised rows == reward.py: the Bradley-Terry loss (with the data's margins, with
    --center-rewards-coef) and every gradient; the score read at the last real token by both."""
    import reward
    enc, cpu = world["enc"], torch.device("cpu")
    pad = C.special_id(enc, "<|pad|>")
    ours_rm = C.load_model(save_policy(world), head="scalar")[0].train()
    with torch.no_grad():
        torch.nn.init.normal_(ours_rm.score.weight, std=0.5, generator=torch.Generator().manual_seed(4))
        ours_rm.score.bias.zero_()  # transformers' score head has no bias
    hf_rm = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(world["tmp"] / "policy"), num_labels=1, dtype=torch.float32, attn_implementation="eager")
    hf_rm.config.pad_token_id = pad
    with torch.no_grad():
        hf_rm.score.weight.copy_(ours_rm.score.weight)
    hf_rm.train()
    margins = [0.5 * (i % 3) for i in range(len(pairs))]
    rows = [{"chosen_ids": ex["seqs"][0][0], "rejected_ids": ex["seqs"][1][0], **({"margin": m} if margin else {})}
            for ex, m in zip(pairs, margins)]
    args = trl.RewardConfig(output_dir=str(world["tmp"] / "rm"), per_device_train_batch_size=len(rows),
                            center_rewards_coefficient=center, report_to="none", use_cpu=True, bf16=False,
                            fp16=False, save_strategy="no", max_length=None)
    trainer = trl.RewardTrainer(model=hf_rm, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                processing_class=hf_tokenizer(enc))
    theirs = trainer.compute_loss(hf_rm, trainer.data_collator(rows))
    theirs.backward()
    batch = [{"ids_c": ex["seqs"][0][0], "ids_r": ex["seqs"][1][0]} for ex in pairs]
    r_c, r_r = reward.pair_rewards(ours_rm, *reward.collate(batch, pad), cpu, reward.Config(dtype="fp32"))
    ours = reward.bradley_terry_loss(r_c, r_r, torch.tensor(margins) if margin else None).mean()
    if center:
        ours = ours + center * reward.center_penalty(r_c, r_r)
    ours.backward()
    WORST["loss"] = max(WORST["loss"], abs(ours.item() - theirs.item()))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-4)
    grads = formats.ours_to_hf({n: p.grad for n, p in ours_rm.named_parameters() if n != "score.bias"}, ours_rm.cfg)
    assert_close_grads({**grads, "score.weight": ours_rm.score.weight.grad}, hf_rm)


def save_policy(world):
    path = world["tmp"] / "policy.pt"
    if not path.exists():
        C.save_checkpoint(str(path), world["policy"], world["enc"])
    return str(path)
