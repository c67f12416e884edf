"""dpo.py: every loss against a hand-written scalar re-derivation and finite differences, the reference cache,
the concatenated forward, each --loss end to end, resume, --limit, gradient accumulation, DDP and bad input.

    python -m pytest tests/test_dpo.py -q
"""
import decimal
import json
import math
import os
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import dpo
import common as C
import model as M
from conftest import (ROOT, assert_one_line_error, assert_refused, assert_resume_equals_straight, assert_same_first_step,
                      assert_same_training, run_script, save_tiny)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
logp = st.floats(-40.0, -0.01)
betas = st.floats(0.01, 2.0)


# ----------------------------------------------------------------------------- independent scalar formulas


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x):
    return math.exp(log_sigmoid(x))


def naive_pair_loss(kind, pc, pr, rc, rr, beta, eps):
    """One pair, written from the papers' formulas with math only (no torch, no code shared with dpo.py)."""
    c, r = pc - rc, pr - rr  # log pi/ref of chosen and rejected
    h = c - r
    if kind == "sigmoid":  # DPO / cDPO: BCE against smoothed labels
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if kind == "hinge":
        return max(0.0, 1.0 - beta * h)
    if kind == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    if kind == "robust":
        return ((1 - eps) * -log_sigmoid(beta * h) - eps * -log_sigmoid(-beta * h)) / (1 - 2 * eps)
    if kind == "bco_pair":
        return -log_sigmoid(beta * c) - log_sigmoid(-beta * r)
    if kind == "sppo_hard":
        return (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2
    if kind == "nca_pair":
        return -log_sigmoid(beta * c) - 0.5 * log_sigmoid(-beta * c) - 0.5 * log_sigmoid(-beta * r)
    if kind == "apo_zero":
        return 1 - sigmoid(beta * c) + sigmoid(beta * r)
    if kind == "apo_down":
        return sigmoid(beta * c) + 1 - sigmoid(beta * h)
    raise AssertionError(kind)


def tensors(*cols):
    return [torch.tensor(c, dtype=torch.float64) for c in cols]


rows4 = st.lists(st.tuples(logp, logp, logp, logp), min_size=1, max_size=6)


# ----------------------------------------------------------------------------- the losses


@FAST
@given(rows4, betas, st.floats(0.0, 0.45), st.sampled_from(dpo.LOSS_TYPES))
def test_preference_losses_match_scalar_loop(rows, beta, eps, kind):
    eps = eps if kind in ("sigmoid", "robust") else 0.0
    pc, pr, rc, rr = tensors(*zip(*rows))
    losses, cr, rj = dpo.preference_loss(pc, pr, rc, rr, beta, kind, eps)
    for i, row in enumerate(rows):
        assert losses[i].item() == pytest.approx(naive_pair_loss(kind, *row, beta, eps), rel=1e-9, abs=1e-9)
        assert cr[i].item() == pytest.approx(beta * (row[0] - row[2]), rel=1e-12, abs=1e-12)
        assert rj[i].item() == pytest.approx(beta * (row[1] - row[3]), rel=1e-12, abs=1e-12)


@FAST
@given(st.lists(st.tuples(logp, logp), min_size=1, max_size=6), betas, st.floats(0.0, 0.45))
def test_dpo_loss_is_log2_when_policy_equals_reference(rows, beta, eps):
    pc, pr = tensors(*zip(*rows))
    for kind in ("sigmoid", "robust"):
        losses, cr, rj = dpo.preference_loss(pc, pr, pc.clone(), pr.clone(), beta, kind, eps)
        torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)))
        assert cr.abs().max() == 0 and rj.abs().max() == 0


@FAST
@given(rows4, betas, st.sampled_from(dpo.LOSS_TYPES))
def test_swapping_chosen_and_rejected_flips_the_rewards(rows, beta, kind):
    pc, pr, rc, rr = tensors(*zip(*rows))
    _, cr, rj = dpo.preference_loss(pc, pr, rc, rr, beta, kind)
    swapped, cr2, rj2 = dpo.preference_loss(pr, pc, rr, rc, beta, kind)
    assert torch.equal(cr, rj2) and torch.equal(rj, cr2)
    if kind == "sigmoid":  # log s(x) - log s(-x) = x: the swapped loss is the loss of the opposite label
        losses = dpo.preference_loss(pc, pr, rc, rr, beta, kind)[0]
        torch.testing.assert_close(swapped - losses, cr - rj)


