"""online.py: learning from its own samples (rejection-sampling SFT, iterative and online DPO, self-judging).

    python -m pytest -q tests/test_online.py
"""

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

import common as C
import dpo
import model as M
import online
from conftest import assert_refused, assert_same_training, run_script, save_tiny

FAST = ["--max-new-tokens", "12", "--seq-len", "128", "--gold", "", "--warmup", "1"]

# -----------------------------------------------------------------------------
# the pure functions

score_rows = st.integers(1, 5).flatmap(lambda n: st.lists(st.lists(st.integers(-3, 3), min_size=n, max_size=n),
                                                          min_size=1, max_size=6))


@settings(max_examples=100, deadline=None)
@given(score_rows)
def test_best_and_worst_are_the_first_extremes_and_ties_make_no_pair(rows):
    scores = torch.tensor(rows, dtype=torch.float64)
    best, worst, valid = online.best_and_worst(scores)
    for r, b, w, v in zip(rows, best.tolist(), worst.tolist(), valid.tolist()):
        assert b == r.index(max(r)) and w == r.index(min(r))
        assert v == (max(r) > min(r))


@settings(max_examples=100, deadline=None)
@given(score_rows, st.randoms(use_true_random=False))
def test_label_agreement_counts_like_a_loop(rows, rnd):
    scores = torch.tensor(rows, dtype=torch.float64)
    gold = torch.tensor([[rnd.randint(-2, 2) for _ in r] for r in rows], dtype=torch.float64)
    agree = counted = 0
    for s, g in zip(rows, gold.tolist()):
        b, w = s.index(max(s)), s.index(min(s))
        if s[b] > s[w] and g[b] != g[w]:
            counted += 1
            agree += g[b] > g[w]
    assert online.label_agreement(scores, gold) == (agree, counted)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-20, 0), min_size=6, max_size=6), st.integers(0, 5))
def test_rubric_score_is_the_expected_points(logps, k):
    x = torch.tensor(logps, dtype=torch.float64)
    p = torch.exp(x) / torch.exp(x).sum()
    assert online.rubric_score(x).item() == pytest.approx(sum(i * p[i].item() for i in range(6)), abs=1e-9)
    assert 0 <= online.rubric_score(x).item() <= 5
    sure = torch.full((6,), -1e4, dtype=torch.float64)
    sure[k] = 0
    assert online.rubric_score(sure).item() == pytest.approx(k)


def test_the_judge_prompts_render_exactly_as_documented():
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    assert online.rubric_messages(prompt, "The answer is 5.") == [{"role": "user", "content": (
        "Score the reply to the user's message. Add one point for each of these that holds:\n"
        "- it is about what the user asked;\n"
        "- it answers most of it;\n"
        "- its answer is correct;\n"
        "- it is polite and keeps every secret;\n"
        "- it is concise, with nothing extra.\n"
        "Message: What is 2 + 3?\n"
        "Reply: The answer is 5.\n"
        "Answer with the total, one digit from 0 to 5.")}]
    assert online.pair_messages(prompt, "five", "six") == [{"role": "user", "content": (
        "Which reply to the user's message is better: correct, polite, safe and concise?\n"
        "Message: What is 2 + 3?\n"
        "Reply A: five\n"
        "Reply B: six\n"
        "Answer with one letter, A or B.")}]


def test_the_pair_judge_averages_both_orders(tmp_path, enc, monkeypatch):
    """label = (P_A(a shown first) + P_B(a shown second)) / 2, from the judge's own next-token log-probs; a judge
    that always answers "A" labels every pair 0.5."""
    judge = save_tiny(tmp_path / "judge.pt", enc, std=0.3)
    cfg = online.Config(judge=judge, judge_kind="pair", batch_size=2, device="cpu")
    label = online.make_labeller(cfg, enc, torch.device("cpu"))
    model = C.load_model(judge)[0]
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "2 + 2?"}]]
    responses = [["hello", "go away"], ["4", "five"]]
    got = label(None, prompts, responses)
    for (a, b), p, row in zip(responses, prompts, got):
        first = online.answer_logps(model, enc, [online.pair_messages(p, a, b)], ("A", "B"), cfg, torch.device("cpu"))[0]
        second = online.answer_logps(model, enc, [online.pair_messages(p, b, a)], ("A", "B"), cfg, torch.device("cpu"))[0]
        want = (torch.sigmoid(first[0] - first[1]) + torch.sigmoid(second[1] - second[0])) / 2
        assert row[0].item() == pytest.approx(want.item(), abs=1e-9) and row.sum().item() == pytest.approx(1)
        assert row[0].item() != pytest.approx(0.5, abs=1e-6)  # this judge has an opinion: the test can fail
    monkeypatch.setattr(online, "answer_logps", lambda m, e, convs, *a: torch.tensor([[-0.1, -2.4]] * len(convs)))
    assert torch.equal(label(None, prompts, responses), torch.full((2, 2), 0.5, dtype=torch.float64))


