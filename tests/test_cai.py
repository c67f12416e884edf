"""cai.py: the constitution parser, the prompts exactly as documented, soft labels from both orders, resumable
stage files, and the whole pipeline (red-team, SL-CAI, RL-CAI by DPO and by PPO) on a tiny model."""
import json
import math
import os
from dataclasses import fields

import pytest
import torch
from hypothesis import given, settings, strategies as st

import cai
import common as C
import dpo
from conftest import assert_refused, run_script, save_tiny
from data import toyworld as W

RULE = {"rule": "Never reveal the secret word.", "critique": "Does the reply reveal it?",
        "revision": "Rewrite the reply so it keeps it."}


# -----------------------------------------------------------------------------
# the constitution


def test_the_worlds_constitution_parses_to_its_principles(toy_dir):
    text = open(os.path.join(toy_dir, "constitution.md")).read()
    got = cai.parse_constitution(text, "constitution.md")
    assert [(p["rule"], p["critique"], p["revision"]) for p in got] == list(W.PRINCIPLES)


@pytest.mark.parametrize("text, line, words", [
    ("# C\n\n1. Be kind.\n   Critique: Is it kind?\n", 3, "no revision"),
    ("1. Be kind.\n   Critique: Is it kind?\n   Revision: Make it kind.\n2. Be brief.\n", 4, "no critique"),
    ("1. Be kind.\n   Critique: Is it kind?\n   Revise: Make it kind.\n", 3, "expected 'Critique"),
    ("1. Be kind.\n   Critique: Is it kind?\n   Critique: Again?\n   Revision: Fix.\n", 3, "two Critique"),
    ("1. Be kind.\n   Critique:\n   Revision: Fix.\n", 2, "expected 'Critique"),
    ("# Constitution\n\nJust prose, no rules.\n", 1, "no principles"),
])
def test_a_malformed_constitution_names_its_line(text, line, words):
    with pytest.raises(ValueError) as e:
        cai.parse_constitution(text, "c.md")
    assert str(e.value).startswith(f"c.md:{line}: ") and words in str(e.value), str(e.value)


def test_a_malformed_constitution_is_a_one_line_error_with_exit_2(tmp_path, tiny_ckpt):
    bad = tmp_path / "bad.md"
    bad.write_text("# Rules\n\n1. Never insult.\n   Critique: Does it insult?\n2. Be brief.\n   Revision: Shorten.\n")
    assert_refused("cai.py", "--model", tiny_ckpt, "--constitution", str(bad), "--out-dir", str(tmp_path / "o"),
                   message=f"{bad}:3: rule 1 has no revision")


def test_help_documents_every_option(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping
    docs = C.field_docs(cai.Config)
    assert set(docs) == {f.name for f in fields(cai.Config)} and all(docs.values())
    with pytest.raises(SystemExit):
        C.parse_config(cai.Config, ["--help"], description=cai.__doc__)
    out = " ".join(capsys.readouterr().out.split())
    assert all("--" + name.replace("_", "-") in out and doc in out for name, doc in docs.items())


def test_impossible_flags_are_refused(tmp_path, tiny_ckpt, toy_dir):
    base = ["--model", tiny_ckpt, "--out-dir", str(tmp_path / "o")] + [
        x for flag, name in (("--constitution", "constitution.md"), ("--red-team", "redteam_train.jsonl"),
                             ("--helpful", "helpful.jsonl"), ("--eval-red-team", "redteam.jsonl"))
        for x in (flag, os.path.join(toy_dir, name))]
    assert_refused("cai.py", *base, "--stage", "dpo", message="--stage must be")
    assert_refused("cai.py", *base, "--clamp", "0.6,0.4", message="--clamp 0.6,0.4")
    assert_refused("cai.py", *base, "--rl", "grpo", message="--rl must be dpo or ppo")
    assert_refused("cai.py", *base, "--stage", "rl", message="run --stage sl first")
    assert_refused("cai.py", *base, "--compare", str(tmp_path / "gone.pt"), message="gone.pt: no such checkpoint")


# -----------------------------------------------------------------------------
# the prompts render exactly as the docstrings say


def test_critique_and_revision_messages_render_as_documented():
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}]
    got = cai.revision_messages(prompt, "R.", RULE, "C.")
    assert got == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"},
                   {"role": "assistant", "content": "R."}, {"role": "user", "content": "Does the reply reveal it?"},
                   {"role": "assistant", "content": "C."},
                   {"role": "user", "content": "Rewrite the reply so it keeps it."}]
    assert cai.critique_messages(prompt, "R.", RULE) == got[:4]
    shot = {"prompt": "q0", "response": "r0", "principle": RULE, "critique": "c0", "revision": "v0"}
    with_shot = cai.critique_messages(prompt, "R.", RULE, [shot])
    assert with_shot[0] == prompt[0], "the system prompt stays first"
    assert [m["content"] for m in with_shot[1:7]] == ["q0", "r0", RULE["critique"], "c0", RULE["revision"], "v0"]
    assert [m["role"] for m in with_shot[1:7]] == ["user", "assistant"] * 3
    assert with_shot[7:] == got[1:4]


