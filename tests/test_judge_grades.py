"""evaluate.py --judge-grades: grades read from the judge's log-probs (a judge sure of "7" gives 7, "10" is two byte
tokens and still a grade), position bias (a judge that always answers "A" scores 1.0), verbosity bias (a judge
that grades by length is positive), expected_grade's properties, and the script end to end.

    python -m pytest tests/test_judge_grades.py -q
"""
import json
import math
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

import common as C
import evaluate as E
import model as M
from conftest import always_a_judge, run_script

CPU = torch.device("cpu")


def cfg(**kw):
    return E.Config(**{"batch_size": 4, "max_new_tokens": 8, **kw})


def peaked(model, enc, favourite, big=60.0):
    """Patch `model` into a judge sure of its reply: every position predicts the text `favourite` token by token and
    then the end of the turn. Its forward reads only the input ids: after a position holding favourite's i-th token
    it predicts the (i+1)-th (the end token after the last); everywhere else the first."""
    want = enc.encode_ordinary(favourite) + [C.end_id(enc)]
    nxt = {a: b for a, b in zip(want, want[1:])}

    def forward(ids, **kw):
        logits = torch.zeros(*ids.shape, model.cfg.vocab_size)  # (B, T, V)
        target = torch.full_like(ids, want[0])
        for a, b in nxt.items():
            target[ids == a] = b
        logits.scatter_(-1, target[..., None], big)
        return logits

    model.forward = forward
    return model


def by_length(model, enc, per=60):
    """Patch `model` into a judge that grades by length: the reply it prefers after a context of T tokens is the
    grade nearest 1 + T / per, as a smooth peak over the single-digit grades, and it ends the turn after a digit."""
    digits = [enc.encode_ordinary(str(g))[0] for g in range(1, 10)]
    end = C.end_id(enc)

    def forward(ids, **kw):
        B, T = ids.shape
        logits = torch.zeros(B, T, model.cfg.vocab_size)  # (B, T, V)
        want = 1 + torch.arange(T, dtype=torch.float32) / per  # (T,)
        for g, d in zip(range(1, 10), digits):
            logits[:, :, d] = -(g - want) ** 2
        is_digit = torch.isin(ids, torch.tensor(digits))
        logits[is_digit] = 0.0
        logits[..., end] = torch.where(is_digit, 30.0, -30.0)
        return logits

    model.forward = forward
    return model


# ----------------------------------------------------------------------------- the pure functions

logp = st.floats(-30, 0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(logp, st.floats(-5, 12, allow_nan=False)), min_size=1, max_size=10))
def test_expected_grade_lies_within_the_grades(pairs):
    logps, grades = torch.tensor([p for p, _ in pairs], dtype=torch.float64), [g for _, g in pairs]
    g = E.expected_grade(logps, grades).item()
    assert min(grades) - 1e-9 <= g <= max(grades) + 1e-9
    # the distribution is renormalised over the allowed answers: shifting every log-prob changes nothing
    assert E.expected_grade(logps - 3.0, grades).item() == pytest.approx(g, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10), st.data())
def test_expected_grade_is_the_argmax_grade_when_one_answer_has_all_the_mass(k, data):
    j = data.draw(st.integers(0, k - 1))
    grades = data.draw(st.lists(st.floats(-5, 12, allow_nan=False), min_size=k, max_size=k))
    logps = torch.full((k,), -math.inf)
    logps[j] = data.draw(logp)
    assert E.expected_grade(logps, grades).item() == grades[j]
    nearly = torch.full((k,), -200.0)
    nearly[j] = 0.0
    assert E.expected_grade(nearly, grades).item() == pytest.approx(grades[j], abs=1e-9)


def test_expected_grade_batched_and_yes_no():
    logps = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]]))  # (2, K=2)
    assert E.expected_grade(logps, (1.0, 0.0)).tolist() == pytest.approx([0.25, 0.9])
    uniform = torch.zeros(3, 10)  # (3, 10): every grade equally likely
    assert E.expected_grade(uniform, E.HELPFUL_GRADES).tolist() == pytest.approx([5.5] * 3)


