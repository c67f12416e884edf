"""evaluate.py's best-of-n: the pick (first maximum, NaN as -inf) against a naive loop, kl_bon against the exact KL
of best-of-n over a discrete distribution, the picked responses against N plain samples of the same seeded stream,
the script's row (gold_reward = the mean over prompts of the max over N samples), and the refused flags.

    python -m pytest tests/test_best_of_n.py -q
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
from conftest import assert_refused, run_script, save_tiny

CPU = torch.device("cpu")
SCORE = "def score(prompt, response):\n    return float(len(set(response)))  # distinct characters\n"


# ----------------------------------------------------------------------------- the pick

score = st.one_of(st.integers(-2, 2).map(float), st.just(math.nan), st.just(-math.inf), st.just(math.inf))


@st.composite
def score_table(draw):
    n, P = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    return n, draw(st.lists(score, min_size=P * n, max_size=P * n))  # few values: ties are common


@settings(max_examples=300, deadline=None)
@given(score_table())
def test_best_of_n_is_the_first_maximum(table):
    n, flat = table
    P = len(flat) // n
    picks = E.best_of_n(flat, n)
    assert picks.shape == (P,) and picks.dtype == torch.long
    key = [-math.inf if math.isnan(x) else x for x in flat]  # NaN counts as -inf
    for p in range(P):
        row, j = key[p * n:(p + 1) * n], int(picks[p])
        assert row[j] == max(row)  # a maximum
        assert all(x < row[j] for x in row[:j]) or row[j] == -math.inf and j == 0  # the first one
        best = 0  # the naive loop: a later sample wins only by scoring strictly higher
        for i, x in enumerate(row):
            best = i if x > row[best] else best
        assert j == best
    assert torch.equal(E.best_of_n(torch.tensor(flat).reshape(P, n), n), picks)  # (P, n) == (P * n,)
    assert torch.equal(E.best_of_n(torch.tensor(flat, dtype=torch.float32), n), picks)


def test_best_of_n_examples():
    assert E.best_of_n([1, 3, 3, 0, 2, 2], 3).tolist() == [1, 1]  # ties: the first
    assert E.best_of_n([[math.nan, -5.0], [math.nan, math.nan]], 2).tolist() == [1, 0]
    assert E.best_of_n([7.0, -1.0], 1).tolist() == [0, 0]
    with pytest.raises(AssertionError):
        E.best_of_n([1.0, 2.0, 3.0], 2)


# ----------------------------------------------------------------------------- kl_bon

def exact_bon_kl(M_, n):
    """KL(best-of-n || uniform over M_ outcomes with distinct scores): the outcome of rank k is the best of n draws
    with probability (k / M)^n - ((k - 1) / M)^n."""
    k = torch.arange(1, M_ + 1, dtype=torch.float64)
    p = (k / M_) ** n - ((k - 1) / M_) ** n
    return torch.special.xlogy(p, p * M_).sum().item()  # 0 log 0 = 0


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 10_000))
def test_best_of_n_kl_formula(n):
    assert E.best_of_n_kl(n) == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-12)
    assert E.best_of_n_kl(n + 1) > E.best_of_n_kl(n) >= 0


def test_best_of_n_kl_is_the_continuous_limit_and_a_bound():
    assert E.best_of_n_kl(1) == 0.0
    for n in (2, 4, 16, 64):
        assert exact_bon_kl(200_000, n) == pytest.approx(E.best_of_n_kl(n), abs=1e-3)  # many distinct outcomes
        for m in (2, 5, 50):
            assert exact_bon_kl(m, n) <= E.best_of_n_kl(n) + 1e-12  # few outcomes: below (Beirami et al. 2024)


# ----------------------------------------------------------------------------- the picked responses


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random LM and RM, 12 prompts (data and red-team files) and the distinct-characters scorer."""
    out = tmp_path_factory.mktemp("bon")
    enc = C.get_tokenizer("byte")
    lm = save_tiny(out / "lm.pt", enc, std=0.1)
    rm = save_tiny(out / "rm.pt", enc, score_std=0.5, head="scalar")
    fn = out / "score.py"
    fn.write_text(SCORE + "def safe(prompt, response):\n    return len(response) % 2 == 0\n")
    prompts = [f"Tell me about the number {i}." for i in range(12)]
    data, red = out / "eval.jsonl", out / "red.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": str(i)}) + "\n" for i, p in enumerate(prompts)))
    red.write_text("".join(json.dumps({"prompt": "Be rude about " + p}) + "\n" for p in prompts[:4]))
    return {"lm": lm, "rm": rm, "fn": str(fn), "data": str(data), "red": str(red), "prompts": prompts}


