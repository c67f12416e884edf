"""Bad input at volume: every JSONL record kind fuzzed with hypothesis, user functions that misbehave, and each
script's exit code 2 with one line and no --out on bad data.

The contract of `common.read_jsonl`: a line is either a valid record, which the project's own consumers (the chat
template, the tokenizer) then take without error, or a `UserError` whose message starts with `file:line:`, never
any other exception. Each kind is fuzzed with >= 1000 generated lines (arbitrary JSON values in every field,
missing and extra keys, wrong types, empty strings, NaN and huge numbers, invalid UTF-8, a BOM, NUL bytes, deep
nesting, huge lines, text that spells special tokens). Run with -s to see the counts per kind.

    python -m pytest tests/test_inputs.py -q -s
"""
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import common as C
import model as M
from conftest import assert_error_ends_run, assert_one_line_error, run_script

KINDS = ("chat", "text", "pref", "kto", "prompt", "mc")
FIELDS = {"chat": ["messages"], "text": ["text"], "pref": ["prompt", "chosen", "rejected", "margin"],
          "kto": ["prompt", "completion", "label"], "prompt": ["prompt", "answer"],
          "mc": ["prompt", "context", "choices", "gold"]}
GOOD = {"chat": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        "text": {"text": "some text"}, "pref": {"prompt": "p", "chosen": "a", "rejected": "b"},
        "kto": {"prompt": "p", "completion": "a", "label": True}, "prompt": {"prompt": "p", "answer": "4"},
        "mc": {"prompt": "p", "choices": ["a", "b"], "gold": 1}}
COUNTS = {k: {"lines": 0, "valid": 0, "clean_errors": 0} for k in KINDS}  # printed at the end of the module

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|pad|>", "<|endoftext|>"]
texts = st.one_of(st.text(max_size=12), st.sampled_from(SPECIALS + ["", "\x00", "\ufeff", "\u2028", "user\n"]),
                  st.lists(st.sampled_from(SPECIALS + ["a", "\n", "assistant"]), max_size=5).map("".join))
leaves = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.integers(-3, 5),
                   st.floats(allow_nan=True, allow_infinity=True), texts)
json_values = st.recursive(leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(texts, c, max_size=4),
                           max_leaves=12)
roles = st.sampled_from(["system", "user", "assistant", "robot", "", None, 3])
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": st.one_of(texts, json_values)},
                                          optional={"name": texts}), max_size=4)
field_values = {"messages": st.one_of(messages, json_values), "prompt": st.one_of(texts, messages, json_values),
                "choices": st.one_of(st.lists(texts, max_size=4), json_values),
                "gold": st.one_of(st.integers(-2, 5), json_values), "label": st.one_of(st.booleans(), json_values),
                "margin": st.one_of(st.floats(allow_nan=True, allow_infinity=True), json_values)}


def records(kind):
    """Dicts with each of the kind's fields present or missing, well-typed or anything, plus extra keys."""
    fields = {f: field_values.get(f, st.one_of(texts, json_values)) for f in FIELDS[kind]}
    return st.fixed_dictionaries({}, optional={**fields, "extra": json_values}).map(lambda d: json.dumps(d).encode())


def mutated(line):
    """Byte-level damage to a line: a bad byte, a BOM, a NUL, a cut, a lone surrogate escape (never a newline,
    which would make it two lines)."""
    return st.one_of(
        st.tuples(st.integers(0, len(line)), st.binary(min_size=1, max_size=3).map(lambda b: b.replace(b"\n", b"\r"))).map(
            lambda t: line[:t[0]] + t[1] + line[t[0]:]),
        st.integers(0, len(line)).map(lambda i: line[:i]),
        st.sampled_from([b"\xef\xbb\xbf" + line, line.replace(b'"', b'"\x00', 1), line.replace(b'"', b'"\xff', 1),
                         line.replace(b'"', b'"\\ud800', 1), line + b"\r"]))


FIXED = [b"[" * 100_000, b"1" * 5000, b'{"gold": ' + b"9" * 5000 + b"}", b"NaN", b"null", b"[]", b'""', b"\x00",
         b"\xff\xfe{}", json.dumps({"text": "x" * 2_000_000}).encode(), b'{"a": 1} {"b": 2}']


def nearly_good(kind):
    """A good record with one string replaced by fuzzed text: mostly valid, so the consumers see odd text."""
    if kind == "chat":
        return st.tuples(texts, texts).map(lambda t: json.dumps({"messages": [
            {"role": "user", "content": t[0]}, {"role": "assistant", "content": t[1]}]}).encode())
    keys = [k for k, v in GOOD[kind].items() if isinstance(v, str)]
    return st.tuples(st.sampled_from(keys), texts).map(lambda t: json.dumps({**GOOD[kind], t[0]: t[1]}).encode())


