"""evaluate.py: every metric against a slow, obviously-correct loop; acc / acc_norm / acc_bytes where they
disagree; the judge's two orders; the whole script on the built-in world; bad files and flags.

    python -m pytest tests/test_evaluate.py -q
"""
import json
import math
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import evaluate as E
import common as C
import formats
import model as M
from conftest import ROOT, always_a_judge, run_script

CPU = torch.device("cpu")


def cfg(**kw):
    return E.Config(**{"batch_size": 3, "max_new_tokens": 8, **kw})


def naive_logp(model, ids, t, context=None):
    """log p(ids[t] | ids[t-context:t]) from one unpadded forward, no cache, no batching."""
    start = 0 if context is None else max(0, t - context)
    with torch.no_grad():
        logits = model(torch.tensor([ids[start:t]]))[0, -1]
    return torch.log_softmax(logits.double(), -1)[ids[t]].item()


# ----------------------------------------------------------------------------- answers

def test_exact_match_and_contains_examples():
    assert E.exact_match(" 5. ", "5") and E.exact_match("a  b\n", "a b")
    assert not E.exact_match("The answer is 5.", "5") and E.contains_answer("The answer is 5.", "5")
    assert not E.contains_answer("It is 15.", "5") and not E.contains_answer("5a", "5")
    assert not E.exact_match("hello", "HELLO")  # case is the task for upper-casing


word = st.text(alphabet="ab5 .,!?-\n", max_size=12)


@settings(max_examples=200, deadline=None)
@given(word, word)
def test_contains_matches_naive_scan(response, answer):
    r, a = E.normalize_answer(response), E.normalize_answer(answer)
    is_word = str.isalnum
    naive = bool(a) and any(r[i:i + len(a)] == a and (i == 0 or not is_word(r[i - 1]))
                            and (i + len(a) == len(r) or not is_word(r[i + len(a)])) for i in range(len(r)))
    assert E.contains_answer(response, answer) == naive
    assert E.normalize_answer(r) == r
    if E.exact_match(response, answer) and a:
        assert E.contains_answer(response, answer)


def test_build_prompt_shots_after_system_and_cot_on_last_user_turn():
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    shots = E.shot_messages([{"prompt": C.as_messages("What is 1 + 1?", "x"), "answer": "2"}], "x")
    msgs = E.build_prompt(prompt, shots, cot=True)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[1]["content"] == "What is 1 + 1?" and msgs[2]["content"] == "2"
    assert msgs[3]["content"] == "What is 2 + 2? " + E.COT
    assert prompt[1]["content"] == "What is 2 + 2?" and shots[0]["content"] == "What is 1 + 1?"  # data untouched
    with pytest.raises(M.UserError, match="no 'answer'"):
        E.shot_messages([{"prompt": C.as_messages("q", "x"), "answer": None}], "eval.jsonl")


# ----------------------------------------------------------------------------- multiple choice

def test_mc_choice_acc_norm_bytes_disagree():
    # sum log p favours "a"; per character "abcde" (-0.3 vs -0.8); per byte "日本" (6 bytes: -0.27 vs -0.3)
    choices, logps = ["a", "abcde", "日本"], [-1.0, -1.5, -1.6]
    assert E.mc_choice(logps, choices) == (0, 1, 2)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(-50, 0), st.text(alphabet="ab é日", min_size=1, max_size=6)),
                min_size=2, max_size=5))
def test_mc_choice_matches_naive_loop(items):
    logps, choices = [x[0] for x in items], [x[1] for x in items]

    def first_best(keys):
        best = 0
        for i, k in enumerate(keys):
            best = i if k > keys[best] else best
        return best

    naive = (first_best(logps), first_best([lp / len(c) for lp, c in zip(logps, choices)]),
             first_best([lp / len(c.encode()) for lp, c in zip(logps, choices)]))
    assert E.mc_choice(logps, choices) == naive