def cfg(**kw):
    return E.Config(**{"batch_size": 8, "max_new_tokens": 8, "temperature": 1.0, "seed": 0, **kw})


def naive_best(texts, scores, n):
    """Per prompt, the first of its n consecutive samples with the highest score."""
    out = []
    for p in range(len(texts) // n):
        best = p * n
        for k in range(p * n, (p + 1) * n):
            best = k if scores[k] > scores[best] else best
        out.append(best)
    return out


@pytest.mark.parametrize("scorer", ["fn", "rm"])
def test_picks_the_best_of_n_plain_samples(setup, scorer):
    """n = 4 draws what --best-of 1 draws on a file with each prompt 4 times in a row (the same batches from the same
    seeded stream), and keeps the first highest-scoring of each 4."""
    model, enc = E.load(setup["lm"], CPU, "lm")
    n, prompts = 4, [C.as_messages(p, "x") for p in setup["prompts"][:6]]
    many = [p for p in prompts for _ in range(n)]
    texts, prompt_ids, responses = E.generate_responses(model, enc, many, cfg(), CPU)
    if scorer == "fn":
        best_by = C.load_function(setup["fn"] + ":score")
        scores = [best_by(p, t) for p, t in zip(many, texts)]
    else:
        best_by = E.load(setup["rm"], CPU, "scalar")
        scores = [C.score_responses(*best_by, [p], [t]).item() for p, t in zip(many, texts)]  # one at a time: unpadded
    keep = naive_best(texts, scores, n)
    got = E.policy_responses(model, enc, prompts, prompts, best_by, cfg(best_of=n, best_by=scorer), CPU)
    assert got == ([texts[k] for k in keep], [prompt_ids[k] for k in keep], [responses[k] for k in keep])
    best = [scores[k] for k in keep]
    assert best == [max(scores[p * n:(p + 1) * n]) for p in range(len(prompts))]
    if scorer == "fn":
        assert len(set(texts)) > len(prompts)  # really sampled: the 4 of a prompt differ
        assert sum(best) > sum(scores[::n])  # better than the first sample of each
    plain = E.policy_responses(model, enc, prompts, prompts, None, cfg(), CPU)
    assert plain == E.generate_responses(model, enc, prompts, cfg(), CPU)  # --best-of 1 is plain generation


def test_script_row_is_the_mean_of_the_max(setup, tmp_path):
    """The script's best-of-4 row: gold_reward (--scorer, the same function as --best-by) is the mean over prompts
    of the max over 4 samples drawn independently here, and beats the plain best-of-1 row at the same seed."""
    fn, out4, out1 = setup["fn"] + ":score", tmp_path / "bo4.json", tmp_path / "bo1.json"
    common = ["--model", setup["lm"], "--data", setup["data"], "--scorer", fn, "--temperature", "1", "--seed", "0",
              "--batch-size", "8", "--max-new-tokens", "8", "--no-speed", "--device", "cpu"]
    proc = run_script("evaluate.py", *common, "--best-of", "4", "--best-by", fn, "--redteam", setup["red"],
                      "--safety", setup["fn"] + ":safe", "--out", str(out4))
    E.main([*common, "--out", str(out1)])
    bo4, bo1 = (json.loads(p.read_text()) for p in (out4, out1))
    row = bo4["results"][0]
    assert row["best_of"] == 4 and row["kl_bon"] == pytest.approx(math.log(4) - 0.75) and "kl_ref" not in row
    assert bo4["notes"]["best_of"] == 4 and bo4["notes"]["best_by"] == fn
    assert "best_of" not in bo1["results"][0] and "kl_bon" not in bo1["results"][0]  # plain rows: no such columns
    assert "| best_of | kl_bon |" in proc.stdout and "x 4 (best of 4 by" in proc.stderr

    model, enc = E.load(setup["lm"], CPU, "lm")
    score = C.load_function(fn)
    prompts = [C.as_messages(p, "x") for p in setup["prompts"]]
    texts = E.generate_responses(model, enc, [p for p in prompts for _ in range(4)], cfg(), CPU)[0]
    scores = [score(prompts[k // 4], t) for k, t in enumerate(texts)]
    mean_max = sum(max(scores[4 * p:4 * p + 4]) for p in range(len(prompts))) / len(prompts)
    assert row["gold_reward"] == pytest.approx(mean_max)
    assert row["gold_reward"] >= bo1["results"][0]["gold_reward"]  # in expectation; here 6.4 vs 4.8
    assert 0 <= row["safety"] <= 1


def test_baseline_stays_plain(setup, tmp_path, monkeypatch):
    """--baseline's responses are plain samples (n = 1); only the evaluated --model's are the best of 4."""
    drawn = []
    real = E.generate_responses

    def spy(model, enc, prompts, c, device, n=1):
        drawn.append((len(prompts), n))
        return real(model, enc, prompts, c, device, n)

    monkeypatch.setattr(E, "generate_responses", spy)
    E.main(["--model", setup["lm"], "--data", setup["data"], "--baseline", setup["lm"], "--reward-model", setup["rm"],
            "--best-of", "4", "--best-by", setup["rm"], "--temperature", "1", "--limit", "3", "--max-new-tokens", "4",
            "--no-speed", "--device", "cpu", "--out", str(tmp_path / "r.json")])
    assert drawn == [(3, 1), (3, 4)]  # the baseline first, plain; then the policy, 4 per prompt
    row = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert 0 <= row["win_rate"] <= 1 and row["best_of"] == 4


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("extra, msg", [
    (["--best-of", "0"], "--best-of must be >= 1"),
    (["--best-of", "4", "--temperature", "1"], "needs --best-by"),
    (["--best-by", "s.py:f"], "--best-by picks among --best-of N > 1 samples"),
    (["--best-of", "4", "--best-by", "s.py:f"], "best-of-n needs sampled responses: give --temperature > 0"),
    (["--best-of", "4", "--best-by", "s.py:f", "--temperature", "1", "--ref", "r.pt"],
     "--ref with --best-of: kl_ref along picked responses is not the best-of-n policy's KL"),
])
def test_refused_flags(extra, msg):
    with pytest.raises(M.UserError, match=re.escape(msg)):
        E.main(["--model", "a.pt", "--data", "d.jsonl", *extra])


def test_refused_flags_and_bad_scorers_exit_2(setup, tmp_path):
    assert_refused("evaluate.py", "--model", setup["lm"], "--mc", setup["data"], "--best-of", "2", "--best-by",
                   setup["fn"] + ":score", "--temperature", "1", message="--best-of applies to --data and --redteam")
    with pytest.raises(M.UserError, match="--best-by .*no function 'missing'"):
        E.main(["--model", setup["lm"], "--data", setup["data"], "--best-of", "2", "--best-by",
                setup["fn"] + ":missing", "--temperature", "1"])
    with pytest.raises(M.UserError, match="no such checkpoint"):
        E.main(["--model", setup["lm"], "--data", setup["data"], "--best-of", "2", "--best-by",
                str(tmp_path / "nope.pt"), "--temperature", "1"])
    with pytest.raises(M.UserError, match="has a 'lm' head, this role needs 'scalar'"):
        E.main(["--model", setup["lm"], "--data", setup["data"], "--best-of", "2", "--best-by", setup["lm"],
                "--temperature", "1", "--no-speed", "--device", "cpu"])