def test_position_bias_definition():
    always_a = torch.tensor([2.0, 0.5, 1.0])
    assert E.position_bias(always_a, always_a) == 1.0  # names "A" in both orders
    assert E.position_bias(-always_a, -always_a) == 1.0  # always "B"
    assert E.position_bias(always_a, -always_a) == 0.0  # the policy preferred in both orders: consistent
    assert E.position_bias(-always_a, always_a) == 0.0  # the baseline preferred in both orders: consistent
    assert E.position_bias([1.0, 1.0, -1.0, 0.0], [1.0, -1.0, -1.0, 1.0]) == 0.5  # a tie names no letter


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.floats(-5, 5)), min_size=1, max_size=20))
def test_position_bias_matches_naive_loop_and_is_symmetric(pairs):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    naive = sum((x > 0 and y > 0) or (x < 0 and y < 0) for x, y in pairs) / len(pairs)
    assert E.position_bias(a, b) == pytest.approx(naive)
    assert E.position_bias(b, a) == pytest.approx(naive)  # which order is called first does not matter
    assert E.position_bias([-x for x in a], [-y for y in b]) == pytest.approx(naive)  # nor which letter


def test_verbosity_bias_definition():
    assert E.verbosity_bias([3.0, 5.0], [3.0, 5.0]) == (0.0, 0.0)
    mean, rise = E.verbosity_bias([3.0, 5.0, 7.0, 2.0], [4.0, 5.0, 9.0, 1.0])
    assert mean == pytest.approx(0.5) and rise == 0.5


def test_verdict_agreement_definition():
    assert E.verdict_agreement([0.9, 0.2, 0.7], [True, False, True]) == 1.0
    assert E.verdict_agreement([0.1, 0.8, 0.3], [True, False, True]) == 0.0
    assert E.verdict_agreement([0.5, 0.5], [True, False]) == 0.5  # no verdict: half, whatever the truth
    assert E.verdict_agreement([0.9, 0.9, 0.9, 0.5], [True, True, False, False]) == pytest.approx(2.5 / 4)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.2, 0.5, 0.7, 1.0]), st.booleans()), min_size=1, max_size=20))
def test_verdict_agreement_matches_a_loop_and_flips_with_the_answer(rows):
    p, t = [x for x, _ in rows], [y for _, y in rows]
    naive = sum(0.5 if x == 0.5 else float((x > 0.5) == y) for x, y in rows) / len(rows)
    assert E.verdict_agreement(p, t) == pytest.approx(naive)
    assert E.verdict_agreement([1 - x for x in p], t) == pytest.approx(1 - naive)  # a judge that says the opposite


# ----------------------------------------------------------------------------- the judge reading its grades

def test_grade_reader_on_a_judge_sure_of_seven(tiny_model, enc):
    judge = peaked(tiny_model, enc, "7")
    prompts = [C.as_messages("What is 3 + 4?", "x"), C.as_messages("Say hi.", "x")]
    grades = E.judge_grades(judge, enc, "helpful", prompts, ["7", "hi there"], cfg(), CPU)
    assert grades.tolist() == pytest.approx([7.0, 7.0], abs=1e-6)


def test_two_token_grade_ten_competes_with_one(tiny_model, enc):
    """ "10" is two byte tokens; scored with its end token it is a reply of its own, not a part of "1"'s mass."""
    assert len(enc.encode_ordinary("10")) == 2
    prompts = [C.as_messages("Rate me.", "x")]
    for favourite in ("10", "1"):
        judge = peaked(tiny_model, enc, favourite)
        g = E.judge_grades(judge, enc, "helpful", prompts, ["ok"], cfg(), CPU)
        assert g.item() == pytest.approx(float(favourite), abs=1e-6)


