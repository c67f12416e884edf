"""evaluate.py --suite: MMLU, HellaSwag, ARC, TruthfulQA (mc1, mc2) and GSM8K from local files in their published
schemas (tests/fixtures/suites/, written for these tests). Each suite's score equals the metric computed by hand
here from a direct forward; each prompt equals lm-eval's format, written out literally, on one record; and (slow,
with lm-eval installed) every score, log-likelihood and greedy reply equals lm-evaluation-harness's own.

    python -m pytest tests/test_suites.py -q
    python -m pytest tests/test_suites.py -q -m slow -k oracle      # needs lm-eval==0.4.13 (bench only)
"""
import json
import os
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

import common as C
import evaluate as E
import model as M
from conftest import ROOT, assert_one_line_error, run_script

CPU = torch.device("cpu")
FIX = os.path.join(ROOT, "tests", "fixtures", "suites")


def cfg(**kw):
    return E.Config(**{"batch_size": 3, "max_new_tokens": 24, **kw})


def raw(name):
    with open(os.path.join(FIX, name)) as f:
        return [json.loads(line) for line in f if line.strip()]


def docs(name, path=None, k=0, fewshot=None):
    pool = E.read_suite(name, os.path.join(FIX, fewshot), False) if fewshot else None
    return E.suite_shots(name, E.read_suite(name, os.path.join(FIX, path or f"{name}.jsonl"), False), pool, k)


@pytest.fixture(params=["tiny", "tiny-gpt2"])
def lm(request, enc):
    """Long enough for TruthfulQA's preamble in bytes (nothing truncated), weights large enough to differ."""
    torch.manual_seed(0)
    model = M.build_model(request.param, enc, n_layer=1, d_model=32, d_ff=64, max_seq_len=1024).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model


def continuation_logp(model, enc, context, continuation):
    """log p(continuation | context) from one unpadded forward over their joint encoding (the byte tokenizer: the
    same ids as encoding them apart)."""
    ctx, ids = enc.encode_ordinary(context), enc.encode_ordinary(context + continuation)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
    return sum(lp[t - 1, ids[t]].item() for t in range(len(ctx), len(ids)))


def argmax(xs):
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # ties to the first, as np.argmax


# ----------------------------------------------------------------------------- the prompts, literally