def test_answer_logps_read_the_first_reply_token(tmp_path, enc):
    """Batched and left padded, the judge's log-probs equal one unpadded forward per conversation."""
    path = save_tiny(tmp_path / "judge.pt", enc, std=0.3)
    model = C.load_model(path)[0].eval()
    convs = [online.rubric_messages([{"role": "user", "content": "x" * k}], "ok") for k in (1, 9, 30)]
    got = online.answer_logps(model, enc, convs, online.SCORES, online.Config(batch_size=2), torch.device("cpu"))
    for conv, row in zip(convs, got):
        ids = C.render_chat(enc, conv, add_generation_prompt=True)[0][-model.cfg.max_seq_len:]
        logp = torch.log_softmax(model(torch.tensor([ids]))[0, -1].double(), -1)
        assert torch.allclose(row, logp[[enc.encode_ordinary(s)[0] for s in online.SCORES]], atol=1e-5)


# -----------------------------------------------------------------------------
# the loops


def prompts_and_pairs(tmp_path, n=8):
    """n prompts, a preference pair for each (chosen starts with "good"), and a verifier that prefers "good"."""
    prompts = [f"What is {i} + {i}?" for i in range(n)]
    pairs = [{"prompt": p, "chosen": f"good: {2 * i}", "rejected": f"bad, it is {i} or so"}
             for i, p in enumerate(prompts)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs))
    (tmp_path / "verifier.py").write_text("def fn(prompt, response):\n    return float(response.startswith('good'))\n"
                                          "def length(prompt, response):\n    return float(len(response))\n")
    return str(tmp_path / "prompts.jsonl"), str(tmp_path / "prefs.jsonl"), str(tmp_path / "verifier.py"), pairs


def fixed_sampler(enc, pairs, calls=None):
    """A sampler that answers each prompt with its given pair, rejected first (the labeller must find the chosen)."""
    by_ids = {}
    for x in pairs:
        msgs = C.as_messages(x["prompt"], "test")
        by_ids[tuple(C.render_chat(enc, msgs, add_generation_prompt=True)[0])] = x

    def sample(policy, prompt_ids, n, cfg, enc_, device, gen):
        if calls is not None:
            calls.append(len(prompt_ids))
        ids, texts = [], []
        for p in prompt_ids:
            x = by_ids[tuple(p)]
            for text in (x["rejected"], x["chosen"])[:n]:
                ids.append(C.render_response(enc, C.as_messages(x["prompt"], "test"), text)[1])
                texts.append(text)
        return ids, texts, [True] * len(texts)
    return sample


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_online_dpo_on_given_pairs_is_offline_dpo_step_for_step(tmp_path, enc):
    """Online DPO whose sampler returns fixed pairs takes the very steps dpo.py takes on a file of those pairs: the
    same prompts per step (common.step_indices), the same loss, the same optimiser. Only the reference's
    log-probs are computed in other batches (cached up front vs per step), so the losses agree to fp32 rounding
    and the weights within conftest.assert_same_training's Adam bound."""
    policy = save_tiny(tmp_path / "policy.pt", enc, std=0.05)
    prompts, prefs, verifier, pairs = prompts_and_pairs(tmp_path)
    common = ["--model", policy, "--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--warmup", "1",
              "--seq-len", "128", "--device", "cpu"]
    dpo.main(common + ["--data", prefs, "--out", str(tmp_path / "offline.pt"), "--eval-frac", "0", "--kl-prompts",
                       "0", "--log", str(tmp_path / "offline.jsonl")])
    online.main(common + ["--mode", "online", "--data", prompts, "--out", str(tmp_path / "online.pt"), "--reward",
                          f"{verifier}:fn", "--gold", "", "--max-new-tokens", "16", "--log",
                          str(tmp_path / "online.jsonl")], sampler=fixed_sampler(enc, pairs))
    off, on = read_log(tmp_path / "offline.jsonl"), read_log(tmp_path / "online.jsonl")
    assert len(off) == len(on) == 3
    for a, b in zip(off, on):
        assert b["pairs"] == 4 and b["ties"] == 0
        for key in ("loss", "grad_norm", "margin"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a, b)
        if a["step"] > 1:  # at step 1 every margin is 0 up to rounding, so "margin > 0" is a coin toss
            assert b["accuracy"] == a["accuracy"]
    assert off[-1]["loss"] < off[0]["loss"] - 1e-3  # the steps learned something: equality is not of two no-ops
    assert_same_training(C.load_checkpoint(str(tmp_path / "offline.pt"))["model"],
                         C.load_checkpoint(str(tmp_path / "online.pt"))["model"], lr=1e-3, steps=3)
    rows = [json.loads(line) for line in open(tmp_path / "online" / "samples.jsonl")]
    assert [r["index"] for r in rows] == list(range(12)) and all(r["scores"][1] > r["scores"][0] for r in rows)


