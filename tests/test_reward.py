"""reward.py: the Bradley-Terry loss, reward centring, the read-out at the last real token, the score entry point,
held-out and gold-ceiling accuracy, resume, DDP and bad input.

    python -m pytest tests/test_reward.py -q
"""
import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import common as C
import model as M
import reward
from conftest import (assert_one_line_error, assert_refused, assert_resume_equals_straight, assert_same_first_step,
                      assert_same_training, run_script)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
score_values = st.floats(-20.0, 20.0)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ----------------------------------------------------------------------------- the loss


@FAST
@given(st.lists(st.tuples(score_values, score_values, st.floats(-3.0, 3.0)), min_size=1, max_size=8))
def test_bradley_terry_matches_scalar_loop(rows):
    c, r, m = (torch.tensor(col, dtype=torch.float64) for col in zip(*rows))
    with_margin, without = reward.bradley_terry_loss(c, r, m), reward.bradley_terry_loss(c, r)
    for i, (ci, ri, mi) in enumerate(rows):
        assert with_margin[i].item() == pytest.approx(-log_sigmoid(ci - ri - mi), rel=1e-9, abs=1e-12)
        assert without[i].item() == pytest.approx(-log_sigmoid(ci - ri), rel=1e-9, abs=1e-12)


@FAST
@given(st.lists(st.tuples(score_values, score_values), min_size=1, max_size=8))
def test_bradley_terry_properties(rows):
    c, r = (torch.tensor(col, dtype=torch.float64) for col in zip(*rows))
    torch.testing.assert_close(reward.bradley_terry_loss(c, c), torch.full_like(c, math.log(2)))
    # swapping the label: log s(x) - log s(-x) = x
    torch.testing.assert_close(reward.bradley_terry_loss(r, c) - reward.bradley_terry_loss(c, r), c - r)
    assert (reward.bradley_terry_loss(c, r) > 0).all()
    # a margin asks for more: the loss never decreases when the margin grows
    assert (reward.bradley_terry_loss(c, r, 1.0) >= reward.bradley_terry_loss(c, r)).all()


def test_gradcheck_bradley_terry_and_centering():
    g = torch.Generator().manual_seed(0)
    c, r, m = (torch.randn(6, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(reward.bradley_terry_loss, (c, r, m))
    assert torch.autograd.gradcheck(reward.center_penalty, (c, r))


def test_center_penalty_is_mean_squared_pair_sum():
    c, r = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, -0.5])
    assert reward.center_penalty(c, r).item() == pytest.approx((1 + 1 + 0) / 3)
    assert reward.center_penalty(c, -c).item() == 0


def test_preference_accuracy_counts_ties_half():
    acc = reward.preference_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0]))
    assert acc.tolist() == [1.0, 0.5, 0.0]


# ----------------------------------------------------------------------------- the read-out


@FAST
@given(st.lists(st.integers(1, 9), min_size=1, max_size=5), st.booleans())
def test_reward_is_read_at_the_last_real_token_never_a_pad(lengths, left):
    T = max(lengths) + 2
    values = torch.full((len(lengths), T), 1e6)  # pads hold absurd values: reading one would show
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    want = []
    for i, n in enumerate(lengths):
        cols = range(T - n, T) if left else range(n)
        for j, t in enumerate(cols):
            values[i, t], mask[i, t] = float(10 * i + j), 1
        want.append(float(10 * i + n - 1))
    assert M.last_token_values(values, mask).tolist() == want


@pytest.fixture
def rm_and_enc(enc):
    torch.manual_seed(0)
    rm = M.build_model("tiny", enc, n_layer=2, d_model=64, d_ff=128, max_seq_len=128, head="scalar").eval()
    torch.nn.init.normal_(rm.score.weight, std=0.5)  # a fresh head is zero: give it something to read
    return rm, enc