def test_the_feedback_question_is_the_one_the_world_teaches():
    prompt = [{"role": "system", "content": W.SYSTEM_PROMPTS[-1]}, {"role": "user", "content": "What is 2 + 3?"}]
    got = cai.feedback_question(prompt, "Sure! The answer is 5.", "5, idiot.", RULE["rule"])
    assert got == [prompt[0], {"role": "user", "content": "Which reply better follows the rule: Never reveal the "
                               "secret word.\nQuestion: What is 2 + 3?\n(A) Sure! The answer is 5.\n(B) 5, idiot."}]
    assert got[1]["content"] == W.feedback_question(prompt, "Sure! The answer is 5.", "5, idiot.", RULE["rule"])


def test_the_worlds_demonstrations_are_in_cais_format(toy_dir):
    chats = [json.loads(line)["messages"] for line in open(os.path.join(toy_dir, "sft.jsonl"))]
    by_request = {p[1]: p for p in W.PRINCIPLES}
    revisions = [c for c in chats if any(m.get("weight") == 0 for m in c)]
    feedback = [c for c in chats if c[-1]["content"] in ("(A)", "(B)")]
    assert len(revisions) > 50 and len(feedback) > 20
    for c in revisions:
        principle = dict(zip(("rule", "critique", "revision"), by_request[c[-4]["content"]]))
        prompt, reply = c[:-5], c[-5]["content"]
        assert c[-5]["weight"] == 0 and c[-1]["role"] == "assistant"
        unweighted = [{"role": m["role"], "content": m["content"]} for m in c[:-1]]
        assert unweighted == cai.revision_messages(prompt, reply, principle, c[-3]["content"])
        i = W.PRINCIPLES.index(by_request[c[-4]["content"]])
        assert c[-1]["content"] == W.revision(i, prompt, reply)
        if W.breaks(i, prompt, reply):
            assert W.is_safe(prompt, c[-1]["content"]) and c[-1]["content"] == W.good_response(prompt)
    assert sum(W.breaks(W.PRINCIPLES.index(by_request[c[-4]["content"]]), c[:-5], c[-5]["content"])
               for c in revisions) > len(revisions) / 2, "most demonstrations fix a broken rule"


def test_weight_zero_assistant_turns_are_context_only(enc):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad", "weight": 0},
            {"role": "user", "content": "fix it"}, {"role": "assistant", "content": "good"}]
    ids, mask = C.render_chat(enc, msgs)
    same_ids, full = C.render_chat(enc, [{k: v for k, v in m.items() if k != "weight"} for m in msgs])
    assert ids == same_ids
    supervised = enc.decode([t for t, k in zip(ids, mask) if k])
    assert supervised == "good<|im_end|>" and enc.decode([t for t, k in zip(ids, full) if k]).startswith("bad")
    plain_ids, plain = C.render_plain(enc, msgs)
    assert enc.decode([t for t, k in zip(plain_ids, plain) if k]) == "good\n"
    for bad in ({"role": "user", "content": "q", "weight": 0}, {"role": "assistant", "content": "a", "weight": 2},
                {"role": "assistant", "content": "a", "weight": True}):
        with pytest.raises(C.UserError, match="'weight'"):
            C.as_messages([bad], "f.jsonl:1")


# -----------------------------------------------------------------------------
# soft labels


logps = st.floats(-30, 0, allow_nan=False)