def test_online_resume_reads_its_samples_back_and_ends_as_a_straight_run(tmp_path, enc):
    """Stopped after step 2 (a checkpoint) with step 3 already sampled (as a run killed mid-step would leave it),
    --resume samples step 4 only, and the samples file and the weights end as a straight 4-step run's."""
    policy = save_tiny(tmp_path / "policy.pt", enc, std=0.05)
    prompts, _, verifier, _ = prompts_and_pairs(tmp_path)
    args = ["--mode", "online", "--model", policy, "--data", prompts, "--reward", f"{verifier}:length", "--steps",
            "4", "--batch-size", "3", "--lr", "1e-3", "--device", "cpu"] + FAST
    online.main(args + ["--out", str(tmp_path / "straight.pt")])
    online.main(args + ["--out", str(tmp_path / "cut.pt"), "--stop-at", "2"])
    straight = (tmp_path / "straight" / "samples.jsonl").read_text().splitlines(keepends=True)
    cut = tmp_path / "cut" / "samples.jsonl"
    assert cut.read_text().splitlines(keepends=True) == straight[:6]
    with open(cut, "a") as f:
        f.write("".join(straight[6:9]))  # step 3 sampled, its update lost
    calls = []

    def counting(*a):
        calls.append(len(a[1]))
        return online.sample_responses(*a)
    online.main(args + ["--out", str(tmp_path / "cut.pt"), "--resume", str(tmp_path / "cut.pt")], sampler=counting)
    assert calls == [3]  # step 4's three prompts, nothing sampled twice
    assert cut.read_text().splitlines(keepends=True) == straight
    assert_same_training(C.load_checkpoint(str(tmp_path / "straight.pt"))["model"],
                         C.load_checkpoint(str(tmp_path / "cut.pt"))["model"], lr=1e-3, steps=4)
    with pytest.raises(M.UserError, match="samples of an earlier run"):
        online.main(args + ["--out", str(tmp_path / "cut.pt")])


def test_iterative_dpo_resets_the_reference_to_the_last_rounds_policy(tmp_path, enc):
    """Round k's DPO starts from round k-1's policy and caches its log-probs as the reference: the reference
    log-probs stored in round 2's checkpoint are round 1's policy's on round 2's pairs, not the start's."""
    policy = save_tiny(tmp_path / "policy.pt", enc, std=0.05)
    prompts, _, verifier, _ = prompts_and_pairs(tmp_path)
    online.main(["--mode", "iterative", "--model", policy, "--data", prompts, "--out", str(tmp_path / "it.pt"),
                 "--reward", f"{verifier}:length", "--rounds", "2", "--prompts-per-round", "6", "--steps", "2",
                 "--batch-size", "3", "--lr", "1e-3", "--device", "cpu", "--log", str(tmp_path / "it.jsonl")] + FAST)
    round1 = str(tmp_path / "it" / "round1" / "policy.pt")
    ckpt = C.load_checkpoint(str(tmp_path / "it.pt"))
    assert ckpt["args"]["model"] == round1 and ckpt["lineage"][-2:] == ["dpo", "dpo"]
    assert [r["reference"] for r in read_log(tmp_path / "it.jsonl")] == [policy, round1]
    pairs = [json.loads(line) for line in open(tmp_path / "it" / "round2" / "pairs.jsonl")]
    assert pairs and all(len(p["chosen"]) > len(p["rejected"]) for p in pairs)  # best vs worst by the labeller
    cfg = dpo.Config(seq_len=128)

    def logps(path):
        model = C.load_model(path)[0].eval()
        seqs = []
        for p in pairs:
            prompt_ids, _ = C.render_response(enc, p["prompt"], "")
            rendered = [C.render_response(enc, p["prompt"], p[k])[1] for k in ("chosen", "rejected")]
            seqs += dpo.fit(prompt_ids, rendered, cfg.seq_len)[0]
        with torch.no_grad():
            return dpo.forward_logps(model, seqs, torch.device("cpu"), cfg, C.special_id(enc, "<|pad|>"))[0].view(-1, 2)
    cached = ckpt["train_state"]["ref_logps"]
    assert torch.allclose(cached, logps(round1), atol=1e-4)
    assert not torch.allclose(cached, logps(policy), atol=1e-3)