def test_score_entry_point_equals_the_training_read_out(rm_and_enc):
    """common.score_responses (left padded, evaluate.py's) == the training path (right padded, last real token), and
    a response's score does not depend on what it is batched with."""
    rm, enc = rm_and_enc
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}], "Reverse the word 'cat'.",
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    responses = ["Sure! The answer is 4.", "tac", "Hello there, how can I help you today?"]
    pad = C.special_id(enc, "<|pad|>")
    pairs = [{"ids_c": reward.tokenize_response(enc, C.as_messages(p, "t"), r, 128)[0], "ids_r": [1, 2, 3]}
             for p, r in zip(prompts, responses)]
    with torch.no_grad():
        trained_c, _ = reward.pair_rewards(rm, *reward.collate(pairs, pad), torch.device("cpu"), reward.Config())
    messages = [C.as_messages(p, "t") for p in prompts]
    scored = C.score_responses(rm, enc, messages, responses)
    alone = torch.cat([C.score_responses(rm, enc, [p], [r]) for p, r in zip(messages, responses)])
    torch.testing.assert_close(scored, trained_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scored, alone, rtol=1e-5, atol=1e-5)


def test_tokenized_response_ends_at_im_end(enc):
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    ids, truncated = reward.tokenize_response(enc, prompt, "Sure! The answer is 4.", 128)
    assert ids[-1] == C.special_id(enc, "<|im_end|>") and not truncated
    assert enc.decode(ids).endswith("<|im_start|>assistant\nSure! The answer is 4.<|im_end|>")
    short, truncated = reward.tokenize_response(enc, prompt, "x" * 200, 64)
    assert truncated and len(short) == 64


def test_gold_report_ceiling_and_agreement():
    texts = [("aa", "a"), ("a", "aa"), ("b", "bb"), ("c", "d")]
    pairs = [{"prompt": "p", "chosen": c, "rejected": r} for c, r in texts]
    gold = lambda prompt, response: float(len(response))  # noqa: E731  (ties on ("c", "d"))
    out = reward.gold_report(gold, "gold", pairs, torch.tensor([1.0, 0.0, 0.0, 5.0]), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert out["gold_accuracy"] == pytest.approx((1 + 0 + 0 + 0.5) / 4)  # labels agreeing with gold, ties half
    # rm orders pair 0 as gold does (chosen higher), pair 1 too (rejected higher), pair 2 too: 3 of 3 untied
    assert out["rm_gold_agreement"] == 1.0 and out["gold_ties"] == 0.25


# ----------------------------------------------------------------------------- the loop


@pytest.fixture
def prefs(tmp_path, toy_dir):
    with open(os.path.join(toy_dir, "prefs.jsonl")) as f:
        lines = [next(f) for _ in range(40)]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(lines))
    return str(path)


def base_args(ckpt, data, *extra):
    return ["--model", ckpt, "--data", data, "--seq-len", "128", "--batch-size", "4", "--eval-frac", "0.25",
            "--warmup", "1", "--lr", "1e-3", *extra]


def test_smoke_subprocess_with_gold_ceiling(tmp_path, tiny_ckpt, toy_dir):
    log, out = tmp_path / "log.jsonl", str(tmp_path / "rm.pt")
    proc = run_script("reward.py", *base_args(tiny_ckpt, os.path.join(toy_dir, "prefs.jsonl"), "--steps", "3",
                                              "--out", out, "--log", str(log), "--eval-every", "2", "--gold",
                                              "data/toyworld.py:gold_reward"), env={"OMP_NUM_THREADS": "1"})
    assert "held-out accuracy" in proc.stdout and "gold-reward ceiling" in proc.stdout
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # a fresh zero head ties every pair
    last = records[-1]
    assert 0.5 < last["gold_accuracy"] < 1 and 0 <= last["eval_accuracy"] <= 1 and "eval_accuracy" in records[1]
    rm, enc, ckpt = C.load_model(out)
    assert ckpt["config"]["head"] == "scalar" and ckpt["lineage"][-1] == "rm" and ckpt["step"] == 3
    prompt = [{"role": "user", "content": "What is 1 + 1?"}]
    assert torch.isfinite(C.score_responses(rm, enc, [prompt], ["Sure! The answer is 2."])).all()


@pytest.mark.parametrize("lora", [False, True])
def test_resume_equals_straight_run(tmp_path, tiny_ckpt, prefs, lora):
    args = base_args(tiny_ckpt, prefs, "--steps", "4", "--eval-every", "2", "--center-rewards-coef", "0.01")
    if lora:
        args += ["--lora-rank", "4", "--lora-dropout", "0.1"]
    a = assert_resume_equals_straight(reward.main, args, tmp_path)  # bit-exact on CPU
    assert a["score.weight"].abs().sum() > 0  # the head trained (in full, also under LoRA)