def test_mmlu_prompt_is_lm_evals():
    scored, shots = docs("mmlu", k=1)
    assert E.suite_context("mmlu", scored[0], shots[0]) == (
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "Which bone is found in the upper arm?\nA. Femur\nB. Humerus\nC. Tibia\nD. Radius\nAnswer: B\n\n"
        "How many chambers does the human heart have?\nA. Two\nB. Three\nC. Four\nD. Five\nAnswer:")
    assert scored[0]["choices"] == ["A", "B", "C", "D"] and scored[0]["gold"] == 2  # scored as " A" .. " D"
    math_doc = next(d for d in scored if d["subject"] == "elementary_mathematics")
    assert E.suite_context("mmlu", math_doc, []).startswith(
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n")
    # Hendrycks' CSV gives the same records as the Hugging Face rows
    csv_docs = E.read_suite("mmlu", os.path.join(FIX, "anatomy_test.csv"), False)
    assert csv_docs == E.read_suite("mmlu", os.path.join(FIX, "mmlu.jsonl"), False)[:2]


def test_hellaswag_prompt_is_lm_evals():
    d = E.read_suite("hellaswag", os.path.join(FIX, "hellaswag.jsonl"), False)
    assert E.suite_context("hellaswag", d[0], []) == "Roof shingle removal: A man is sitting on a roof. He"
    # WikiHow artifacts: " [title]" -> ". ", [brackets] dropped, each double space once made single, capitalize()
    assert d[1]["query"] == ("Making a paper boat: How to fold a paper boat. Take a sheet of paper.  Fold it in half. "
                             "Then, fold the corners")
    assert d[1]["choices"] == ["down to make a triangle.  Press the creases.", "into the water at once.",
                               " Paint the boat red.", "and throw it away."]
    assert [x["gold"] for x in d] == [3, 0, 0]


def test_arc_truthfulqa_gsm8k_prompts_are_lm_evals():
    scored, shots = docs("arc", k=1)
    assert E.suite_context("arc", scored[0], shots[0]) == (
        "Question: Which of these is a source of light?\nAnswer: the Sun\n\n"
        "Question: What do plants need to make food?\nAnswer:")
    assert scored[0]["choices"] == ["sunlight", "sand", "salt"] and scored[0]["gold"] == 0  # label "1"
    tq = E.read_suite("truthfulqa", os.path.join(FIX, "truthfulqa.jsonl"), False)
    assert E.suite_context("truthfulqa", tq[1], []) == (
        "Q: What is human life expectancy in the United States?\n"
        "A: Human life expectancy in the United States is 78 years.\n\n"
        "Q: Who was president of the United States in 1955?\n"
        "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
        "Q: Which party did he belong to?\nA: He belonged to the Republican Party.\n\n"
        "Q: What is the square root of banana?\nA: I have no comment.\n\n"
        "Q: How does a telescope work?\n"
        "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
        "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain.\n\n"
        "Q: Can pigs fly?\nA:")
    scored, shots = docs("gsm8k", k=2)
    assert E.suite_context("gsm8k", scored[0], shots[0]) == (
        "Question: Tom has 1,000 apples and buys 234 more. How many apples does he have?\n"
        "Answer: Tom has 1000 + 234 = <<1000+234=1234>>1234 apples.\n#### 1234\n\n"
        "Question: A box holds 9 eggs. How many eggs are in 11 boxes?\n"
        "Answer: 11 boxes hold 11 * 9 = <<11*9=99>>99 eggs.\n#### 99\n\n"
        "Question: Ann had $20 and spent $5. How much money does she have left?\nAnswer:")


def test_mmlu_shots_come_from_the_same_subject_of_the_fewshot_file():
    scored, shots = docs("mmlu", k=1, fewshot="mmlu_dev.jsonl")
    assert len(scored) == 6  # a few-shot file: every record is scored
    first = {"anatomy": "Which organ pumps blood?", "elementary_mathematics": "What is 2 + 3?"}
    assert [s[0]["query"].split("\n")[0] for s in shots] == [first[d["subject"]] for d in scored]
    with pytest.raises(M.UserError, match="fewer than --suite-shots 2 few-shot examples of subject "
                                          "'elementary_mathematics'"):
        docs("mmlu", k=2, fewshot="mmlu_dev.jsonl")  # the dev file holds one example of it


# ----------------------------------------------------------------------------- scores against a hand loop

def by_hand_mc(model, enc, contexts, choice_lists, golds):
    """acc and acc_norm (log p / len(choice), lm-eval's) of " " + choice after each context."""
    acc = norm = 0
    for ctx, choices, gold in zip(contexts, choice_lists, golds):
        lps = [continuation_logp(model, enc, ctx, " " + c) for c in choices]
        acc += argmax(lps) == gold
        norm += argmax([lp / len(c) for lp, c in zip(lps, choices)]) == gold
    return acc / len(golds), norm / len(golds)


def test_mmlu_acc_by_hand(lm, enc):
    rows = raw("mmlu.jsonl")
    first = {}
    for r in rows:
        first.setdefault(r["subject"], r)  # with 1 shot each subject's first record is the shot
    contexts, golds = [], []
    for r in rows:
        shot = first[r["subject"]]
        if r is shot:
            continue

        def text(x):
            return x["question"].strip() + "".join(f"\n{L}. {c}" for L, c in zip("ABCD", x["choices"])) + "\nAnswer:"

        subject = r["subject"].replace("_", " ")
        contexts.append(f"The following are multiple choice questions (with answers) about {subject}.\n\n"
                        f"{text(shot)} {'ABCD'[shot['answer']]}\n\n{text(r)}")
        golds.append(r["answer"])
    want = by_hand_mc(lm, enc, contexts, [list("ABCD")] * len(golds), golds)[0]
    got = E.suite_eval(lm, enc, "mmlu", *docs("mmlu", k=1), cfg(), CPU)
    assert got == {"mmlu_acc": pytest.approx(want)}


def test_hellaswag_acc_norm_by_hand(lm, enc):
    def pre(t):
        t = t.strip().replace(" [title]", ". ")
        return re.sub(r"\[.*?\]", "", t).replace("  ", " ")

    rows = raw("hellaswag.jsonl")
    contexts = [pre(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize()) for r in rows]
    choices = [[pre(e) for e in r["endings"]] for r in rows]
    acc, norm = by_hand_mc(lm, enc, contexts, choices, [int(r["label"]) for r in rows])
    got = E.suite_eval(lm, enc, "hellaswag", *docs("hellaswag"), cfg(), CPU)
    assert got == {"hellaswag_acc": pytest.approx(acc), "hellaswag_acc_norm": pytest.approx(norm)}


def test_arc_acc_and_acc_norm_by_hand(lm, enc):
    rows = raw("arc.jsonl")
    contexts = [f"Question: {r['question']}\nAnswer:" for r in rows]
    golds = [r["choices"]["label"].index(r["answerKey"]) for r in rows]
    acc, norm = by_hand_mc(lm, enc, contexts, [r["choices"]["text"] for r in rows], golds)
    got = E.suite_eval(lm, enc, "arc", *docs("arc"), cfg(), CPU)
    assert got == {"arc_acc": pytest.approx(acc), "arc_acc_norm": pytest.approx(norm)}


def test_truthfulqa_mc1_mc2_by_hand(lm, enc):
    rows = raw("truthfulqa.jsonl")
    mc1 = mc2 = 0.0
    for r in rows:
        ctx = E.TRUTHFULQA_PREAMBLE + "\n\nQ: " + r["question"] + "\nA:"
        lps = [continuation_logp(lm, enc, ctx, " " + c) for c in r["mc1_targets"]["choices"]]
        mc1 += argmax(lps) == 0
        probs = [torch.tensor(continuation_logp(lm, enc, ctx, " " + c), dtype=torch.float64).exp().item()
                 for c in r["mc2_targets"]["choices"]]
        mc2 += sum(p for p, lab in zip(probs, r["mc2_targets"]["labels"]) if lab == 1) / sum(probs)
    got = E.suite_eval(lm, enc, "truthfulqa", *docs("truthfulqa"), cfg(), CPU)
    assert got == {"truthfulqa_mc1": pytest.approx(mc1 / len(rows)), "truthfulqa_mc2": pytest.approx(mc2 / len(rows))}
    assert 0 < got["truthfulqa_mc2"] < 1


def scripted(model, enc, replies):
    """Patch `model` into one that writes replies[i] on its i-th generate call (batch size 1), whatever it reads, and
    records the prompt it was given: each new cache is the next reply's cursor."""
    queue = [enc.encode_ordinary(r) + [C.special_id(enc, "<|endoftext|>")] for r in replies]
    seen = []

    def new_cache(batch, length):
        return {"reply": queue.pop(0), "n": 0}

    def forward(ids, attention_mask=None, cache=None):
        if cache["n"] == 0:
            seen.append(enc.decode([t for t, k in zip(ids[0].tolist(), attention_mask[0].tolist()) if k]))
        logits = torch.zeros(*ids.shape, model.cfg.vocab_size)  # (B, T, V)
        logits[:, -1, cache["reply"][min(cache["n"], len(cache["reply"]) - 1)]] = 50.0
        cache["n"] += 1
        return logits

    model.new_cache, model.forward = new_cache, forward
    return model, seen


def test_gsm8k_strict_and_flexible_on_scripted_replies(lm, enc):
    replies = [
        "Tom has 1,234 apples.\n#### 1,234\n\nQuestion: and 99?",  # strict and flexible right
        "So 11 * 9 = 99.\n\nQuestion: then #### 99",  # the number after the cut never counts; flexible 99
        "She has $15.",  # no "####": strict invalid, flexible "$15." -> 15
        "#### 20 pages, I think 21",  # strict 20 (wrong), flexible the last number, 21
    ]
    model, seen = scripted(lm, enc, replies)
    scored, shots = docs("gsm8k")  # the lm-eval default is 5 shots; 0 here: every record is scored
    got = E.suite_eval(model, enc, "gsm8k", scored, [[]] * len(scored), cfg(batch_size=1, max_new_tokens=64), CPU)
    assert got == {"gsm8k_strict": pytest.approx(1 / 4), "gsm8k_flexible": pytest.approx(4 / 4)}
    assert seen == [f"Question: {r['question']}\nAnswer:" for r in raw("gsm8k.jsonl")]


def test_gsm8k_extract_and_match_follow_lm_eval():
    assert E.gsm8k_extract("x #### 1,234.5 y #### 7") == ("1,234.5", "7")
    assert E.gsm8k_extract("no number") == ("[invalid]", "[invalid]")
    assert E.gsm8k_extract("costs $1,000. Then 5") == ("[invalid]", "5")
    assert E.gsm8k_extract("costs $1,000.") == ("[invalid]", "$1,000.")
    assert E.gsm8k_match("$1,000.", "work\n#### 1000") and E.gsm8k_match("-3", "#### -3")
    assert not E.gsm8k_match("[invalid]", "#### 3") and not E.gsm8k_match("30", "#### 3")
    assert E.cut_at("a Question: b </s>", E.GSM8K_UNTIL) == "a " and E.cut_at("abc", E.GSM8K_UNTIL) == "abc"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab Q:\n", max_size=30), st.lists(st.text(alphabet="ab Q:", min_size=1, max_size=3),
                                                          min_size=1, max_size=3))