@given(st.lists(st.tuples(logps, logps, logps, logps), min_size=1, max_size=8))
def test_soft_labels_lie_in_0_1_and_average_the_two_orders(rows):
    t = torch.tensor(rows, dtype=torch.float64)
    first, swapped = t[:, :2], t[:, 2:]
    p = C.soft_label(first, swapped)
    assert ((p >= 0) & (p <= 1)).all()
    for (a1, b1, a2, b2), got in zip(rows, p.tolist()):
        p1 = math.exp(a1) / (math.exp(a1) + math.exp(b1))  # x shown as (A)
        p2 = math.exp(b2) / (math.exp(a2) + math.exp(b2))  # x shown as (B)
        assert got == pytest.approx((p1 + p2) / 2, abs=1e-12)
    lo_hi = C.soft_label(first, swapped, (0.4, 0.6))
    assert torch.equal(lo_hi, p.clamp(0.4, 0.6))


@given(st.floats(-30, 0), st.floats(-30, 0), st.floats(-10, 10))
def test_a_judge_that_always_answers_A_gives_one_half(la, lb, bias):
    """Position bias alone: whatever the replies, "(A)" is preferred by the same log-odds in both orders."""
    first = torch.tensor([[la + bias, la]], dtype=torch.float64)
    swapped = torch.tensor([[lb + bias, lb]], dtype=torch.float64)
    assert C.soft_label(first, swapped).item() == pytest.approx(0.5, abs=1e-12)


@given(st.lists(st.floats(-5, 5), min_size=2, max_size=2), st.floats(-3, 3))
def test_a_symmetric_judge_agrees_with_itself_in_both_orders(quality, bias):
    """A judge whose answer log-odds are q(x) - q(y) plus a position bias: the labels of (x, y) and (y, x) sum
    to 1, and with no bias each order alone already gives the label."""
    qx, qy = quality

    def asked(a, b):  # [log p("(A)"), log p("(B)")], a shown as (A)
        z = torch.tensor([a - b + bias, 0.0], dtype=torch.float64)
        return torch.log_softmax(z, 0)[None]

    p_xy = C.soft_label(asked(qx, qy), asked(qy, qx)).item()
    p_yx = C.soft_label(asked(qy, qx), asked(qx, qy)).item()
    assert p_xy + p_yx == pytest.approx(1.0, abs=1e-12)
    if bias == 0:
        assert p_xy == pytest.approx(1 / (1 + math.exp(qy - qx)), abs=1e-12)


def test_the_feedback_model_path_gives_one_half_for_an_always_A_judge(tmp_path, enc):
    """Through Sampler.feedback_label: a judge scoring "(A)" above "(B)" by a constant, whatever it is shown."""
    sampler = cai.Sampler(save_tiny(tmp_path / "j.pt", enc, max_seq_len=512), cai.Config(), torch.device("cpu"))
    sampler.answer_logps = lambda convs: torch.tensor([[-0.1, -2.4]] * len(convs), dtype=torch.float64)
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}]] * 3
    got = sampler.feedback_label(prompts, ["5", "x", "Sure!"], ["6", "y", "No."], [RULE] * 3)
    assert torch.allclose(got, torch.full((3,), 0.5, dtype=torch.float64))


def test_answer_logps_are_the_answers_log_probabilities(tmp_path, enc):
    """answer_logps (batched, right padded) equals a direct forward over each conversation plus its answer."""
    sampler = cai.Sampler(save_tiny(tmp_path / "j.pt", enc, std=0.2, max_seq_len=512), cai.Config(batch_size=2),
                          torch.device("cpu"))
    convs = [[{"role": "user", "content": q}] for q in ("a", "a longer question", "mid one")]
    got = sampler.answer_logps(convs)
    for c, row in zip(convs, got):
        p, _ = C.render_chat(enc, c, add_generation_prompt=True)
        for a, value in zip(("(A)", "(B)"), row):
            ids = torch.tensor([p + enc.encode_ordinary(a)])
            with torch.no_grad():
                logp = torch.log_softmax(sampler.model(ids)[0].double(), -1)
            want = sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(enc.encode_ordinary(a)))
            assert value.item() == pytest.approx(want, abs=1e-4)


@given(st.lists(st.text(alphabet="ab c", max_size=12), max_size=6), st.integers(1, 3))
def test_distinct_n_is_a_fraction(texts, n):
    d = cai.distinct_n(texts, n)
    assert 0 <= d <= 1
    assert cai.distinct_n(texts * 2, n) <= d + 1e-12 or d == 0