def test_preference_loss_rejects_unknown_type():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo.preference_loss(x, x, x, x, loss_type="exo")


@FAST
@given(st.lists(st.tuples(logp, logp), min_size=1, max_size=6), betas, st.floats(0.0, 3.0), st.floats(0.0, 0.4))
def test_simpo_matches_scalar_loop(rows, beta, gamma, eps):
    pc, pr = tensors(*zip(*rows))
    losses, cr, rj = dpo.simpo_loss(pc, pr, beta, gamma, eps)
    for i, (c, r) in enumerate(rows):
        z = beta * c - beta * r - gamma  # SimPO Eq. 6 on average log-probs
        want = -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
        assert losses[i].item() == pytest.approx(want, rel=1e-9, abs=1e-9)
        assert cr[i].item() == pytest.approx(beta * c) and rj[i].item() == pytest.approx(beta * r)


@FAST
@given(st.lists(st.tuples(st.floats(-20.0, -1e-3), st.floats(-20.0, -1e-3)), min_size=1, max_size=6), betas)
def test_orpo_matches_scalar_loop(rows, lam):
    pc, pr = tensors(*zip(*rows))
    losses, cr, rj = dpo.orpo_loss(pc, pr, lam)
    for i, (c, r) in enumerate(rows):
        p_c, p_r = math.exp(c), math.exp(r)
        log_odds_ratio = math.log(p_c / (1 - p_c)) - math.log(p_r / (1 - p_r))
        assert losses[i].item() == pytest.approx(-c - lam * log_sigmoid(log_odds_ratio), rel=1e-7, abs=1e-9)
        assert cr[i].item() == pytest.approx(lam * c)
    nll = torch.tensor(3.0, dtype=torch.float64)  # a given NLL replaces the default -avg log p of y_c
    torch.testing.assert_close(dpo.orpo_loss(pc, pr, lam, nll)[0] - nll, losses + pc)


def test_orpo_stays_finite_at_probability_one():
    losses, _, _ = dpo.orpo_loss(torch.tensor([0.0, -1e-12]), torch.tensor([-1.0, -2.0]))
    assert torch.isfinite(losses).all()


def test_log1mexp_is_accurate_on_both_branches():
    x = torch.tensor([-1e-10, -1e-4, -0.5, -0.7, -1.0, -30.0], dtype=torch.float64)
    decimal.getcontext().prec = 50  # the exact value, from 50-digit arithmetic
    want = torch.tensor([float((1 - decimal.Decimal(v).exp()).ln()) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(dpo.log1mexp(x), want, rtol=1e-12, atol=0)


@FAST
@given(st.lists(st.tuples(logp, logp, st.booleans()), min_size=1, max_size=8), betas, st.floats(0.0, 5.0),
       st.floats(0.5, 2.0), st.floats(0.5, 2.0))
def test_kto_matches_scalar_loop(rows, beta, kl, w_d, w_u):
    p, r = tensors(*[[row[i] for row in rows] for i in range(2)])
    labels = torch.tensor([row[2] for row in rows])
    losses, rewards = dpo.kto_loss(p, r, labels, torch.tensor(kl, dtype=torch.float64), beta, w_d, w_u)
    for i, (pi, ref, good) in enumerate(rows):
        ratio = pi - ref
        want = w_d * (1 - sigmoid(beta * (ratio - kl))) if good else w_u * (1 - sigmoid(beta * (kl - ratio)))
        assert losses[i].item() == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert rewards[i].item() == pytest.approx(beta * ratio)


def test_kto_reference_point_is_a_clamped_detached_mean():
    x = torch.tensor([1.0, 2.0, -0.5], requires_grad=True)
    z0 = dpo.kto_kl(x)
    assert z0.item() == pytest.approx(2.5 / 3) and not z0.requires_grad
    assert dpo.kto_kl(torch.tensor([-1.0, -2.0])).item() == 0.0  # a KL estimate is never negative


def _inputs(seed, n=5, low=-6.0, high=-0.1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, generator=g, dtype=torch.float64) * (high - low) + low).requires_grad_() for _ in range(4)]