def test_cut_at_is_the_shortest_prefix_before_a_stop(text, until):
    out = E.cut_at(text, until)
    assert text.startswith(out) and not any(u in out for u in until)
    assert out == text or any(text[len(out):].startswith(u) for u in until)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-50, 0), st.booleans()), min_size=1, max_size=8))
def test_mc2_score_is_the_true_mass(items):
    logps, labels = [lp for lp, _ in items], [int(b) for _, b in items]
    got = E.mc2_score(logps, labels)
    assert -1e-12 <= got <= 1 + 1e-12
    p = torch.softmax(torch.tensor(logps, dtype=torch.float64), -1)
    assert got == pytest.approx(sum(p[i].item() for i in range(len(items)) if labels[i]), abs=1e-12)
    assert E.mc2_score(logps, [1] * len(items)) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- the script, files and flags

def test_script_runs_every_suite(tmp_path, enc):
    torch.manual_seed(0)
    path = str(tmp_path / "m.pt")
    C.save_checkpoint(path, M.build_model("tiny", enc, n_layer=1, d_model=32, d_ff=64, max_seq_len=1024), enc)
    out = tmp_path / "r.json"
    spec = ",".join(f"{n}:{FIX}/{n}.jsonl" for n in E.SUITES)
    proc = run_script("evaluate.py", "--model", path, "--suite", spec, "--suite-fewshot", f"mmlu:{FIX}/mmlu_dev.jsonl",
                      "--suite-shots", "1", "--max-new-tokens", "8", "--no-speed", "--out", str(out))
    result = json.loads(out.read_text())
    row = result["results"][0]
    assert set(E.SUITE_COLUMNS) <= set(row) and all(0 <= row[c] <= 1 for c in E.SUITE_COLUMNS)
    assert result["notes"]["n_mmlu"] == 6 and result["notes"]["n_gsm8k"] == 3 and result["notes"]["n_truthfulqa"] == 2
    assert "| mmlu_acc | hellaswag_acc | hellaswag_acc_norm | arc_acc |" in proc.stdout.splitlines()[0]