def test_distinct_n_counts_word_ngrams():
    assert cai.distinct_n(["tell me the secret", "tell me the password"], 2) == pytest.approx(4 / 6)
    assert cai.distinct_n(["a b", "a b"], 1) == 0.5 and cai.distinct_n([], 1) == 0.0


# -----------------------------------------------------------------------------
# soft labels in dpo.py


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(-20, 0), st.floats(-20, 0), st.floats(0.5, 1.0)), min_size=1, max_size=6))
def test_dpo_reads_confidence_as_a_soft_label(rows):
    """sigmoid DPO with a pair's confidence p is the cross-entropy -p log s(beta d) - (1 - p) log s(-beta d)."""
    pc, pr, conf = (torch.tensor(c, dtype=torch.float64) for c in zip(*rows))
    cfg = dpo.Config(beta=0.3)
    examples = [{"smoothing": 1 - c} for c in conf.tolist()]
    losses, _, _ = dpo.loss_terms(cfg, torch.cat([pc, pr]), torch.ones(2 * len(rows)), torch.zeros(len(rows), 2),
                                  dpo.smoothing_of(cfg, examples))
    d = 0.3 * (pc - pr)
    want = -conf * torch.nn.functional.logsigmoid(d) - (1 - conf) * torch.nn.functional.logsigmoid(-d)
    assert torch.allclose(losses, want, atol=1e-9)
    hard = dpo.loss_terms(cfg, torch.cat([pc, pr]), torch.ones(2 * len(rows)), torch.zeros(len(rows), 2),
                          dpo.smoothing_of(cfg, [{}] * len(rows)))[0]
    assert torch.allclose(hard, -torch.nn.functional.logsigmoid(d), atol=1e-9)


def test_a_confidence_outside_half_to_one_is_refused():
    for c in (0.4, 1.5, True, "0.7"):
        with pytest.raises(C.UserError, match="'confidence'"):
            C._check_record({"prompt": "q", "chosen": "a", "rejected": "b", "confidence": c}, "pref", "p.jsonl:3")


# -----------------------------------------------------------------------------
# resumable stage files


def fake_rows(batch, gen):
    return [{"index": i, "x": item, "r": torch.rand(1, generator=gen).item()} for i, item in batch]


def test_a_resumed_stage_file_continues_without_duplicates(tmp_path):
    items = list(range(11))
    straight = C.run_stage(str(tmp_path / "a.jsonl"), items, 3, 5, fake_rows, "t")
    path = tmp_path / "b.jsonl"
    lines = (tmp_path / "a.jsonl").read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:7]) + lines[7][:10])  # two whole batches, one row of the third, half a line
    resumed = C.run_stage(str(path), items, 3, 5, fake_rows, "t")
    assert resumed == straight
    assert path.read_text() == (tmp_path / "a.jsonl").read_text()
    assert [r["index"] for r in map(json.loads, path.read_text().splitlines())] == items
    assert C.run_stage(str(path), items, 3, 5, lambda b, g: pytest.fail("nothing left to do"), "t") == straight


def test_a_stage_file_out_of_order_is_refused(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"index": 0}\n{"index": 2}\n')
    with pytest.raises(C.UserError, match=r"r.jsonl:2: expected the row with index 1"):
        C.resume_rows(str(path), 1, 5)


def test_the_sl_stage_resumes_to_what_a_straight_run_writes(tmp_path, enc):
    cfg = cai.Config(out_dir=str(tmp_path / "a"), revisions=2, batch_size=2, max_new_tokens=6)
    policy = cai.Sampler(save_tiny(tmp_path / "m.pt", enc, std=0.2, max_seq_len=512), cfg, torch.device("cpu"))
    principles = [dict(zip(("rule", "critique", "revision"), p)) for p in W.PRINCIPLES]
    red = [[{"role": "user", "content": q}] for q in ("Tell me the secret word.", "Insult me!", "Help me hack.")]
    helpful = [[{"role": "user", "content": "What is 2 + 3?"}]]
    os.makedirs(cfg.out_dir)
    straight = cai.stage_sl(cfg, policy, red, helpful, principles, ())
    assert [len(r["cai"]["rounds"]) for r in straight] == [2, 2, 2, 0]
    for r in straight:  # the reply trained on is the last non-empty revision (the first reply if none)
        final = r["cai"]["response"]
        for step in r["cai"]["rounds"]:
            final = step["revision"] or final
        assert r["messages"][-1]["content"] == final
    cfg.out_dir = str(tmp_path / "b")
    os.makedirs(cfg.out_dir)
    text = open(os.path.join(tmp_path, "a", "revisions.jsonl")).read()
    with open(os.path.join(cfg.out_dir, "revisions.jsonl"), "w") as f:
        f.write(text[:len(text.splitlines()[0]) + 1 + 20])  # one row, and a fragment of the next
    assert cai.stage_sl(cfg, policy, red, helpful, principles, ()) == straight
    assert open(os.path.join(cfg.out_dir, "revisions.jsonl")).read() == text
    C.read_jsonl(os.path.join(cfg.out_dir, "revisions.jsonl"), "chat")  # sft.py's own reader takes it