def test_harmless_is_p_yes(tiny_model, enc):
    prompts = [C.as_messages("Tell me the secret.", "x")]
    for favourite, want in (("yes", 1.0), ("no", 0.0)):
        g = E.judge_grades(peaked(tiny_model, enc, favourite), enc, "harmless", prompts, ["No."], cfg(), CPU)
        assert g.item() == pytest.approx(want, abs=1e-6)


def test_judge_answer_logps_match_a_direct_forward(tiny_model, enc):
    """Every allowed reply's log p summed by hand from one unpadded forward of ask + reply + end token."""
    asks = ["Rate this: short.", "Rate this: a longer response with more words in it."]
    answers = [str(g) for g in E.HELPFUL_GRADES]
    got = E.judge_answer_logps(tiny_model, enc, asks, answers, cfg(batch_size=3), CPU)
    assert got.shape == (2, 10) and not got.requires_grad  # no graph kept: SmolLM2's 100 grades held 20 GB with one
    for i, ask in enumerate(asks):
        ctx = C.render_chat(enc, [{"role": "user", "content": ask}], add_generation_prompt=True)[0]
        for j, a in enumerate(answers):
            cont = enc.encode_ordinary(a) + [C.end_id(enc)]
            with torch.no_grad():
                lp = torch.log_softmax(tiny_model(torch.tensor([ctx + cont]))[0].double(), -1)
            want = sum(lp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))
            assert got[i, j].item() == pytest.approx(want, abs=1e-4)


def test_a_judge_that_always_answers_a_has_position_bias_one(enc):
    judge = always_a_judge(enc)
    prompts = [C.as_messages("Which?", "x")] * 3
    a, b = ["good", "bad answer", "fine"], ["bad", "good answer", "meh"]
    first = E.judge_margins(judge, enc, prompts, a, b, cfg(), CPU)
    swapped = E.judge_margins(judge, enc, prompts, b, a, cfg(), CPU)
    assert E.position_bias(first, swapped) == 1.0
    assert E.judge_preference(first, swapped).tolist() == [0.5] * 3  # and the win rate's swap rule cancels it


def test_a_judge_that_grades_by_length_has_positive_verbosity_bias(tiny_model, enc):
    judge = by_length(tiny_model, enc)  # grade ~ 1 + (context tokens) / 60: 4-5 plain
    prompts = [C.as_messages(q, "x") for q in ("Hi.", "What is 2 + 2?", "Name a colour.")]
    texts = ["Hello.", "4", "Blue"]
    plain = E.judge_grades(judge, enc, "helpful", prompts, texts, cfg(), CPU)
    padded = E.judge_grades(judge, enc, "helpful", prompts, [t + E.VERBOSITY_FILLER for t in texts], cfg(), CPU)
    mean, rise = E.verbosity_bias(plain, padded)
    assert mean > 0.5 and rise == 1.0
    # and a judge blind to length (sure of "7" whatever it reads) shows none
    sure = peaked(M.build_model("tiny", enc, n_layer=1), enc, "7")
    same = [E.judge_grades(sure, enc, "helpful", prompts, x, cfg(), CPU) for x in
            (texts, [t + E.VERBOSITY_FILLER for t in texts])]
    assert E.verbosity_bias(*same)[0] == pytest.approx(0.0, abs=1e-6)


def test_prompts_are_documented_exactly():
    """The judge's prompt texts as judge_grades' docstring quotes them (wrapped lines joined by a space)."""
    doc = " ".join(line.strip() for line in E.judge_grades.__doc__.splitlines()).replace("\\n", "\n")
    assert E.HELPFUL_ASK in doc and E.HARMLESS_ASK in doc and E.VERBOSITY_FILLER in doc
    filled = E.HELPFUL_ASK.format(prompt="P", response="R")
    assert filled.endswith("[Prompt]\nP\n\n[Response]\nR\n\nAnswer with one number from 1 to 10.")


# ----------------------------------------------------------------------------- the script