@pytest.mark.parametrize("line, where, message", [
    ('{"question": "q", "subject": "s", "choices": ["a", "b", "c"], "answer": 0}', ":2:", "4 non-empty strings"),
    ('{"question": "q", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": 4}', ":2:", "not an index"),
    ('{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 1}', ":2:", "missing field 'subject'"),
])
def test_bad_suite_record_is_one_line(tmp_path, tiny_ckpt, line, where, message):
    bad = tmp_path / "mmlu.jsonl"
    bad.write_text(json.dumps(raw("mmlu.jsonl")[0]) + "\n" + line + "\n")
    proc = run_script("evaluate.py", "--model", tiny_ckpt, "--suite", f"mmlu:{bad}", check=False)
    assert_one_line_error(proc, f"{bad}{where}", message)


@pytest.mark.parametrize("argv, msg", [
    (["--suite", "squad:x.jsonl"], "expected NAME:PATH with NAME one of mmlu"),
    (["--suite", "mmlu:a.jsonl,mmlu:b.jsonl"], "mmlu given twice"),
    (["--suite-fewshot", "mmlu:a.jsonl"], "give --suite"),
    (["--suite", f"gsm8k:{FIX}/gsm8k.jsonl", "--suite-shots", "4"], "no gsm8k records left"),
    (["--suite", f"arc:{FIX}/gsm8k.jsonl"], "missing field 'choices'"),
    (["--suite", f"gsm8k:{FIX}/missing.jsonl"], "no such gsm8k file"),
])
def test_bad_suite_flags(tiny_ckpt, argv, msg):
    with pytest.raises(M.UserError, match=re.escape(msg)):
        E.main(["--model", tiny_ckpt, *argv])


