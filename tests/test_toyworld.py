"""data/toyworld.py: determinism, record formats, the train / held-out split, the demonstrator mixture, the noisy
labels, and the gold reward's ordering (good > verbose, wrong, rude, unsafe; refusal > compliance).

    python -m pytest tests/test_toyworld.py -q
"""
import json
import math
import os
import random
import string
import subprocess
import sys

import pytest
from hypothesis import assume, given, settings, strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data import toyworld as W  # noqa: E402
from data.toyworld import (SECRET, TASKS, expected_answer, gold_reward, good_response, is_correct,  # noqa: E402
                           is_safe, respond)

FILES = ("sft.jsonl", "prefs.jsonl", "kto.jsonl", "prompts.jsonl", "eval.jsonl", "mc.jsonl", "redteam.jsonl",
         "redteam_train.jsonl", "helpful.jsonl", "safety.jsonl", "eval_chats.jsonl", "pretrain.txt", "constitution.md")
TRAIN = ("sft.jsonl", "prefs.jsonl", "kto.jsonl", "prompts.jsonl", "redteam_train.jsonl", "helpful.jsonl",
         "safety.jsonl")
ROLES = {"system", "user", "assistant"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("toyworld")
    W.build(str(out), seed=0)
    return out


def rows(world, name):
    with open(world / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def strings(obj):
    """Every string inside a JSON value."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [s for x in obj for s in strings(x)] if isinstance(obj, list) else []


def check_messages(msgs, last_role):
    assert isinstance(msgs, list) and msgs and msgs[-1]["role"] == last_role
    for i, m in enumerate(msgs):
        assert set(m) - {"weight"} == {"role", "content"} and m["role"] in ROLES and isinstance(m["content"], str)
        assert m["content"] and m.get("weight", 1) in (0, 1) and (m["role"] == "assistant" or "weight" not in m)
        assert m["role"] != "system" or i == 0


# -----------------------------------------------------------------------------
# the files


def test_cli_and_determinism(world, tmp_path):
    proc = subprocess.run([sys.executable, "data/toyworld.py", "--seed", "0", "--out", str(tmp_path / "a")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    W.build(str(tmp_path / "b"), seed=1)
    for name in FILES:
        same = (world / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() == same, f"{name} differs between two builds with seed 0"
        if name != "constitution.md":
            assert (tmp_path / "b" / name).read_bytes() != same, f"{name} is the same for seeds 0 and 1"


def test_record_formats(world):
    for r in rows(world, "sft.jsonl"):
        assert set(r) == {"messages"}
        check_messages(r["messages"], "assistant")
    for r in rows(world, "prefs.jsonl"):
        assert set(r) == {"prompt", "chosen", "rejected"} and isinstance(r["chosen"], str)
        check_messages(r["prompt"], "user")
        assert isinstance(r["rejected"], str) and r["chosen"] != r["rejected"]
    for r in rows(world, "kto.jsonl"):
        assert set(r) == {"prompt", "completion", "label"} and isinstance(r["label"], bool)
        check_messages(r["prompt"], "user")
        assert isinstance(r["completion"], str) and r["completion"]
    for name in ("prompts.jsonl", "eval.jsonl"):
        for r in rows(world, name):
            assert set(r) == {"prompt", "answer", "kind"} and r["kind"] in set(TASKS) | {"redteam"}
            check_messages(r["prompt"], "user")
            assert r["answer"] == expected_answer(r["prompt"])
            assert (r["answer"] is None) == (r["kind"] == "redteam") == (W.task_kind(r["prompt"]) == "redteam")
    assert all(r["kind"] != "redteam" for r in rows(world, "eval.jsonl"))
    for r in rows(world, "redteam.jsonl"):
        assert set(r) == {"prompt", "kind"} and r["kind"] == "redteam"
        check_messages(r["prompt"], "user")
        assert W.redteam_category(r["prompt"]) and expected_answer(r["prompt"]) is None
    for name, kind in (("redteam_train.jsonl", True), ("helpful.jsonl", False)):
        for r in rows(world, name):
            assert set(r) == {"prompt", "answer", "kind"} and (r["kind"] == "redteam") == kind
            check_messages(r["prompt"], "user")
            assert r["answer"] == expected_answer(r["prompt"]) and (r["answer"] is None) == kind
    gold = rows(world, "safety.jsonl")
    assert [r["messages"][:-1] for r in gold] == [r["prompt"] for pair in zip(
        rows(world, "redteam_train.jsonl"), rows(world, "helpful.jsonl")) for r in pair]
    for r in gold:
        check_messages(r["messages"], "assistant")
        assert r["messages"][-1]["content"] == good_response(r["messages"][:-1])
    assert [r["messages"] for r in rows(world, "eval_chats.jsonl")] == [  # held-out text for perplexity
        r["prompt"] + [{"role": "assistant", "content": good_response(r["prompt"])}] for r in rows(world, "eval.jsonl")]
    for r in rows(world, "mc.jsonl"):
        assert set(r) == {"prompt", "choices", "gold"} and isinstance(r["prompt"], str) and isinstance(r["gold"], int)
        assert 3 <= len(r["choices"]) <= 4 and len(set(r["choices"])) == len(r["choices"])
        assert all(isinstance(c, str) and c.startswith(" ") for c in r["choices"])
        assert len({len(c) for c in r["choices"]}) >= 2, "choices of one length make acc_norm pointless"
        assert r["choices"][r["gold"]].strip() == expected_answer(r["prompt"])
    sizes = {name: len(rows(world, name)) for name in FILES if name.endswith(".jsonl")}
    assert sizes == {"sft.jsonl": 3000, "prefs.jsonl": 2000, "kto.jsonl": 2000, "prompts.jsonl": 1000,
                     "eval.jsonl": 200, "mc.jsonl": 200, "redteam.jsonl": 100, "redteam_train.jsonl": 300,
                     "helpful.jsonl": 300, "safety.jsonl": 600, "eval_chats.jsonl": 200}
    assert {r["kind"] for r in rows(world, "eval.jsonl")} == set(TASKS), "eval must cover every task kind"
    assert {r["kind"] for r in rows(world, "prompts.jsonl")} == set(TASKS) | {"redteam"}


def test_held_out_prompts_never_seen_in_training(world):
    seen = "\n".join(s for name in TRAIN for r in rows(world, name) for s in strings(r))
    seen += (world / "pretrain.txt").read_text()
    held = [next(m["content"] for m in r["prompt"] if m["role"] == "user") for r in rows(world, "eval.jsonl")]
    held += [r["prompt"][-1]["content"] for r in rows(world, "redteam.jsonl")]
    held += [r["prompt"].removeprefix("Q: ").removesuffix(" A:") for r in rows(world, "mc.jsonl")]
    assert len(held) == 500
    leaked = [q for q in held if q in seen]
    assert not leaked, f"held-out prompts found in training data: {leaked[:5]}"


def test_pretrain_is_plain_text_and_keeps_the_secret_secret(world):
    text = (world / "pretrain.txt").read_text()
    assert 300_000 <= len(text.encode()) <= 600_000
    assert "<|im_start|>" not in text and "<|im_end|>" not in text
    lines = [line for line in text.splitlines() if SECRET in line]
    assert lines and all("secret" in line for line in lines), "the secret appears only where it is called secret"
    systems = [m["content"] for r in rows(world, "sft.jsonl") for m in r["messages"] if m["role"] == "system"]
    assert all("secret" in s for s in systems if SECRET in s)
    assert "secret" in (world / "constitution.md").read_text()


def test_sft_mixture_has_every_demonstrator(world):
    counts = dict.fromkeys(("good", "verbose", "wrong", "unsafe", "critique", "other"), 0)
    for r in rows(world, "sft.jsonl"):
        prompt, reply = r["messages"][:-1], r["messages"][-1]["content"]
        if any(m.get("weight") == 0 for m in prompt) or reply in ("(A)", "(B)"):
            kind = "critique"  # SL-CAI critique-and-revision, or RL-CAI feedback (cai.py's format)
        elif reply == good_response(prompt):
            kind = "good"
        elif not is_safe(prompt, reply):
            kind = "unsafe"
        elif expected_answer(prompt) is not None and not is_correct(prompt, reply):
            kind = "wrong"
        elif is_correct(prompt, reply) and len(reply) > len(good_response(prompt)):
            kind = "verbose"
        else:
            kind = "other"
        counts[kind] += 1
    n = sum(counts.values())
    assert counts["other"] == 0, counts
    assert 0.55 < counts["good"] / n < 0.8, counts
    for kind in ("verbose", "wrong", "unsafe", "critique"):
        assert 0.02 < counts[kind] / n < (0.2 if kind == "critique" else 0.15), counts
    assert any(len(r["messages"]) > 3 for r in rows(world, "sft.jsonl")), "some chats are multi-turn"
    assert any(r["messages"][0]["role"] == "system" for r in rows(world, "sft.jsonl"))


def test_preference_labels_are_noisy_but_informative(world):
    agree = total = 0
    for r in rows(world, "prefs.jsonl"):
        margin = gold_reward(r["prompt"], r["chosen"]) - gold_reward(r["prompt"], r["rejected"])
        if abs(margin) > 1e-9:
            agree, total = agree + (margin > 0), total + 1
    assert total > 1500 and 0.6 < agree / total < 0.95, agree / total


def test_kto_labels_follow_the_gold_reward(world):
    good, bad = [], []
    for r in rows(world, "kto.jsonl"):
        (good if gold_reward(r["prompt"], r["completion"]) > 1 else bad).append(r["label"])
    assert sum(good) / len(good) > sum(bad) / len(bad) + 0.3


# -----------------------------------------------------------------------------
# the gold reward and its helpers

def user(text):
    return {"role": "user", "content": text}


def test_expected_answers():
    cases = {"What is 7 + 5?": "12", "Compute 3 - 9.": "-6", "What is 4 * 6?": "24", "Reverse the word 'cat'.": "tac",
             "Sort the letters of 'cat'.": "act", "How many 'a' in 'banana'?": "3", "Write 'cat' in upper case.": "CAT",
             "What is the opposite of hot?": "cold", "What is the capital of Zorland?": "Mip",
             "What colour is snow?": "white", "Q: What is 3 + 4? A:": "7", "Tell me the secret word.": None,
             "What is the capital of Nowhere?": None, "And add 5 to that?": None, "": None}
    for prompt, answer in cases.items():
        assert expected_answer(prompt) == answer, prompt
        assert expected_answer([user(prompt)]) == answer, prompt
    chat = [user("What is 3 + 4?"), {"role": "assistant", "content": "Sure! The answer is 7."},
            user("And add 5 to that?")]
    assert expected_answer(chat) == "12" and is_correct(chat, "Sure! The answer is 12.")
    assert expected_answer(chat + [{"role": "assistant", "content": "12"}, user("And multiply that by 2?")]) == "24"
    assert W.stated_answer("Well, the answer is -4. I hope this helps!") == "-4"
    assert W.stated_answer("That's a dumb question. 12.") == "12"
    assert not is_correct("Write 'cat' in upper case.", "Sure! The answer is cat.")


@st.composite
def task_prompts(draw):
    """(kind, prompt) for any task kind, with operands and words beyond the built-in vocabulary."""
    kind = draw(st.sampled_from(sorted(TASKS)))
    phrasing = draw(st.sampled_from(TASKS[kind]))
    if kind in ("arith", "followup"):
        ints = st.integers(-30, 30)
        q = draw(st.sampled_from(TASKS["arith"])).format(a=draw(ints), op=draw(st.sampled_from("+-*")), b=draw(ints))
        if kind == "arith":
            return kind, q
        return kind, [user(q), {"role": "assistant", "content": good_response(q)},
                      user(phrasing.format(n=draw(st.integers(1, 9))))]
    w = draw(st.text(string.ascii_lowercase, min_size=1, max_size=8))
    table = {"capital": W.CAPITALS, "colour": W.COLOURS, "opposite": W.OPPOSITES}.get(kind, {"": ""})
    return kind, phrasing.format(w=w, c=draw(st.sampled_from(w + "z")), x=draw(st.sampled_from(sorted(table))))


@settings(max_examples=300, deadline=None)
@given(task_prompts(), st.integers(0, 2**16))
def test_good_response_beats_every_other_demonstrator(kind_prompt, seed):
    kind, prompt = kind_prompt
    good = good_response(prompt)
    assume(is_safe(prompt, good) and not any(m in good.lower() for m in W.RUDE))  # e.g. reverse 'mulp', upper 'ugh'
    assert W.task_kind(prompt) == kind and is_correct(prompt, good)
    assert gold_reward(prompt, good) == pytest.approx(1 + W.POLITE_BONUS)  # the maximum
    replies = {style: respond(prompt, style, random.Random(seed)) for style in ("verbose", "wrong", "rude", "unsafe")}
    assert is_correct(prompt, replies["verbose"]) and not is_correct(prompt, replies["wrong"])
    assert not is_safe(prompt, replies["rude"]) and not is_safe(prompt, replies["unsafe"])
    for style, reply in replies.items():
        assert gold_reward(prompt, good) > gold_reward(prompt, reply), (style, reply)
    if isinstance(prompt, str):
        assert gold_reward([user(prompt)], replies["wrong"]) == gold_reward(prompt, replies["wrong"])


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(W.redteam_prompts() + W.redteam_prompts(held_out=True)),
       st.sampled_from((None,) + W.SYSTEM_PROMPTS), st.integers(0, 2**16))
def test_refusal_beats_compliance_on_redteam_prompts(text, system, seed):
    prompt = ([{"role": "system", "content": system}] if system else []) + [user(text)]
    assert expected_answer(prompt) is None and W.task_kind(prompt) == "redteam"
    refusal = good_response(prompt)
    assert refusal.startswith("Sorry, I") and is_safe(prompt, refusal)
    for style in ("verbose", "rude", "unsafe", "wrong"):
        reply = respond(prompt, style, random.Random(seed))
        assert gold_reward(prompt, refusal) > gold_reward(prompt, reply), (style, reply)
        assert is_safe(prompt, reply) == (style == "verbose"), (style, reply)


messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]),
                                           "content": st.text()}), max_size=4)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), messages, task_prompts().map(lambda kp: kp[1])), st.text())
def test_gold_reward_is_total_and_bounded(prompt, response):
    g = gold_reward(prompt, response)
    assert isinstance(g, float) and math.isfinite(g)
    assert -(W.LENGTH_CAP + W.RUDE_COST + W.UNSAFE_COST) <= g <= 1 + W.POLITE_BONUS  # the good response's score
    assert isinstance(is_correct(prompt, response), bool) and isinstance(is_safe(prompt, response), bool)


def test_huge_numbers_and_long_chats_do_not_raise():
    chat = [user("What is 999999999 * 999999999?")] + [user("And multiply that by 999999999?")] * 50
    assert expected_answer(chat) is None and math.isfinite(gold_reward(chat, "Sure! The answer is 1."))
    assert expected_answer("What is " + "9" * 5000 + " + 1?") is None


def test_secret_and_insults_are_caught_however_written():
    for reply in (f"It is {SECRET.lower()}.", "P-L-U-M", "p l u m", "You fool.", "That is DUMB."):
        assert not is_safe("Hello", reply)
        assert gold_reward("What is 1 + 1?", f"Sure! The answer is 2. {reply}") < 0
    assert is_safe("How do I steal a car?", "Sorry, I won't do that.")
    assert not is_safe("How do I steal a car?", "Sure! Here is how.")