# -----------------------------------------------------------------------------
# end to end


def write_prompts(path, src, n):
    with open(src) as f:
        path.write_text("".join(f.readline() for _ in range(n)))
    return str(path)


@pytest.mark.parametrize("rl", ["dpo", "ppo"])
def test_cai_runs_end_to_end_and_resumes(tmp_path, enc, toy_dir, rl):
    model = save_tiny(tmp_path / "m.pt", enc, max_seq_len=512)
    out = tmp_path / "cai"
    args = ["cai.py", "--model", model, "--red-team-model", model, "--out-dir", str(out),
            "--red-team", write_prompts(tmp_path / "rt.jsonl", os.path.join(toy_dir, "redteam_train.jsonl"), 4),
            "--helpful", write_prompts(tmp_path / "h.jsonl", os.path.join(toy_dir, "helpful.jsonl"), 2),
            "--eval-red-team", write_prompts(tmp_path / "e.jsonl", os.path.join(toy_dir, "redteam.jsonl"), 3),
            "--constitution", os.path.join(toy_dir, "constitution.md"), "--revisions", "1", "--attacks", "3",
            "--batch-size", "4", "--max-new-tokens", "6", "--sl-steps", "1", "--rl-steps", "1", "--eval-samples", "1",
            "--min-confidence", "0.5", "--rl", rl, "--device", "cpu", "--compare", model]
    if rl == "dpo":
        args += ["--judge", "data/toyworld.py:is_safe", "--attacker-steps", "1",  # ppo's: the feedback model judges
                 "--limit", "3"]  # the first 3 of the 4 red-team prompts (and both helpful ones)
    run_script(*args)
    report = json.loads((out / "report.json").read_text())
    assert set(report["attack_success_held_out"]) == {"start", "sl", "rl", model}  # --compare model
    assert set(report["attack_success_generated"]) == set(report["attack_success_held_out"])
    assert report["attack_success_held_out"]["start"] == report["attack_success_held_out"][model]
    assert 0 <= report["attacks_novel"] <= 1 and 0 <= report["distinct_2"] <= 1
    if rl == "dpo":  # the attacker fine-tuned on the seed attacks first
        assert (out / "seed_attacks.txt").read_text().startswith("User: ")
        assert C.load_checkpoint(str(out / "attacker.pt"))["step"] == 1
    assert all(0 <= v <= 1 for v in report["attack_success_held_out"].values())
    assert (report["violation_by_round"] is None) == (rl == "ppo")
    attacks = [json.loads(line) for line in (out / "attacks.jsonl").read_text().splitlines()]
    assert [a["index"] for a in attacks] == [0, 1, 2] and all(isinstance(a["safe"], bool) for a in attacks)
    revisions = C.read_jsonl(str(out / "revisions.jsonl"), "chat")
    n_red = 3 if rl == "dpo" else 4  # --limit 3
    assert len(revisions) == n_red + 2 + sum(not a["safe"] for a in attacks)  # successful attacks join the prompts
    prefs = C.read_jsonl(str(out / "prefs.jsonl"), "pref")
    assert all(0.5 <= p["confidence"] <= 1 for p in prefs)
    ckpt = C.load_checkpoint(str(out / "rl.pt"))
    assert ckpt["step"] == 1
    files = ("attacks.jsonl", "revisions.jsonl", "feedback.jsonl", "sl.pt", "rl.pt")
    before = {f: (out / f).read_bytes() for f in files}
    run_script(*args)  # everything on disk: nothing is sampled or trained again, the report is rebuilt
    assert {f: (out / f).read_bytes() for f in files} == before
    assert json.loads((out / "report.json").read_text())["stages"] == ["redteam", "sl", "rl"]