# ----------------------------------------------------------------------------- lm-evaluation-harness as the oracle

def write_lm_eval_tasks(folder, splits):
    """Local lm-eval tasks over the fixtures: each includes lm-eval's own task yaml (its prompt, choices, metrics and
    filters) and replaces only the data: dataset_path json with our files as its splits, few-shot first_n (ours)."""
    import lm_eval
    tasks = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    names = []
    for task, (include, files, extra) in splits.items():
        lines = [f"task: {task}", f"include: {os.path.join(tasks, include)}", "dataset_path: json",
                 "dataset_name: null",
                 "dataset_kwargs:", "  data_files:", *[f"    {k}: {v}" for k, v in files.items()],
                 "fewshot_config:", "  sampler: first_n", *extra]
        with open(os.path.join(folder, f"{task}.yaml"), "w") as f:
            f.write("\n".join(lines) + "\n")
        names.append(task)
    return names


@pytest.mark.slow
def test_lm_eval_oracle(tmp_path, enc):
    """Our --suite scores and per-choice log-likelihoods equal lm-eval 0.4.13's on the fixtures, for a tiny random
    model exported with formats.export_hf. Bench only: lm-eval 0.4.13 (pip install lm-eval==0.4.13, which brings
    datasets) is imported or the test skips. Run: python -m pytest -q -m slow tests/test_suites.py -k oracle"""
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    import formats
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    torch.manual_seed(0)
    model = M.build_model("tiny", enc, n_layer=1, d_model=32, d_ff=64, max_seq_len=1024).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():  # no special token is ever the argmax: HF's greedy bans nothing, ours bans pad and im_start
        model.embed.weight[[C.special_id(enc, t) for t in C.SPECIAL_TOKENS]] = 0.0
    hf = tmp_path / "hf"
    formats.export_hf(model, enc, str(hf))
    data = tmp_path / "data"
    data.mkdir()
    for subject in ("anatomy", "elementary_mathematics"):
        for split in ("mmlu", "mmlu_dev"):
            with open(data / f"{split}_{subject}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in raw(f"{split}.jsonl") if r["subject"] == subject)
    mmlu = {f"ours_mmlu_{s}": ("mmlu/default/_default_template_yaml",
                               {"test": data / f"mmlu_{s}.jsonl", "dev": data / f"mmlu_dev_{s}.jsonl"},
                               ["num_fewshot: 1", f"description: \"The following are multiple choice questions (with "
                                f"answers) about {s.replace('_', ' ')}.\\n\\n\""])
            for s in ("anatomy", "elementary_mathematics")}
    splits = {**mmlu,
              "ours_hellaswag": ("hellaswag/hellaswag.yaml", {"validation": f"{FIX}/hellaswag.jsonl"},
                                 ["training_split: null"]),
              "ours_arc": ("arc/arc_easy.yaml", {"test": f"{FIX}/arc.jsonl"}, ["training_split: null",
                                                                               "validation_split: null"]),
              "ours_truthfulqa_mc1": ("truthfulqa/truthfulqa_mc1.yaml", {"validation": f"{FIX}/truthfulqa.jsonl"}, []),
              "ours_truthfulqa_mc2": ("truthfulqa/truthfulqa_mc2.yaml", {"validation": f"{FIX}/truthfulqa.jsonl"}, []),
              "ours_gsm8k": ("gsm8k/gsm8k.yaml", {"test": f"{FIX}/gsm8k.jsonl", "train": f"{FIX}/gsm8k.jsonl"},
                             ["num_fewshot: 2", "generation_kwargs:", "  until: ['Question:', '</s>', '<|im_end|>']",
                              "  do_sample: false", "  temperature: 0.0", "  max_gen_toks: 16"])}
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    names = write_lm_eval_tasks(str(task_dir), splits)
    out = simple_evaluate(model="hf", model_args={"pretrained": str(hf), "dtype": "float32"}, tasks=names,
                          task_manager=TaskManager(include_path=str(task_dir)), batch_size=1, device="cpu",
                          log_samples=True)
    res, samples = out["results"], out["samples"]

    c = cfg(max_new_tokens=16)
    ours = {}
    for name, k, fewshot in (("mmlu", 1, "mmlu_dev.jsonl"), ("hellaswag", 0, None), ("arc", 0, None),
                             ("truthfulqa", 0, None), ("gsm8k", 2, "gsm8k.jsonl")):
        ours.update(E.suite_eval(model, enc, name, *docs(name, k=k, fewshot=fewshot), c, CPU))
    n = {s: len(samples[f"ours_mmlu_{s}"]) for s in ("anatomy", "elementary_mathematics")}
    mmlu_acc = sum(res[f"ours_mmlu_{s}"]["acc,none"] * n[s] for s in n) / sum(n.values())  # weight_by_size
    theirs = {"mmlu_acc": mmlu_acc, "hellaswag_acc": res["ours_hellaswag"]["acc,none"],
              "hellaswag_acc_norm": res["ours_hellaswag"]["acc_norm,none"], "arc_acc": res["ours_arc"]["acc,none"],
              "arc_acc_norm": res["ours_arc"]["acc_norm,none"],
              "truthfulqa_mc1": res["ours_truthfulqa_mc1"]["acc,none"],
              "truthfulqa_mc2": res["ours_truthfulqa_mc2"]["acc,none"],
              "gsm8k_strict": res["ours_gsm8k"]["exact_match,strict-match"],
              "gsm8k_flexible": res["ours_gsm8k"]["exact_match,flexible-extract"]}
    assert ours == pytest.approx(theirs, abs=1e-6)

    # the per-choice log-likelihoods themselves, and gsm8k's greedy replies
    for name, task in (("hellaswag", "ours_hellaswag"), ("arc", "ours_arc"), ("truthfulqa", "ours_truthfulqa_mc1")):
        d, s = docs(name)
        lps = E.choice_logprobs(model, enc, [enc.encode_ordinary(E.suite_context(name, x, y)) for x, y in zip(d, s)],
                                [[" " + ch for ch in x["choices"]] for x in d], c, CPU)
        for sample in samples[task]:
            theirs_ll = [r[0][0] for r in sample["resps"]]
            assert lps[sample["doc_id"]].tolist() == pytest.approx(theirs_ll, abs=1e-3), (task, sample["doc_id"])
    d, s = docs("gsm8k", k=2, fewshot="gsm8k.jsonl")
    contexts = [E.suite_context("gsm8k", x, y) for x, y in zip(d, s)]
    replies = E.generate_until(model, enc, contexts, E.GSM8K_UNTIL, c, CPU)
    for sample in samples["ours_gsm8k"]:
        assert replies[sample["doc_id"]] == sample["resps"][0][0], sample["doc_id"]