def test_mc_eval_matches_naive_loop(tiny_model, enc):
    records = [{"prompt": "Q: Pick one A:", "choices": [" yes", " no", " maybe é"], "gold": 1},
               {"prompt": "Q: Sum of 2 and 2? A:", "choices": [" 4", " five", " 22"], "gold": 0}]
    shots = [{"prompt": "Q: Say x A:", "choices": [" x", " y"], "gold": 0}]
    contexts = {  # lm-eval's two contexts, written out by hand
        True: lambda r: C.render_chat(enc, [{"role": "user", "content": "Q: Say x A:"},
                                            {"role": "assistant", "content": " x"},
                                            {"role": "user", "content": r["prompt"]}], True)[0],
        False: lambda r: enc.encode_ordinary("Q: Say x A: x\n\n" + r["prompt"])}
    for template in (True, False):
        c = cfg(chat_template=template, mc="mc.jsonl")
        got = E.mc_logprobs(tiny_model, enc, records, shots, c, CPU)
        hits = [0, 0, 0]
        for r, got_logps in zip(records, got):
            ctx = contexts[template](r)
            logps = []
            for ch in r["choices"]:
                ids = ctx + enc.encode_ordinary(ch)
                logps.append(sum(naive_logp(tiny_model, ids, t) for t in range(len(ctx), len(ids))))
            assert got_logps.tolist() == pytest.approx(logps, abs=1e-4)
            for k, i in enumerate(E.mc_choice(logps, r["choices"])):
                hits[k] += i == r["gold"]
        assert E.mc_eval(tiny_model, enc, records, shots, c, CPU) == pytest.approx([h / len(records) for h in hits])


# ----------------------------------------------------------------------------- perplexity

@settings(max_examples=100, deadline=None)
@given(st.integers(1, 60), st.integers(2, 12), st.data())
def test_sliding_windows_score_every_token_once(n, seq_len, data):
    stride = data.draw(st.integers(1, seq_len - 1))
    mask = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    ids = list(range(n))  # ids are positions, so a window tells where it sits
    scored = []
    for w_ids, w_mask in E.sliding_windows(ids, mask, seq_len, stride):
        assert len(w_ids) == len(w_mask) <= seq_len and w_ids == list(range(w_ids[0], w_ids[0] + len(w_ids)))
        for j, (t, k) in enumerate(zip(w_ids, w_mask)):
            if k:
                scored.append(t)
                assert j >= min(t, seq_len - stride)  # context: all of it, or at least seq_len - stride tokens
    assert sorted(scored) == [t for t in range(1, n) if mask[t]]