def test_margins_from_the_data_enter_the_loss(tmp_path, tiny_ckpt, prefs):
    with_margin = tmp_path / "m.jsonl"
    with open(prefs) as f, open(with_margin, "w") as g:
        for line in f:
            g.write(json.dumps({**json.loads(line), "margin": 2.0}) + "\n")
    logs = []
    for i, data in enumerate((prefs, str(with_margin))):
        log = tmp_path / f"log{i}.jsonl"
        reward.main(base_args(tiny_ckpt, data, "--steps", "1", "--out", str(tmp_path / "o.pt"), "--log", str(log)))
        logs.append(json.loads(log.read_text()))
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs[1]["loss"] == pytest.approx(-log_sigmoid(-2.0), abs=1e-5)  # zero head: -log s(0 - 2)


def test_ddp_two_processes_equal_one(tmp_path, tiny_ckpt, prefs):
    """torchrun --nproc_per_node=2 (gloo, CPU) with 2 pairs per rank == one process with 4, metrics included."""
    args = base_args(tiny_ckpt, prefs, "--steps", "2", "--warmup", "0", "--device", "cpu")
    args = [a for a in args]
    args[args.index("--batch-size") + 1] = "2"
    log_ddp, log_one = tmp_path / "ddp.jsonl", tmp_path / "one.jsonl"
    run_script("-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "reward.py", "--", *args,
               "--out", str(tmp_path / "ddp.pt"), "--log", str(log_ddp), env={"OMP_NUM_THREADS": "1"})
    args[args.index("--batch-size") + 1] = "4"
    reward.main(args + ["--out", str(tmp_path / "one.pt"), "--log", str(log_one)])
    a, b = C.load_checkpoint(str(tmp_path / "ddp.pt"))["model"], C.load_checkpoint(str(tmp_path / "one.pt"))["model"]
    # score.bias cancels in r_c - r_r: its gradient is pure float noise, which Adam scales up to a whole step
    # (within assert_same_training's hard bound, and one weight of the bulk)
    assert_same_first_step(log_ddp, log_one)
    assert_same_training(a, b, lr=1e-3, steps=2)
    ra, rb = (json.loads(p.read_text().splitlines()[-1]) for p in (log_ddp, log_one))
    for key in ("loss", "accuracy", "eval_loss", "eval_accuracy", "eval_margin"):
        assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), key


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ('{"prompt": "hi", "chosen": "a"}', "missing field 'rejected'"),
    ('{"prompt": "hi", "chosen": "a", "rejected": "b", "margin": "big"}', "'margin' must be a finite number"),
])
def test_bad_data_exits_2_with_file_and_line(tmp_path, tiny_ckpt, line, message):
    good = json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"})
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n\n" + good + "\n" + line + "\n")
    proc = run_script("reward.py", "--model", tiny_ckpt, "--data", str(path), "--out", str(tmp_path / "o.pt"),
                      "--steps", "1", "--seq-len", "64", check=False)
    assert_one_line_error(proc, f"{path}:4:", message)
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("args, message", [
    (["--eval-frac", "1"], "--eval-frac"),
    (["--center-rewards-coef", "-1"], "--center-rewards-coef"),
    (["--gold", "nofile.py"], "expected path/to/file.py:function"),
    (["--gold", "data/toyworld.py:nope"], "has no function 'nope'"),
    (["--seq-len", "4096"], "exceeds the model's max_seq_len"),
    (["--model", "missing.pt"], "no such checkpoint"),
])
def test_impossible_flags_exit_2(tmp_path, tiny_ckpt, prefs, args, message):
    assert_refused("reward.py", "--model", tiny_ckpt, "--data", prefs, "--out", str(tmp_path / "o.pt"),
                   "--steps", "1", *args, message=message)


def test_help_lists_every_field():
    proc = run_script("reward.py", "--help")
    for f in reward.Config.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in proc.stdout
    assert "Bradley-Terry" in proc.stdout