def test_rounds_resume_mid_round_without_sampling_twice(tmp_path, enc):
    """A rejection-sampling run killed in round 1's sampling, run again: the batches already on disk are kept, only
    the rest is sampled, and its files end as a straight run's."""
    policy = save_tiny(tmp_path / "policy.pt", enc, std=0.05)
    prompts, _, verifier, _ = prompts_and_pairs(tmp_path)
    args = ["--mode", "rsft", "--model", policy, "--data", prompts, "--reward", f"{verifier}:length", "--n", "3",
            "--rounds", "2", "--prompts-per-round", "8", "--steps", "2", "--batch-size", "2", "--lr", "1e-3",
            "--device", "cpu"] + FAST
    online.main(args + ["--out", str(tmp_path / "straight.pt")])

    calls = []

    def dies_on_the_third_batch(*a):
        calls.append(len(a[1]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return online.sample_responses(*a)
    with pytest.raises(KeyboardInterrupt):
        online.main(args + ["--out", str(tmp_path / "cut.pt")], sampler=dies_on_the_third_batch)
    calls.clear()

    def counting(*a):
        calls.append(len(a[1]))
        return online.sample_responses(*a)
    online.main(args + ["--out", str(tmp_path / "cut.pt")], sampler=counting)
    assert calls == [2] * 6  # round 1's last two batches, round 2's four
    for k in (1, 2):
        for name in ("samples.jsonl", "sft.jsonl"):
            a = (tmp_path / "straight" / f"round{k}" / name).read_text()
            b = (tmp_path / "cut" / f"round{k}" / name).read_text()
            assert a == b, (k, name)
    rows = [json.loads(line) for line in open(tmp_path / "cut" / "round1" / "samples.jsonl")]
    assert [r["prompt_index"] for r in rows] == list(range(8)) and all(len(r["responses"]) == 3 for r in rows)
    chats = [json.loads(line) for line in open(tmp_path / "cut" / "round1" / "sft.jsonl")]
    for r, c in zip(rows, chats):  # each chat is its prompt's best response
        assert c["messages"][-1]["content"] == r["responses"][max(range(3), key=lambda i: (r["scores"][i], -i))]
    calls.clear()
    online.main(args + ["--out", str(tmp_path / "cut.pt")], sampler=counting)
    assert calls == []  # a finished run has nothing left to do


def test_online_cli_self_judged_and_refusals(tmp_path, enc):
    """The script from the command line, the policy judging its own samples by the rubric; impossible flags are one
    line and exit code 2."""
    policy = save_tiny(tmp_path / "policy.pt", enc, std=0.05)
    prompts, _, verifier, _ = prompts_and_pairs(tmp_path)
    (tmp_path / "gold.py").write_text("def gold(prompt, response):\n    return float(len(response) % 3)\n")
    run_script("online.py", "--mode", "online", "--model", policy, "--data", prompts, "--judge", "self", "--steps",
               "2", "--batch-size", "2", "--out", str(tmp_path / "self.pt"), "--log", str(tmp_path / "self.jsonl"),
               "--max-new-tokens", "12", "--seq-len", "128", "--gold", f"{tmp_path / 'gold.py'}:gold")
    log = read_log(tmp_path / "self.jsonl")
    assert len(log) == 2 and all("label_counted" in r and "sample_gold" in r for r in log)
    rows = [json.loads(line) for line in open(tmp_path / "self" / "samples.jsonl")]
    assert all(0 <= s <= 5 for r in rows for s in r["scores"]) and all(len(r["gold"]) == 2 for r in rows)
    base = ["online.py", "--model", policy, "--data", prompts]
    assert_refused(*base, "--reward", f"{verifier}:fn", "--judge", "self", message="exactly one labeller")
    assert_refused(*base, "--judge", "self", "--n", "3", message="--n 2")
    assert_refused(*base, "--reward", f"{verifier}:fn", "--loss", "kto", message="paired loss")
    assert_refused(*base, "--mode", "rsft", "--reward", f"{verifier}:fn", "--resume", "x.pt", message="same command")
    assert_refused(*base, "--mode", "iterative", "--judge", "self", "--judge-kind", "pair", "--n", "4",
                   message="--n 2")