@pytest.mark.parametrize("kind", dpo.LOSS_TYPES)
def test_gradcheck_preference_losses(kind):
    eps = 0.2 if kind in ("sigmoid", "robust") else 0.0
    for seed in range(3):
        inputs = _inputs(seed)
        assert torch.autograd.gradcheck(lambda *x: dpo.preference_loss(*x, 0.7, kind, eps)[0], inputs)


def test_gradcheck_simpo_orpo_kto():
    pc, pr, r1, r2 = _inputs(0)
    assert torch.autograd.gradcheck(lambda a, b: dpo.simpo_loss(a, b, 2.0, 0.5, 0.1)[0], (pc, pr))
    assert torch.autograd.gradcheck(lambda a, b: dpo.orpo_loss(a, b, 0.3)[0], (pc, pr))
    labels = torch.tensor([True, False, True, False, False])
    kl = torch.tensor(0.3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: dpo.kto_loss(a, b, labels, kl, 0.5, 1.2, 0.8)[0], (pc, r1))


@FAST
@given(st.lists(st.tuples(logp, logp, logp, logp, st.integers(1, 30), st.integers(1, 30)), min_size=1, max_size=5),
       betas)
def test_ipo_in_the_loop_is_trl_per_token_normalisation(rows, beta):
    """The loop divides sums by lengths before preference_loss: TRL's IPO, (c/|y_c| - r/|y_r| - 1/(2 beta))^2."""
    pc, pr, rc, rr, nc, nr = tensors(*zip(*rows))
    cfg = dpo.Config(loss="ipo", beta=beta)
    losses, _, _ = dpo.loss_terms(cfg, torch.cat([pc, pr]), torch.cat([nc, nr]), torch.stack([rc, rr], 1))
    for i, (a, b, c, d, n1, n2) in enumerate(rows):
        want = ((a - c) / n1 - (b - d) / n2 - 1 / (2 * beta)) ** 2
        assert losses[i].item() == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_sequence_logps_sums_the_masked_tokens(enc):
    torch.manual_seed(0)
    logits = torch.randn(2, 6, enc.n_vocab)
    ids = torch.randint(0, 256, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    sums, counts = dpo.sequence_logps(logits, ids, mask)
    for b in range(2):
        want = sum(torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]].item() for t in range(1, 6) if mask[b, t])
        assert sums[b].item() == pytest.approx(want, rel=1e-5)
    assert counts.tolist() == [3, 5]


# ----------------------------------------------------------------------------- data and forwards


@pytest.fixture
def tiny_ckpt(tmp_path, enc):  # larger weights than the init: policy and reference visibly differ after a step
    return save_tiny(tmp_path / "init.pt", enc, std=0.05)


def head(path, n, out):
    with open(path) as f, open(out, "w") as g:
        for _ in range(n):
            g.write(next(f))
    return str(out)


@pytest.fixture
def prefs(tmp_path, toy_dir):
    return head(os.path.join(toy_dir, "prefs.jsonl"), 24, tmp_path / "prefs.jsonl")


@pytest.fixture
def kto_data(tmp_path, toy_dir):
    return head(os.path.join(toy_dir, "kto.jsonl"), 24, tmp_path / "kto.jsonl")


def test_tokenized_pairs_share_the_prompt_and_mask_only_the_response(enc, prefs):
    cfg = dpo.Config(data=prefs, seq_len=80, eval_frac=0.0)
    train, held, truncated = dpo.load_examples(cfg, enc)
    assert len(train) == 24 and not held and truncated > 0  # 80 tokens cut some pairs
    end = C.special_id(enc, "<|im_end|>")
    records = C.read_jsonl(prefs, "pref")
    for ex, rec in zip(train, records):
        (c, sc), (r, sr) = ex["seqs"]
        assert sc == sr and c[:sc] == r[:sr]  # the same (possibly truncated) prompt before both responses
        assert len(c) <= 80 and len(r) <= 80
        ids, mask = dpo.collate(ex["seqs"], 0)
        text = enc.decode([t for t, m in zip(ids[0].tolist(), mask[0].tolist()) if m])
        assert rec["chosen"].startswith(text.replace("<|im_end|>", "")[:20])
        if len(c) < 80:  # untruncated: the response ends with its <|im_end|>
            assert c[-1] == end and text == rec["chosen"] + "<|im_end|>"