def lines(kind):
    good = json.dumps(GOOD[kind]).encode()
    return st.one_of(records(kind), json_values.map(lambda v: json.dumps(v).encode()), records(kind).flatmap(mutated),
                     mutated(good), nearly_good(kind), st.sampled_from(FIXED))


def consume(kind, rec, enc):
    """What the scripts do with a record: render it through the chat template / tokenizer. User text can never
    become a special token."""
    if kind == "text":
        ids = enc.encode_ordinary(rec["text"])
        assert enc.decode(ids) == rec["text"]
        return
    msgs = rec["messages"] if kind == "chat" else list(rec["prompt"])
    responses = {"pref": [rec.get("chosen")], "kto": [rec.get("completion")], "mc": rec.get("choices", [])}
    for r in responses.get(kind, []) + ([rec["answer"]] if kind == "prompt" and rec.get("answer") else []):
        msgs = msgs + [{"role": "assistant", "content": r}]
    if kind == "mc":
        msgs = [{"role": "user", "content": rec["prompt"]}]
        assert all(enc.decode(enc.encode_ordinary(c)) == c for c in rec["choices"])
    ids, mask = C.render_chat(enc, msgs, add_generation_prompt=True)
    assert len(ids) == len(mask)
    assert ids.count(C.special_id(enc, "<|im_start|>")) == len(msgs) + 1  # the template's, none from the text