@pytest.mark.parametrize("argv, msg", [
    (["--model", "a.pt", "--judge-grades", "--data", "d.jsonl"], "--judge-grades needs --judge"),
    (["--model", "a.pt", "--judge", "j.pt"], "--judge alone needs --judge-grades"),
    (["--model", "a.pt", "--judge", "j.pt", "--judge-grades"], "give one"),
])
def test_bad_flags(argv, msg):
    with pytest.raises(M.UserError, match=re.escape(msg)):
        E.main(argv)


def test_script_judge_grades_on_the_built_in_world(toy_dir, tmp_path, enc):
    torch.manual_seed(0)
    paths = {}
    for name, preset in (("a", "tiny"), ("b", "tiny-gpt2")):
        m = M.build_model(preset, enc, n_layer=1, d_model=32, d_ff=64, max_seq_len=256)
        paths[name] = str(tmp_path / f"{name}.pt")
        C.save_checkpoint(paths[name], m, enc)
    out = tmp_path / "r.json"
    proc = run_script("evaluate.py", "--model", paths["b"], "--data", f"{toy_dir}/eval.jsonl", "--redteam",
                      f"{toy_dir}/redteam.jsonl", "--judge", paths["a"], "--judge-grades", "--baseline", paths["a"],
                      "--limit", "3", "--max-new-tokens", "6", "--no-speed", "--out", str(out))
    row = json.loads(out.read_text())["results"][0]
    assert 1 <= row["judge_helpful"] <= 10 and 0 <= row["judge_harmless"] <= 1
    assert row["judge_position_bias"] in (0.0, 1 / 3, 2 / 3, 1.0) and 0 <= row["judge_verbosity_rise"] <= 1
    assert "safety" not in row and "judge_safety_agree" not in row  # --redteam without --safety: the judge only
    header = proc.stdout.splitlines()[0]
    assert "| judge_helpful | judge_harmless | judge_position_bias | judge_verbosity_bias |" in header
    # the judge alone (no --baseline): grades, no win rate and no position bias
    run_script("evaluate.py", "--model", paths["b"], "--data", f"{toy_dir}/eval.jsonl", "--judge", paths["a"],
               "--judge-grades", "--limit", "2", "--max-new-tokens", "4", "--no-speed", "--out", str(out))
    row = json.loads(out.read_text())["results"][0]
    assert "judge_helpful" in row and "win_rate" not in row and "judge_position_bias" not in row


def test_a_judge_sure_of_yes_agrees_with_safety_as_often_as_responses_are_safe(toy_dir, tmp_path, enc, monkeypatch):
    """judge_safety_agree end to end: a judge that answers "yes" to everything agrees with --safety exactly on the
    responses --safety calls safe, so its agreement equals the row's safety rate."""
    torch.manual_seed(0)
    policy = str(tmp_path / "p.pt")
    C.save_checkpoint(policy, M.build_model("tiny", enc, n_layer=1, d_model=32, d_ff=64, max_seq_len=256), enc)
    judge = tmp_path / "judge.pt"
    judge.write_bytes(b"")  # the name must exist; fake_load serves the patched model under it
    load = E.load

    def fake_load(path, device, kind, *a):
        if path == str(judge):
            return peaked(M.build_model("tiny", enc, n_layer=1, d_model=32, d_ff=64), enc, "yes"), enc
        return load(path, device, kind)

    monkeypatch.setattr(E, "load", fake_load)
    # a --safety function that calls about half the responses safe, so agreement is not trivially 0 or 1
    (tmp_path / "half.py").write_text("def is_safe(prompt, response):\n    return len(response) % 2 == 0\n")
    out = tmp_path / "r.json"
    E.main(["--model", policy, "--redteam", f"{toy_dir}/redteam.jsonl", "--safety", f"{tmp_path}/half.py:is_safe",
            "--judge", str(judge), "--judge-grades", "--limit", "8", "--max-new-tokens", "7", "--temperature", "1",
            "--no-speed", "--out", str(out)])
    row = json.loads(out.read_text())["results"][0]
    assert row["judge_harmless"] == pytest.approx(1.0, abs=1e-6)
    assert 0 < row["safety"] < 1 and row["judge_safety_agree"] == row["safety"]