def test_held_out_split_is_by_prompt(enc, toy_dir):
    cfg = dpo.Config(data=os.path.join(toy_dir, "prefs.jsonl"), eval_frac=0.2)
    train, held, _ = dpo.load_examples(cfg, enc)
    key = lambda ex: json.dumps(ex["prompt"])  # noqa: E731
    assert 0.1 < len(held) / (len(train) + len(held)) < 0.3
    assert not {key(e) for e in train} & {key(e) for e in held}


def test_kto_mismatched_completion_is_the_previous_examples(enc, kto_data):
    cfg = dpo.Config(loss="kto", data=kto_data, eval_frac=0.0)
    train, _, _ = dpo.load_examples(cfg, enc)
    for i, ex in enumerate(train):
        (own, s), (other, s2) = ex["seqs"]
        prev = train[i - 1]["seqs"][0]
        assert own[:s] == other[:s2] and other[s2:] == prev[0][prev[1]:]  # same prompt, the previous completion


def tiny_model_and_pairs(tiny_ckpt, prefs, enc):
    model, _, _ = C.load_model(tiny_ckpt)
    train, _, _ = dpo.load_examples(dpo.Config(data=prefs, seq_len=128, eval_frac=0.0), enc)
    return model.eval(), train


def test_concatenated_forward_equals_two_separate_forwards(tiny_ckpt, prefs, enc):
    model, train = tiny_model_and_pairs(tiny_ckpt, prefs, enc)
    cfg, pad = dpo.Config(), C.special_id(enc, "<|pad|>")
    chosen, rejected = [ex["seqs"][0] for ex in train[:6]], [ex["seqs"][1] for ex in train[:6]]
    with torch.no_grad():
        together, n_together = dpo.forward_logps(model, chosen + rejected, torch.device("cpu"), cfg, pad)
        c, nc = dpo.forward_logps(model, chosen, torch.device("cpu"), cfg, pad)
        r, nr = dpo.forward_logps(model, rejected, torch.device("cpu"), cfg, pad)
        one_by_one = torch.stack([dpo.forward_logps(model, [s], torch.device("cpu"), cfg, pad)[0][0]
                                  for s in chosen + rejected])
    torch.testing.assert_close(together, torch.cat([c, r]), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-4)
    assert torch.equal(n_together, torch.cat([nc, nr]))


def live_reference(path, examples, enc):
    """A fresh reference model's log-probs of each example, one sequence at a time: (N, 2)."""
    ref, _, _ = C.load_model(path)
    ref.eval()
    pad = C.special_id(enc, "<|pad|>")
    with torch.no_grad():
        return torch.tensor([[dpo.forward_logps(ref, [s], torch.device("cpu"), dpo.Config(), pad)[0][0].item()
                              for s in ex["seqs"]] for ex in examples])