@pytest.mark.parametrize("kind", KINDS)
def test_read_jsonl_fuzz_gives_valid_records_or_file_line_errors(tmp_path, enc, kind):
    path = str(tmp_path / f"{kind}.jsonl")

    @settings(max_examples=1000, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(lines(kind))
    def check(line):
        with open(path, "wb") as f:  # a good line first, so the bad one is line 2 and the number is checked
            f.write(json.dumps(GOOD[kind]).encode() + b"\n" + line + b"\n")
        COUNTS[kind]["lines"] += 1
        try:
            recs = C.read_jsonl(path, kind)
        except M.UserError as e:
            assert str(e).startswith(f"{path}:2: "), str(e)[:200]
            assert "\n" not in str(e)
            COUNTS[kind]["clean_errors"] += 1
            return
        COUNTS[kind]["valid"] += 1
        for rec in recs:
            consume(kind, rec, enc)

    check()
    c = COUNTS[kind]
    print(f"\nread_jsonl {kind}: {c['lines']} lines, {c['valid']} valid, {c['clean_errors']} clean file:line errors")
    assert c["lines"] >= 1000 and c["clean_errors"] > 0 and c["valid"] > 0


def test_bom_and_crlf_are_accepted_and_bad_bytes_named_with_their_line(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps(GOOD["pref"]).encode()
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\r\n" + good + b"\r\n")
    assert len(C.read_jsonl(str(path), "pref")) == 2
    path.write_bytes(good + b"\n\n" + good[:5] + b"\xc3\x28" + good[5:] + b"\n")
    with pytest.raises(M.UserError, match=rf"^{path}:3: not UTF-8"):
        C.read_jsonl(str(path), "pref")
    path.write_bytes(good + b"\n" + good + b"\n{broken\n\xff\n")
    assert len(C.read_jsonl(str(path), "pref", skip_bad_lines=True)) == 2


@pytest.mark.parametrize("line, message", [
    (b'{"prompt": "p", "choices": ["a", "b"], "gold": true}', "'gold'"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}', "'margin' must be a finite number"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1e999}', "'margin' must be a finite number"),
    (b'{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}', "lone UTF-16 surrogate"),
    (b"[" * 100_000, "nested too deeply"),
    (b'{"gold": ' + b"9" * 5000 + b"}", "invalid JSON"),
])
def test_values_json_allows_but_no_script_can_use(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(line + b"\n")
    kind = "mc" if b"gold" in line else "pref"
    with pytest.raises(M.UserError, match=message):
        C.read_jsonl(str(path), kind)


# ----------------------------------------------------------------------------- user functions


def test_call_user_names_the_function_and_the_prompt(tmp_path):
    def fine(p, r):
        return len(r)

    assert C.call_user(fine, "f.py:fine", ["a", "b"], ["xy", ""]) == [2.0, 0.0]
    assert C.call_user(lambda p, r: torch.tensor(1.5), "t", ["a"], ["b"]) == [1.5]  # 0-d tensors are numbers
    assert C.call_user(lambda p, r: r == "yes", "b", ["a", "a"], ["yes", "no"], bool) == [True, False]
    cases = [(lambda p, r: 1 / 0, "raised ZeroDivisionError: division by zero"),
             (lambda p, r: float("nan"), "returned nan, expected a finite float"),
             (lambda p, r: float("inf"), "returned inf"),
             (lambda p, r: "0.5", "returned str '0.5', expected one float"),
             (lambda p, r: None, "returned NoneType"),
             (lambda p, r: [1.0, 2.0], "returned list of 2 values"),
             (lambda p, r: torch.ones(3), "returned Tensor that is not one number")]
    for fn, message in cases:
        with pytest.raises(M.UserError, match=r"^--reward w\.py:score: prompt 7: " + message.replace("(", r"\(")):
            C.call_user(lambda p, r, fn=fn: fn(p, r) if r == "bad" else 1.0, "--reward w.py:score",
                        ["p"] * 3, ["ok", "bad", "ok"], indices=[3, 7, 9])


@pytest.fixture(scope="module")
def world_fns(tmp_path_factory):
    path = tmp_path_factory.mktemp("fns") / "fns.py"
    path.write_text("def raises(prompt, response):\n    raise ValueError('boom')\n"
                    "def nan(prompt, response):\n    return float('nan')\n"
                    "def text(prompt, response):\n    return 'good'\n")
    return str(path)


@pytest.mark.parametrize("fn, message", [("raises", "raised ValueError: boom"), ("nan", "returned nan"),
                                         ("text", "returned str 'good'")])
def test_ppo_verifier_that_misbehaves_exits_2_naming_it(tmp_path, toy_dir, policy_and_rm, world_fns, fn, message):
    out = tmp_path / "o.pt"
    proc = run_script("ppo.py", "--model", policy_and_rm[0], "--data", os.path.join(toy_dir, "prompts.jsonl"),
                      "--reward", f"{world_fns}:{fn}", "--out", str(out), "--steps", "1", "--batch-size", "2",
                      "--max-new-tokens", "4", "--device", "cpu", "--eval-every", "0", check=False)
    assert_error_ends_run(proc, f"--reward {world_fns}:{fn}: prompt ", message)
    assert not out.exists()


def test_evaluate_scorer_that_raises_exits_2_naming_it(tmp_path, toy_dir, policy_and_rm, world_fns):
    proc = run_script("evaluate.py", "--model", policy_and_rm[0], "--data", os.path.join(toy_dir, "eval.jsonl"),
                      "--scorer", f"{world_fns}:raises", "--limit", "2", "--max-new-tokens", "4", "--no-speed",
                      "--out", str(tmp_path / "e"), check=False)
    assert_error_ends_run(proc, f"--scorer {world_fns}:raises: prompt 0:", "raised ValueError: boom")


# ----------------------------------------------------------------------------- every script, bad data


BAD_LINES = [(b'{"x": "\xff"}', "not UTF-8"), (b"[" * 50_000, "nested too deeply")]  # the rest in-process above


def script_args(script, data, ckpts, toy_dir, out):
    if script == "sft.py":
        return ["sft.py", "--model", ckpts[0], "--data", data, "--out", out, "--steps", "1", "--seq-len", "64"]
    if script in ("reward.py", "dpo.py"):
        return [script, "--model", ckpts[0], "--data", data, "--out", out, "--steps", "1", "--seq-len", "64"]
    if script == "ppo.py":
        return ["ppo.py", "--model", ckpts[0], "--reward-model", ckpts[1], "--data", data, "--out", out,
                "--steps", "1", "--batch-size", "2", "--max-new-tokens", "4"]
    if script == "online.py":
        return ["online.py", "--model", ckpts[0], "--reward-model", ckpts[1], "--data", data, "--out", out,
                "--steps", "1", "--batch-size", "2", "--max-new-tokens", "4"]
    return ["evaluate.py", "--model", ckpts[0], "--data", data, "--out", out, "--no-speed"]


@pytest.mark.parametrize("script, good_file", [("sft.py", "sft.jsonl"), ("reward.py", "prefs.jsonl"),
                                               ("dpo.py", "prefs.jsonl"), ("ppo.py", "prompts.jsonl"),
                                               ("online.py", "prompts.jsonl"), ("evaluate.py", "eval.jsonl")])
@pytest.mark.parametrize("bad, message", BAD_LINES)
def test_every_script_refuses_bad_data_with_one_line_and_no_output(tmp_path, toy_dir, policy_and_rm, script, good_file,
                                                                    bad, message):
    with open(os.path.join(toy_dir, good_file), "rb") as f:
        good = [next(f) for _ in range(4)]
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b"".join(good[:2]) + bad + b"\n" + b"".join(good[2:]))
    out = tmp_path / "out"
    proc = run_script(*script_args(script, str(data), policy_and_rm, toy_dir, str(out)), check=False)
    assert_one_line_error(proc, f"{data}:3:", message)
    assert not out.exists() and os.listdir(tmp_path) == ["bad.jsonl"]