def test_perplexity_matches_naive_loop(tiny_model, enc):
    doc = "the quick brown fox jumps over the lazy dog, twice: the quick brown fox."
    ids = [C.special_id(enc, "<|endoftext|>")] + enc.encode_ordinary(doc)
    L = 16
    for stride in (1, 5, L // 2):
        ppl, bpb, n = E.perplexity(tiny_model, enc, "text", [doc], cfg(seq_len=L, stride=stride), CPU)
        nll = 0.0
        for t in range(1, len(ids)):  # the stride rule stated independently: which window scores token t
            end = min(len(ids), L if t < L else L + stride * ((t - L) // stride + 1))
            nll -= naive_logp(tiny_model, ids, t, context=t - max(0, end - L))
        assert n == len(doc)
        assert math.log(ppl) == pytest.approx(nll / n, rel=1e-5)
        assert bpb == pytest.approx(nll / math.log(2) / len(doc.encode()), rel=1e-5)
        assert bpb == pytest.approx(math.log2(ppl), rel=1e-6)  # byte tokenizer, ASCII: one byte a token


def test_chat_perplexity_scores_assistant_spans_only(tiny_model, enc):
    chats = [{"messages": [{"role": "user", "content": "hi é"}, {"role": "assistant", "content": "hello 日本"},
                           {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]}]
    ids, mask = C.render_chat(enc, chats[0]["messages"])
    ppl, bpb, n = E.perplexity(tiny_model, enc, "chat", chats, cfg(), CPU)
    nll = -sum(naive_logp(tiny_model, ids, t) for t in range(1, len(ids)) if mask[t])
    assert n == sum(mask) == len("hello 日本".encode()) + len("ok") + 2  # content bytes + two <|im_end|>
    assert math.log(ppl) == pytest.approx(nll / n, rel=1e-5)
    assert bpb == pytest.approx(E.bits_per_byte(nll, len("hello 日本".encode()) + 2), rel=1e-5)


# ----------------------------------------------------------------------------- generation and KL

@pytest.mark.parametrize("template", [True, False])
def test_generation_matches_naive_greedy_loop(tiny_model, enc, template):
    c = cfg(chat_template=template, max_new_tokens=6)
    prompts = [C.as_messages(p, "x") for p in ["What is 2 + 3?", "Hi", "Reverse the word 'stop' please."]]
    texts, prompt_ids, responses = E.generate_responses(tiny_model, enc, prompts, c, CPU)
    stops = set(C.stop_ids(enc, template))
    for p, ids, r in zip(prompts, prompt_ids, responses):
        assert ids == E.render(enc, p, c)
        seq = list(ids)
        for _ in range(c.max_new_tokens):
            with torch.no_grad():
                seq.append(int(tiny_model(torch.tensor([seq]))[0, -1].argmax()))
            if seq[-1] in stops:
                break
        assert r == seq[len(ids):]


def test_sampling_is_seeded_and_speed_size_are_reported(tiny_model, enc, tmp_path):
    prompts = [C.as_messages("Hi", "x")] * 3
    runs = [E.generate_responses(tiny_model, enc, prompts, cfg(temperature=1.0, seed=s), CPU)[2] for s in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    prefill, decode = E.measure_speed(tiny_model, cfg(speed_batch=2, speed_prompt_len=300, speed_new_tokens=4), CPU)
    assert prefill > 0 and decode > 0  # the prompt was clipped to fit max_seq_len
    formats.save_safetensors(str(tmp_path / "m.safetensors"), tiny_model, enc)
    assert E.size_on_disk(str(tmp_path / "m.safetensors")) == sum(f.stat().st_size for f in tmp_path.iterdir())


def test_kl_to_ref_matches_naive_loop(tiny_model, enc):
    torch.manual_seed(1)
    ref = M.build_model("tiny", enc, n_layer=1).eval()
    prompt_ids = [enc.encode_ordinary("abc"), enc.encode_ordinary("hello there")]
    responses = [enc.encode_ordinary("xy"), enc.encode_ordinary("zzz!")]
    got = E.kl_to_ref(tiny_model, ref, prompt_ids, responses, cfg(), CPU, C.special_id(enc, "<|pad|>"))
    want = []
    for p, r in zip(prompt_ids, responses):
        seq, total = p + r, 0.0
        for t in range(len(p), len(seq)):
            with torch.no_grad():
                lp = torch.log_softmax(tiny_model(torch.tensor([seq[:t]]))[0, -1].double(), -1)
                lq = torch.log_softmax(ref(torch.tensor([seq[:t]]))[0, -1].double(), -1)
            total += sum(lp[v].exp().item() * (lp[v] - lq[v]).item() for v in range(len(lp)))
        want.append(total)
    assert got.tolist() == pytest.approx(want, rel=1e-4)  # one sum per response
    same = E.kl_to_ref(tiny_model, tiny_model, prompt_ids, responses, cfg(), CPU, 0)
    assert same.tolist() == pytest.approx([0, 0], abs=1e-6)


@given(st.lists(st.floats(-1e3, 1e3), min_size=0, max_size=40))
def test_standard_error_is_the_sample_sd_over_root_n(values):
    se = E.standard_error(values)
    if len(values) < 2:
        assert se == 0
        return
    t = torch.tensor(values, dtype=torch.float64)
    assert se == pytest.approx((t.std(unbiased=True) / math.sqrt(len(values))).item(), rel=1e-9, abs=1e-9)


def test_standard_error_examples():
    assert E.standard_error([0, 1]) == pytest.approx(0.5)  # sd 0.7071 / sqrt 2
    assert E.standard_error([3, 3, 3]) == 0


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16))
def test_kl_divergence_is_nonnegative_and_zero_on_itself(seed):
    g = torch.Generator().manual_seed(seed)
    p, q = torch.randn(3, 7, generator=g) * 3, torch.randn(3, 7, generator=g) * 3
    assert (M.kl_divergence(p, q) >= -1e-6).all()
    assert M.kl_divergence(p, p).abs().max() < 1e-6


# ----------------------------------------------------------------------------- win rate and the judge

ints = st.lists(st.integers(-3, 3), min_size=1, max_size=20)


@settings(max_examples=100, deadline=None)
@given(ints, st.data())
def test_win_rate_matches_naive_loop_and_is_antisymmetric(a, data):
    b = data.draw(st.lists(st.integers(-3, 3), min_size=len(a), max_size=len(a)))
    naive = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)
    assert E.win_rate(a, b) == pytest.approx(naive)
    assert E.win_rate(a, b) + E.win_rate(b, a) == pytest.approx(1.0)
    assert (E.judge_preference(a, b) + E.judge_preference(b, a)).tolist() == [1.0] * len(a)


def test_judge_two_orders_cancel_position_bias():
    always_a = torch.tensor([2.0, 0.1, 5.0])  # log p(A) > log p(B) whatever is shown
    assert E.judge_preference(always_a, always_a).tolist() == [0.5, 0.5, 0.5]
    assert E.judge_preference(always_a, -always_a).tolist() == [1.0, 1.0, 1.0]  # policy preferred in both orders
    assert E.judge_preference(-always_a, always_a).tolist() == [0.0, 0.0, 0.0]


def test_judge_margins_both_orders_and_naive_loop(tiny_model, enc):
    prompts = [C.as_messages(p, "x") for p in ["What is 1 + 1?", "Say hi"]]
    x, y = ["2", "hi there, friend"], ["The answer is 2.", "no"]
    first = E.judge_margins(tiny_model, enc, prompts, x, y, cfg(batch_size=2), CPU)
    second = E.judge_margins(tiny_model, enc, prompts, y, x, cfg(batch_size=2), CPU)
    for i in range(2):  # batched, left padded == one unpadded forward
        ask = (f"{E.JUDGE_QUESTION}\n\n[Prompt]\n{prompts[i][0]['content']}\n\n[Response A]\n{x[i]}\n\n"
               f"[Response B]\n{y[i]}\n\nAnswer with one letter, A or B.")
        ids = C.render_chat(enc, [{"role": "user", "content": ask}], True)[0]
        with torch.no_grad():
            lp = torch.log_softmax(tiny_model(torch.tensor([ids]))[0, -1].double(), -1)
        assert first[i].item() == pytest.approx((lp[ord("A")] - lp[ord("B")]).item(), abs=1e-4)
    # the same judge comparing y with x gives exactly the complement: the two orders are really both asked
    assert (E.judge_preference(first, second) + E.judge_preference(second, first)).tolist() == [1.0, 1.0]


def test_position_biased_judge_model_gives_half(enc):
    judge = always_a_judge(enc)
    prompts = [C.as_messages("Which?", "x")] * 2
    a, b = ["good", "bad answer"], ["bad", "good answer"]
    m1 = E.judge_margins(judge, enc, prompts, a, b, cfg(), CPU)
    m2 = E.judge_margins(judge, enc, prompts, b, a, cfg(), CPU)
    assert (m1 > 0).all() and (m2 > 0).all()
    assert E.judge_preference(m1, m2).tolist() == [0.5, 0.5]


def test_length_controlled_win_rate():
    n = 40
    same = torch.full((n,), 10.0)
    prefs = torch.tensor([1.0] * 30 + [0.0] * 10)
    assert E.length_controlled_win_rate(prefs, same, same) == pytest.approx(0.75, abs=1e-2)
    # every win explained by length, half the pairs longer: nothing left at equal length
    la = torch.tensor([20.0, 5.0] * (n // 2))
    lb = torch.tensor([5.0, 20.0] * (n // 2))
    by_length = (la > lb).double()
    assert E.length_controlled_win_rate(by_length, la, lb) == pytest.approx(0.5, abs=1e-6)
    # longer answers win more often and the policy is usually longer: the LC rate falls below the raw rate
    g = torch.Generator().manual_seed(0)
    d = torch.randn(n, generator=g) * 10 + 5
    wins = (torch.rand(n, generator=g) < torch.sigmoid(d / 5)).double()
    lc = E.length_controlled_win_rate(wins, d + 50, torch.full((n,), 50.0))
    assert lc < wins.mean().item()
    # cross-check the L-BFGS fit with slow plain gradient descent on the same objective
    x = torch.tanh(d / d.std()).double()
    t0, t1 = 0.0, 0.0
    for _ in range(20000):
        p = torch.sigmoid(t0 + t1 * x)
        t0 -= 1.0 * ((p - wins).mean().item() + 1e-3 * t0)
        t1 -= 1.0 * (((p - wins) * x).mean().item() + 1e-3 * t1)
    assert lc == pytest.approx(1 / (1 + math.exp(-t0)), abs=1e-5)


# ----------------------------------------------------------------------------- world functions, flags, files

def test_load_function_errors(tmp_path):
    good = tmp_path / "w.py"
    good.write_text("def score(prompt, response):\n    return len(response)\n"
                    "def text(prompt, response):\n    return 'yes'\n")
    assert C.load_function(f"{good}:score")([], "abc") == 3
    bad = tmp_path / "broken.py"
    bad.write_text("import no_such_module_here\n")
    for spec, msg in [(str(good), "file.py:function"), (f"{tmp_path}/none.py:f", "no such file"),
                      (f"{good}:missing", "no function"), (f"{bad}:f", "failed to import")]:
        with pytest.raises(M.UserError, match=msg):
            C.load_function(spec)
    with pytest.raises(M.UserError, match="w.py:text: prompt 0: returned str 'yes', expected one float"):
        C.call_user(C.load_function(f"{good}:text"), "w.py:text", [[]], ["r"], float)


@pytest.mark.parametrize("argv, msg", [
    ([], "give --model"),
    (["--model", "a.pt", "--baseline", "b.pt"], "win rate needs"),
    (["--model", "a.pt", "--reward-model", "r.pt", "--judge", "j.pt", "--baseline", "b.pt"], "not both"),
    (["--model", "a.pt", "--ref", "r.pt"], "give --data"),
    (["--model", "a.pt", "--redteam", "r.jsonl"], "--safety"),
    (["--model", "/nonexistent/x.pt"], "no such checkpoint"),
])
def test_bad_flags(argv, msg):
    with pytest.raises(M.UserError, match=msg):
        E.main(argv)


@pytest.fixture
def tiny_ckpts(tmp_path, enc):
    torch.manual_seed(0)
    paths = {}
    for name, preset, head in [("a", "tiny", "lm"), ("b", "tiny-gpt2", "lm"), ("rm", "tiny", "scalar")]:
        m = M.build_model(preset, enc, n_layer=1, d_model=32, d_ff=64, max_seq_len=128, head=head)
        if head == "scalar":
            torch.nn.init.normal_(m.score.weight, std=0.5)
        paths[name] = str(tmp_path / f"{name}.pt")
        C.save_checkpoint(paths[name], m, enc)
    return paths


def test_script_on_the_built_in_world(tiny_ckpts, toy_dir, tmp_path):
    out = tmp_path / "results.json"
    world = os.path.join(ROOT, "data", "toyworld.py")
    proc = run_script("evaluate.py", "--model", f"{tiny_ckpts['a']},{tiny_ckpts['b']}",
                      "--data", f"{toy_dir}/eval.jsonl", "--redteam", f"{toy_dir}/redteam.jsonl",
                      "--mc", f"{toy_dir}/mc.jsonl", "--text", f"{toy_dir}/sft.jsonl",
                      "--scorer", f"{world}:gold_reward", "--correct", f"{world}:is_correct",
                      "--safety", f"{world}:is_safe", "--baseline", tiny_ckpts["a"], "--reward-model",
                      tiny_ckpts["rm"], "--ref", tiny_ckpts["a"], "--limit", "3", "--max-new-tokens", "8",
                      "--speed-prompt-len", "16", "--speed-new-tokens", "4", "--out", str(out),
                      "--responses", str(tmp_path / "responses.jsonl"))
    results = json.loads(out.read_text())
    assert [r["model"] for r in results["results"]] == [tiny_ckpts["a"], tiny_ckpts["b"]]
    assert set(results["results"][0]) == {"model", *E.COLUMNS} - {"best_of", "kl_bon"}  # those: --best-of
    a = results["results"][0]
    assert a["win_rate"] == 0.5 and a["kl_ref"] == pytest.approx(0, abs=1e-6)  # a against itself
    for key in ("exact_match", "contains", "accuracy", "safety", "mc_acc", "mc_acc_norm", "mc_acc_bytes", "win_rate"):
        assert 0 <= a[key] <= 1
    assert a["params"] > 0 and a["size_mb"] > 0 and a["ppl"] > 1 and a["bpb"] > 0
    table = proc.stdout.strip().splitlines()
    assert table[0].startswith("| model | ppl | bpb | exact_match") and len(table) == 4
    assert table[2].startswith(f"| {tiny_ckpts['a']} |")

    # --responses: the very responses the row was scored on (gold_reward again from them), arena.py's input
    kept = C.read_jsonl(str(tmp_path / "responses.jsonl"), "prompt")
    assert [k["prompt"] for k in kept] == [r["prompt"] for r in C.read_jsonl(f"{toy_dir}/eval.jsonl", "prompt")[:3]]
    gold_reward = C.load_function(f"{world}:gold_reward")
    for row in results["results"]:
        gold = [gold_reward(k["prompt"], k["responses"][row["model"]]) for k in kept]
        assert row["gold_reward"] == pytest.approx(sum(gold) / len(gold), abs=1e-9)
        # per_item: the scores the means came from, prompt by prompt; stderr: their standard errors
        items, se = results["per_item"][row["model"]], results["stderr"][row["model"]]
        assert items["gold_reward"] == pytest.approx(gold, abs=1e-12)
        assert set(items) == set(se) == {"accuracy", "gold_reward", "kl_ref", "safety"}
        for key, values in items.items():
            assert len(values) == 3 and sum(values) / 3 == pytest.approx(row[key], abs=1e-9)
            assert se[key] == pytest.approx(E.standard_error(values), abs=1e-12)
    run_script("arena.py", "--build-pairs", str(tmp_path / "responses.jsonl"), "--pairs", str(tmp_path / "p.jsonl"))
    pairs = C.read_jsonl(str(tmp_path / "p.jsonl"), "prompt")
    assert len(pairs) == 3 and {(p["model_a"], p["model_b"]) for p in pairs} == {tuple(sorted(tiny_ckpts[x] for x in "ab"))}


def test_script_prompting_variants_and_judge(tiny_ckpts, toy_dir, tmp_path):
    out = tmp_path / "r.json"
    run_script("evaluate.py", "--model", tiny_ckpts["b"], "--data", f"{toy_dir}/eval.jsonl",
               "--text", f"{toy_dir}/pretrain.txt", "--mc", f"{toy_dir}/mc.jsonl", "--no-chat-template",
               "--shots", "2", "--cot", "--temperature", "0.8", "--top-p", "0.9", "--baseline", tiny_ckpts["a"],
               "--judge", tiny_ckpts["a"], "--limit", "2", "--max-new-tokens", "6", "--no-speed", "--out", str(out))
    row = json.loads(out.read_text())["results"][0]
    assert {"win_rate", "win_rate_lc", "ppl", "mc_acc", "exact_match"} <= set(row)
    assert "decode_tok_s" not in row and row["win_rate"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_bad_data_file_and_missing_checkpoint_exit_2(tiny_ckpts, tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"prompt": "ok", "answer": "1"}\n{"prompt": "no answer field", "answer": 3}\n')
    proc = run_script("evaluate.py", "--model", tiny_ckpts["a"], "--data", str(bad), check=False)
    assert proc.returncode == 2 and f"{bad}:2:" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script("evaluate.py", "--model", str(tmp_path / "missing.pt"), check=False)
    assert proc.returncode == 2 and "missing.pt: no such checkpoint" in proc.stderr


def test_samples_average_n_responses_per_prompt(tiny_ckpts, toy_dir, tmp_path):
    """--samples 3: every prompt's per_item score is the mean over the 3 responses generate_responses draws (the
    same seeded stream), and the row's mean is theirs."""
    world = os.path.join(ROOT, "data", "toyworld.py")
    out = tmp_path / "r.json"
    E.main(["--model", tiny_ckpts["a"], "--data", f"{toy_dir}/eval.jsonl", "--redteam", f"{toy_dir}/redteam.jsonl",
            "--scorer", f"{world}:gold_reward", "--safety", f"{world}:is_safe", "--limit", "4", "--samples", "3",
            "--temperature", "1", "--max-new-tokens", "6", "--no-speed", "--ref", tiny_ckpts["a"], "--out", str(out)])
    got = json.loads(out.read_text())
    records = C.read_jsonl(f"{toy_dir}/eval.jsonl", "prompt")[:4]
    model, enc, _ = C.load_model(tiny_ckpts["a"])
    texts = E.generate_responses(model.eval(), enc, [E.build_prompt(r["prompt"], [], False) for r in records],
                                 cfg(temperature=1.0, max_new_tokens=6, batch_size=16), CPU, n=3)[0]
    gold = C.load_function(f"{world}:gold_reward")
    want = [sum(gold(r["prompt"], t) for t in texts[3 * i:3 * i + 3]) / 3 for i, r in enumerate(records)]
    items = got["per_item"][tiny_ckpts["a"]]
    assert len(set(texts)) > 1  # sampled: the responses differ
    assert items["gold_reward"] == pytest.approx(want, abs=1e-12)
    assert len(items["safety"]) == 4 and len(items["kl_ref"]) == 4
    assert got["results"][0]["gold_reward"] == pytest.approx(sum(want) / 4, abs=1e-12)
    assert E.per_prompt([1, 2, 3, 4, 5, 6], 3) == [2, 5] and E.per_prompt([1.0, 0.0], 1) == [1.0, 0.0]
    with pytest.raises(M.UserError, match="--samples"):
        E.main(["--model", tiny_ckpts["a"], "--data", f"{toy_dir}/eval.jsonl", "--samples", "2"])  # greedy