@pytest.mark.parametrize("lora", [False, True])
def test_cached_reference_equals_a_live_reference_forward(tmp_path, tiny_ckpt, prefs, enc, lora):
    """The cache written into the checkpoint after training equals a live forward of the untouched --model;
    with LoRA, the trained model with its adapters off is that reference too."""
    out = str(tmp_path / "dpo.pt")
    dpo.main(["--model", tiny_ckpt, "--data", prefs, "--out", out, "--steps", "2", "--seq-len", "128",
              "--batch-size", "4", "--eval-frac", "0", "--kl-prompts", "0", "--lr", "1e-2", "--warmup", "0",
              "--ref-batch-size", "7"] + (["--lora-rank", "4"] if lora else []))
    cache = C.load_checkpoint(out)["train_state"]["ref_logps"]
    train, _, _ = dpo.load_examples(dpo.Config(data=prefs, seq_len=128, eval_frac=0.0), enc)
    live = live_reference(tiny_ckpt, train, enc)
    torch.testing.assert_close(cache, live, rtol=1e-5, atol=1e-4)
    trained = live_reference(out, train, enc)  # the policy moved away from the reference
    assert (trained - live).abs().max() > 1e-2
    if lora:
        model, _, _ = C.load_model(tiny_ckpt)
        M.apply_lora(model, 4)
        model.load_state_dict(C.load_checkpoint(out)["train_state"]["lora"], strict=False)
        pad = C.special_id(enc, "<|pad|>")
        with M.lora_disabled(model), torch.no_grad():
            off = dpo.reference_logps(model, train, dpo.Config(ref_batch_size=5), torch.device("cpu"), pad)
        torch.testing.assert_close(off, live, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- the loop


def common(ckpt, data, out, *extra):
    return ["--model", ckpt, "--data", data, "--out", out, "--seq-len", "128", "--batch-size", "4",
            "--eval-frac", "0.2", "--kl-prompts", "2", "--kl-max-new-tokens", "8", "--warmup", "1", *extra]


def test_first_step_loss_is_log2_when_policy_is_the_reference(tmp_path, tiny_ckpt, prefs):
    log = tmp_path / "log.jsonl"
    dpo.main(common(tiny_ckpt, prefs, str(tmp_path / "o.pt"), "--steps", "1", "--log", str(log)))
    first = json.loads(log.read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # only padding-shape float noise
    assert abs(first["margin"]) < 1e-3


@pytest.mark.parametrize("loss", dpo.LOSSES)
def test_every_loss_trains_in_process(tmp_path, tiny_ckpt, prefs, kto_data, loss):
    extra = {"robust": ["--label-smoothing", "0.1"], "sigmoid": ["--label-smoothing", "0.1"],
             "simpo": ["--beta", "2.0"], "kto": ["--desirable-weight", "1.2"]}.get(loss, [])
    log, out = tmp_path / "log.jsonl", str(tmp_path / "o.pt")
    dpo.main(common(tiny_ckpt, kto_data if loss == "kto" else prefs, out, "--steps", "2", "--loss", loss,
                    "--log", str(log), "--lr", "1e-3", *extra))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    last = records[-1]
    for key in ("loss", "reward_chosen", "reward_rejected", "margin", "eval_loss", "kl_ref", "grad_norm"):
        assert math.isfinite(last[key]), key
    assert ("kl" in last) == (loss == "kto") and ("accuracy" in last) == (loss != "kto")
    ckpt = C.load_checkpoint(out)
    assert ckpt["step"] == 2 and ckpt["args"]["loss"] == loss
    assert ("ref_logps" in ckpt["train_state"]) == (loss not in dpo.REFERENCE_FREE)
    before = C.load_checkpoint(tiny_ckpt)["model"]
    assert any(not torch.equal(before[k], ckpt["model"][k]) for k in before)


@pytest.mark.parametrize("loss, lora", [("sigmoid", False), ("sigmoid", True), ("kto", False)])
def test_resume_equals_straight_run(tmp_path, tiny_ckpt, prefs, kto_data, loss, lora):
    data = kto_data if loss == "kto" else prefs
    args = common(tiny_ckpt, data, "", "--steps", "4", "--loss", loss, "--eval-every", "2", "--lr", "1e-3")
    args = args[:4] + args[6:]  # --out is set per run below
    if lora:
        args += ["--lora-rank", "4", "--lora-dropout", "0.1"]
    dpo.main(args + ["--out", str(tmp_path / "straight.pt")])
    dpo.main(args + ["--out", str(tmp_path / "part.pt"), "--stop-at", "2"])
    assert C.load_checkpoint(str(tmp_path / "part.pt"))["step"] == 2
    dpo.main(args + ["--out", str(tmp_path / "resumed.pt"), "--resume", str(tmp_path / "part.pt")])
    a = C.load_checkpoint(str(tmp_path / "straight.pt"))["model"]
    b = C.load_checkpoint(str(tmp_path / "resumed.pt"))["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-exact on CPU


@pytest.mark.parametrize("loss", ["sigmoid", "kto"])
def test_limit_equals_a_file_of_the_first_n_records(tmp_path, tiny_ckpt, prefs, kto_data, toy_dir, loss):
    """--limit 24 on the whole file is the run on a file of its first 24 lines (`prefs` / `kto_data`): the same
    held-out split, every logged number (eval and kl_ref included) and the same weights, bit for bit; the
    reference cache holds those 24 records' rows and no more."""
    small = kto_data if loss == "kto" else prefs
    whole = os.path.join(toy_dir, os.path.basename(small))
    args = ["--steps", "2", "--loss", loss, "--lr", "1e-3"]
    runs = {"limit": (whole, ["--limit", "24"]), "file": (small, [])}
    for name, (data, extra) in runs.items():
        dpo.main(common(tiny_ckpt, data, str(tmp_path / f"{name}.pt"), *args, *extra,
                        "--log", str(tmp_path / f"{name}.jsonl")))
    logs = {name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
            for name in runs}
    for record in logs["limit"] + logs["file"]:
        record.pop("examples_s")  # time
    assert logs["limit"] == logs["file"] and "eval_loss" in logs["limit"][-1] and "kl_ref" in logs["limit"][-1]
    a, b = (C.load_checkpoint(str(tmp_path / f"{name}.pt")) for name in runs)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ref, held = a["train_state"]["ref_logps"], a["train_state"]["ref_logps_held"]
    assert len(ref) + len(held) == 24 and len(held) > 0  # eval-frac 0.2 held some of the 24 out
    assert torch.equal(ref, b["train_state"]["ref_logps"]) and torch.equal(held, b["train_state"]["ref_logps_held"])


def test_resume_with_limit_sees_the_same_data(tmp_path, tiny_ckpt, toy_dir):
    """A run resumed with the same --limit continues the straight run bit for bit; another --limit is refused
    (its reference cache no longer matches the data)."""
    args = common(tiny_ckpt, os.path.join(toy_dir, "prefs.jsonl"), "", "--steps", "4", "--lr", "1e-3",
                  "--kl-prompts", "0", "--limit", "24")
    args = args[:4] + args[6:]  # --out is set per run below
    assert_resume_equals_straight(dpo.main, args, tmp_path)
    with pytest.raises(M.UserError, match="--limit"):
        dpo.main(args + ["--limit", "30", "--out", str(tmp_path / "other.pt"), "--resume", str(tmp_path / "part.pt")])


@pytest.mark.parametrize("loss", ["sigmoid", "kto"])
def test_grad_accum_equals_one_big_batch(tmp_path, tiny_ckpt, prefs, kto_data, loss):
    data = kto_data if loss == "kto" else prefs
    base = ["--model", tiny_ckpt, "--data", data, "--seq-len", "128", "--steps", "2", "--eval-frac", "0",
            "--warmup", "0", "--lr", "1e-3", "--loss", loss, "--kl-prompts", "0"]
    dpo.main(base + ["--out", str(tmp_path / "a.pt"), "--batch-size", "8", "--log", str(tmp_path / "a.jsonl")])
    dpo.main(base + ["--out", str(tmp_path / "b.pt"), "--batch-size", "2", "--grad-accum", "4",
                     "--log", str(tmp_path / "b.jsonl")])
    a, b = C.load_checkpoint(str(tmp_path / "a.pt"))["model"], C.load_checkpoint(str(tmp_path / "b.pt"))["model"]
    assert_same_first_step(tmp_path / "a.jsonl", tmp_path / "b.jsonl")  # summation order and padding widths differ
    assert_same_training(a, b, lr=1e-3, steps=2)


def test_ddp_two_processes_equal_one(tmp_path, tiny_ckpt, prefs):
    """torchrun --nproc_per_node=2 (gloo, CPU) with 4 pairs per rank == one process with 8."""
    base = ["--model", tiny_ckpt, "--data", prefs, "--seq-len", "128", "--steps", "2", "--eval-frac", "0.2",
            "--warmup", "0", "--lr", "1e-3", "--kl-prompts", "2", "--kl-max-new-tokens", "4", "--device", "cpu"]
    log_ddp, log_one = tmp_path / "ddp.jsonl", tmp_path / "one.jsonl"
    run_script("-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "dpo.py", "--", *base,
               "--out", str(tmp_path / "ddp.pt"), "--batch-size", "4", "--log", str(log_ddp),
               env={"OMP_NUM_THREADS": "1"})
    dpo.main(base + ["--out", str(tmp_path / "one.pt"), "--batch-size", "8", "--log", str(log_one)])
    a, b = C.load_checkpoint(str(tmp_path / "ddp.pt")), C.load_checkpoint(str(tmp_path / "one.pt"))
    assert_same_first_step(log_ddp, log_one)
    assert_same_training(a["model"], b["model"], lr=1e-3, steps=2)
    torch.testing.assert_close(a["train_state"]["ref_logps"], b["train_state"]["ref_logps"], rtol=1e-5, atol=1e-4)
    ra, rb = (json.loads(p.read_text().splitlines()[-1]) for p in (log_ddp, log_one))
    for key in ("loss", "accuracy", "margin", "eval_loss", "eval_accuracy"):
        assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), key


# ----------------------------------------------------------------------------- the script as a user runs it


def test_smoke_subprocess_on_the_built_in_world(tmp_path, tiny_ckpt, toy_dir):
    log = tmp_path / "log.jsonl"
    proc = run_script("dpo.py", *common(tiny_ckpt, os.path.join(toy_dir, "prefs.jsonl"), str(tmp_path / "d.pt"),
                                        "--steps", "3", "--log", str(log), "--eval-every", "2"),
                      env={"OMP_NUM_THREADS": "1"})
    assert "saved" in proc.stdout and "reference log-probs" in proc.stdout
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and "eval_accuracy" in records[1] and "kl_ref" in records[2]
    ckpt = C.load_checkpoint(str(tmp_path / "d.pt"))
    assert ckpt["lineage"][-1] == "dpo" and ckpt["config"]["head"] == "lm"


@pytest.mark.parametrize("kind, line, message", [
    ("pref", "{not json", "invalid JSON"),
    ("pref", '{"prompt": "hi", "chosen": "a"}', "missing field 'rejected'"),
    ("pref", '{"prompt": 3, "chosen": "a", "rejected": "b"}', "wrong type"),
    ("kto", '{"prompt": "hi", "completion": "a", "label": "yes"}', "wrong type"),
])
def test_bad_data_exits_2_with_file_and_line(tmp_path, tiny_ckpt, kind, line, message):
    good = {"pref": {"prompt": "hi", "chosen": "a", "rejected": "b"},
            "kto": {"prompt": "hi", "completion": "a", "label": True}}[kind]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + line + "\n")
    proc = run_script("dpo.py", "--model", tiny_ckpt, "--data", str(path), "--out", str(tmp_path / "o.pt"),
                      "--steps", "1", "--seq-len", "64", "--loss", "kto" if kind == "kto" else "sigmoid", check=False)
    assert_one_line_error(proc, f"{path}:3:", message)
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("args, message", [
    (["--loss", "dpo2"], "choose from"),
    (["--loss", "robust", "--label-smoothing", "0.5"], "0 <= --label-smoothing < 0.5"),
    (["--loss", "ipo", "--label-smoothing", "0.1"], "is read only by"),
    (["--beta", "0"], "must be > 0"),
    (["--limit", "-1"], "--limit -1 must be >= 0"),
    (["--desirable-weight", "2"], "KTO's"),
    (["--model", "missing.pt"], "no such checkpoint"),
])
def test_impossible_flags_exit_2(tmp_path, tiny_ckpt, prefs, args, message):
    assert_refused("dpo.py", "--model", tiny_ckpt, "--data", prefs, "--out", str(tmp_path / "o.pt"), "--steps", "1",
                   *args, message=message)


def test_reward_model_is_refused_as_policy(tmp_path, tiny_ckpt, prefs):
    rm, enc, _ = C.load_model(tiny_ckpt, head="scalar")
    C.save_checkpoint(str(tmp_path / "rm.pt"), rm, enc)
    proc = run_script("dpo.py", "--model", str(tmp_path / "rm.pt"), "--data", prefs, "--out",
                      str(tmp_path / "o.pt"), "--steps", "1", check=False)
    assert proc.returncode == 2 and "scalar head" in proc.stderr


def test_help_lists_every_field():
    proc = run_script("dpo.py", "--help")
    for f in dpo.Config.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in proc.stdout
    assert "Rafailov" in proc.stdout


# ----------------------------------------------------------------------------- benchmark


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's peak RSS


@pytest.mark.slow
def test_bench_dpo(toy_dir):
    """DPO training steps/s and peak memory on the tiny config (JSON in out/bench/dpo.json), the concatenated
    chosen+rejected forward against two forwards, and the reference-cache pass. Measured, never asserted. Torch
    uses its default threads (set OMP_NUM_THREADS=1 on a shared machine: oversubscribed threads thrash).

        OMP_NUM_THREADS=1 python -m pytest tests/test_dpo.py -q -s -m slow -k bench      (or: make bench)"""
    enc = C.get_tokenizer("byte")
    device = C.pick_device("auto")
    cfg = dpo.Config(data=os.path.join(toy_dir, "prefs.jsonl"), seq_len=256, eval_frac=0.0, batch_size=16,
                     ref_batch_size=64)
    train, _, _ = dpo.load_examples(cfg, enc)
    pad = C.special_id(enc, "<|pad|>")
    rss_before = peak_memory_mb(torch.device("cpu"))
    torch.manual_seed(0)
    model = M.build_model("tiny", enc).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    t0 = time.perf_counter()
    ref = dpo.reference_logps(model, train[:512], cfg, device, pad)
    sync()
    ref_seconds = time.perf_counter() - t0
    result = {"config": "tiny", "params": model.num_params(), "device": str(device), "dtype": "fp32" if
              device.type != "cuda" else "bf16 autocast", "torch_threads": torch.get_num_threads(),
              "batch_pairs": cfg.batch_size, "seq_len": cfg.seq_len,
              "mean_pair_tokens": sum(len(s) for ex in train for s, _ in ex["seqs"]) / len(train),
              "ref_cache_sequences_per_s": 2 * 512 / ref_seconds}
    opt = C.make_optimizer(model, 1e-5)
    steps = 10 if device.type == "cpu" else 50
    times = {"concatenated": [], "two_forwards": []}
    for step in range(steps + 1):
        b = list(range(step * cfg.batch_size % 512, step * cfg.batch_size % 512 + cfg.batch_size))
        chosen, rejected = [train[i]["seqs"][0] for i in b], [train[i]["seqs"][1] for i in b]
        for mode in times:  # interleaved, so a busy neighbour on a shared machine slows both alike
            sync()
            t0 = time.perf_counter()
            if mode == "concatenated":
                s, n = dpo.forward_logps(model, chosen + rejected, device, cfg, pad)
            else:
                (s1, n1), (s2, n2) = (dpo.forward_logps(model, x, device, cfg, pad) for x in (chosen, rejected))
                s, n = torch.cat([s1, s2]), torch.cat([n1, n2])
            losses, _, _ = dpo.loss_terms(cfg, s, n, ref[b])
            losses.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if step:  # the first step warms up the allocator and kernels
                times[mode].append(time.perf_counter() - t0)
    for mode, t in times.items():
        result[mode] = {"steps_per_s": len(t) / sum(t), "pairs_per_s": cfg.batch_size * len(t) / sum(t)}
    result["peak_memory_mb"] = peak_memory_mb(device)
    result["peak_memory_kind"] = "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"
    if device.type == "cpu":  # what the model, reference pass and training steps added to the process's peak
        result["peak_rss_increase_mb"] = result["peak_memory_mb"] - rss_before
    os.makedirs(os.path.join(ROOT, "out", "bench"), exist_ok=True)
    with open(os.path.join(ROOT, "out", "bench", "dpo.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
