"""
arena.py: human preference evaluation, the Chatbot Arena way.

People compare two responses to one prompt on a local web page; their votes become a leaderboard with
honest error bars, a measure of how far the raters agree, and preference pairs that reward.py / dpo.py train on.

The statistics (the block below can be copied alone: torch and math only):
  win_rate_ci        a win rate (ties count half) with a percentile-bootstrap interval (Efron & Tibshirani 1993, 13.3)
  bradley_terry      maximum-likelihood log-strengths of the Bradley-Terry model (Bradley & Terry 1952),
                     P(i beats j) = sigmoid(s_i - s_j); a tie counts as half a win each way (Chatbot Arena's rule,
                     Chiang et al. 2024, "Chatbot Arena", arXiv 2403.04132, section 5); fitted by Newton's method on
                     the log-likelihood with a small L2 penalty (l2 / 2 * |s|^2, a N(0, 1 / l2) prior) so it exists
                     when a model never loses; centred to mean 0
  bradley_terry_ci   the same with a percentile bootstrap over comparisons (Chatbot Arena's 95% intervals)
  elo_scale          s -> 400 / ln 10 * s + 1000: Elo points, the scale Chatbot Arena reports
  cohen_kappa        two raters' chance-corrected agreement (Cohen 1960)
  krippendorff_alpha any number of raters, missing ratings allowed; nominal, ordinal or interval (Krippendorff
                     2011, "Computing Krippendorff's Alpha-Reliability")
  agreement          the raw share of units two raters label alike, ties and missing labels left out
  labeller_agreement how often a reward model or an LLM judge sides with the humans, with and without ties
                     (Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena", setups S1 / S2)

The page (standard library http.server, one HTML file with inline CSS and JS, nothing fetched from elsewhere)
shows a prompt and two responses side by side in an order drawn per (rater, pair) from a hash, so a reload
shows the same order; the model names stay hidden. Buttons or keys: 1 / left arrow = left better, 2 / down arrow
= tie, 3 / right arrow = right better, 4 / up arrow = both bad, u = undo the last vote. With --criteria (one
criterion a line) each response can also be rated 1-7 per criterion. Every vote is appended to --votes (one JSON
line, flushed and fsynced) before the page hears back, so killing the server loses nothing; a restarted server
puts each rater at the first pair they have not voted on. Undo appends an "undo" record; every reader honours it.
Raters are told apart by name (?rater=NAME, else --rater). Model text reaches the page only as JSON (with <, >
and & escaped) and is inserted with textContent, never as HTML.

Files:
  pairs    {"prompt": str or messages, "a": str, "b": str, "model_a": str, "model_b": str, optional "id"}
           (without an id, a hash of the row is its id); --build-pairs makes one from
           {"prompt", "responses": {"model": text, ...}} rows: every pair of models per prompt, rows shuffled
  votes    {"type": "vote", "rater", "pair", "choice": "a" | "b" | "tie" | "both_bad", "button": "left" | "right" |
           "tie" | "both_bad", "left": "a" | "b" (the response shown on the left), "ratings": {criterion: {"a": 1-7,
           "b": 1-7}}, "time"} and {"type": "undo", "rater", "pair", "time"} (the rater's latest vote, on that pair);
           a --vote-by vote has "button": "function" and the two "scores": {"a": x, "b": y}
  prefs    {"prompt", "chosen", "rejected", "pair", "rater"}: one row per decisive vote (raters who disagree give
           opposite rows, each a human label, as in HH-RLHF); ties and both-bad go to --out-ties or are counted

--vote-by file.py:fn makes a function a rater: fn(prompt, response) scores both responses of every pair and the
higher score wins (`function_votes`). With a known truth (a verifier, the built-in world's gold reward) as that
rater, the report's agreement of a judge or a reward model with it is their accuracy against the truth.

With --reward-model and / or --judge the report also sets each machine labeller's verdict on every voted pair
beside the humans' votes: the reward model prefers the response it scores higher; the judge (evaluate.py's,
log p("A") vs log p("B")) is asked in both orders and a verdict that flips with the order is a tie. The judge has a
second row, "log-odds averaged": a wins when m1 > m2, m1 = log p("A") - log p("B") with a shown as A and m2 the
same with a shown as B, i.e. when the mean log-odds for a over the two orders, (m1 - m2) / 2, is positive. A small
judge that always names one letter ties on every pair by the first rule and may still rank by the second. Their
agreement with the votes is printed beside the humans' agreement with each other, MT-Bench's yardstick.

In the leaderboard and the win rates "both bad" counts as a tie (Chatbot Arena's "tie (bothbad)"). Agreement is
computed on pairs that two or more raters voted on: Krippendorff's alpha (nominal, the four labels) for any number
of raters; with exactly two raters also Cohen's kappa and the raw agreement on the pairs both found decisive.

Departures: the server keeps its state in memory and owns its votes file: two servers on one file are not
supported. Pairs are served in file order (every rater sees the same sequence; --build-pairs shuffles it once).

    python arena.py --build-pairs responses.jsonl --pairs out/arena/pairs.jsonl          # all pairs of models
    python arena.py --serve --pairs out/arena/pairs.jsonl --votes out/arena/votes.jsonl --rater ann \\
        --criteria criteria.txt                                # http://127.0.0.1:8000/?rater=ann
    python arena.py --pairs out/arena/pairs.jsonl --votes out/arena/votes.jsonl --report \\
        --out-prefs out/arena/prefs.jsonl                      # leaderboard + agreement; human labels for reward.py
    python arena.py --pairs out/arena/pairs.jsonl --votes out/arena/votes.jsonl --report \\
        --reward-model out/rm.pt --judge out/sft.pt              # ... and how far the machines agree with them
    python reward.py --model out/sft.pt --data out/arena/prefs.jsonl --out out/rm_human.pt
    python arena.py --build-pairs data/toy/prefs.jsonl --pairs out/judge/pairs.jsonl      # preference rows re-labelled
    python arena.py --pairs out/judge/pairs.jsonl --votes out/judge/votes.jsonl --vote-by data/toyworld.py:gold_reward \
        --report --judge smollm2.gguf              # the judge against the world's gold reward (scripts/judge_real.sh)
No GPU and no torchrun: the statistics are small.
"""

import hashlib
import http.server
import itertools
import json
import math
import os
import re
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass

import torch

import common as C
import model as M

# -----------------------------------------------------------------------------


@dataclass
class Config:
    pairs: str = ""  # pairs JSONL {"prompt", "a", "b", "model_a", "model_b", optional "id"} (--build-pairs writes it)
    votes: str = ""  # votes JSONL: the server appends to it; --report / --out-prefs read it
    serve: bool = False  # run the rating page
    rater: str = ""  # the rater's name when the page's address has no ?rater=NAME
    criteria: str = ""  # text file, one criterion a line: 1-7 ratings of each response on the page
    host: str = "127.0.0.1"  # address to listen on (127.0.0.1: this machine only)
    port: int = 8000  # port to listen on (0: any free port, printed)
    build_pairs: str = ""  # JSONL {"prompt", "responses": {model: text}} -> every pair of models into --pairs
    report: bool = False  # print the markdown leaderboard, win rates and inter-rater agreement
    out_prefs: str = ""  # write the decisive votes as preference JSONL {"prompt", "chosen", "rejected"}
    out_ties: str = ""  # write ties and both-bad votes here ({"prompt", "a", "b", "label", ...}); else only counted
    vote_by: str = ""  # file.py:fn(prompt, response) -> score: votes on every pair as rater --rater (default the
    # function's name), the higher score winning, appended to --votes (pairs the rater voted on are kept)
    reward_model: str = ""  # with --report: a scalar-head checkpoint's verdicts (higher score wins) set beside the humans'
    judge: str = ""  # with --report: an LM checkpoint judging each pair in both orders (evaluate.py's judge)
    batch_size: int = 8  # sequences per forward of --reward-model / --judge
    device: str = "auto"  # --reward-model / --judge: auto (cuda > mps > cpu), cpu, cuda, ...
    n_boot: int = 1000  # bootstrap resamples of the confidence intervals
    seed: int = 0  # seeds the bootstrap and --build-pairs' shuffle


CHOICES = ("a", "b", "tie", "both_bad")
BUTTONS = ("left", "right", "tie", "both_bad")
SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}  # A's share of the win; both bad counts as a tie
RATING_RANGE = (1, 7)
MAX_BODY = 1 << 16  # bytes: a vote is a few hundred
RATER_NAME = re.compile(r"^[\w .@+-]{1,64}$")

# -----------------------------------------------------------------------------
# The statistics: pure functions, torch and math only (this block can be copied alone)


def _percentiles(samples, alpha):
    """(B, ...) bootstrap statistics -> the alpha / 2 and 1 - alpha / 2 quantiles (linear interpolation)."""
    q = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=samples.dtype)
    lo, hi = torch.quantile(samples, q, dim=0)
    return lo, hi


def win_rate_ci(outcomes, n_boot=1000, alpha=0.05, seed=0):
    """A's win rate and its percentile-bootstrap interval. outcomes: (n,) values in {1, 0.5, 0} (A wins, tie,
    B wins) -> (rate, lo, hi) floats: the mean outcome and the alpha / 2, 1 - alpha / 2 quantiles of the means of
    n_boot resamples of n outcomes drawn with replacement (seeded: the same outcomes give the same interval)."""
    x = torch.as_tensor(outcomes, dtype=torch.float64).flatten()
    if x.numel() == 0:
        raise ValueError("win_rate_ci needs at least one outcome")
    if not ((x == 0) | (x == 0.5) | (x == 1)).all():
        raise ValueError("outcomes must be 1 (A wins), 0.5 (tie) or 0 (B wins)")
    g = torch.Generator().manual_seed(seed)
    means = x[torch.randint(0, x.numel(), (n_boot, x.numel()), generator=g)].mean(1)  # (n_boot,)
    lo, hi = _percentiles(means, alpha)
    return x.mean().item(), lo.item(), hi.item()


def win_matrix(comparisons, n_models):
    """comparisons: (i, j) "i beat j" pairs, or (i, j, s) triples with s = i's share of the win (1 i won, 0.5 tie,
    0 j won) -> W (n_models, n_models) float64, W[i, j] = the wins of i over j, a tie half a win each way."""
    W = torch.zeros(n_models, n_models, dtype=torch.float64)
    for c in comparisons:
        i, j, s = (int(c[0]), int(c[1]), float(c[2]) if len(c) > 2 else 1.0)
        if not (0 <= i < n_models and 0 <= j < n_models) or i == j:
            raise ValueError(f"comparison {tuple(c)}: model indices must differ and lie in [0, {n_models})")
        if not 0 <= s <= 1:
            raise ValueError(f"comparison {tuple(c)}: the score must lie in [0, 1]")
        W[i, j] += s
        W[j, i] += 1 - s
    return W


def _bt_objective(theta, W, l2):
    """Penalised Bradley-Terry log-likelihood of log-strengths theta (B, n) given win matrices W (B, n, n) -> (B,):
    sum_ij W_ij log sigmoid(theta_i - theta_j) - l2 / 2 |theta|^2."""
    d = theta[:, :, None] - theta[:, None, :]  # (B, n, n)
    # log sigmoid, stable; F.logsigmoid took ~7 ms a call on these tiny CPU tensors, this ~10 us
    log_sigmoid = d.clamp(max=0) - torch.log1p(torch.exp(-d.abs()))
    return (W * log_sigmoid).sum((1, 2)) - l2 / 2 * (theta * theta).sum(1)


def bradley_terry_fit(W, l2=0.01, iters=100, tol=1e-9):
    """Batched Newton's method with step halving on the penalised log-likelihood (strictly concave for l2 > 0, so
    the maximum is unique). W (B, n, n) win matrices -> theta (B, n) log-strengths, each row of mean 0 (the
    penalty already puts the maximum there: the likelihood's gradient sums to 0)."""
    B, n, _ = W.shape
    N = W + W.transpose(1, 2)  # (B, n, n) games between i and j
    theta = torch.zeros(B, n, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    for _ in range(iters):
        p = torch.sigmoid(theta[:, :, None] - theta[:, None, :])  # (B, n, n) P(i beats j)
        grad = (W - N * p).sum(2) - l2 * theta  # (B, n)
        w = N * p * (1 - p)
        hess = w - torch.diag_embed(w.sum(2)) - l2 * eye  # (B, n, n), negative definite
        step = torch.linalg.solve(hess, -grad.unsqueeze(-1)).squeeze(-1)  # (B, n)
        f0, t = _bt_objective(theta, W, l2), torch.ones(B, 1, dtype=torch.float64)
        for _ in range(40):  # halve each row's step until its objective does not fall
            worse = _bt_objective(theta + t * step, W, l2) < f0
            if not worse.any():
                break
            t = torch.where(worse[:, None], t / 2, t)
        theta = theta + t * step
        if (t * step).abs().max() < tol:
            break
    return theta - theta.mean(1, keepdim=True)


def bradley_terry(comparisons, n_models, l2=0.01):
    """Maximum-likelihood Bradley-Terry log-strengths: comparisons as in `win_matrix` ((winner, loser) pairs, or
    (i, j, s) with s = 0.5 a tie, half a win each way) -> (n_models,) float64, mean 0; P(i beats j) =
    sigmoid(s_i - s_j). l2: the penalty l2 / 2 * |s|^2 that keeps a model that never loses finite; a model without
    comparisons gets 0."""
    return bradley_terry_fit(win_matrix(comparisons, n_models)[None], l2)[0]


def bradley_terry_ci(comparisons, n_models, n_boot=1000, alpha=0.05, seed=0, l2=0.01, chunk=100):
    """Bradley-Terry log-strengths with percentile-bootstrap intervals: the comparisons resampled with replacement
    n_boot times (seeded), `chunk` resamples fitted at once (memory ~ chunk * comparisons) -> (strength, lo, hi),
    each (n_models,) float64."""
    rows = [(int(c[0]), int(c[1]), float(c[2]) if len(c) > 2 else 1.0) for c in comparisons]
    if not rows:
        raise ValueError("bradley_terry_ci needs at least one comparison")
    strength = bradley_terry(rows, n_models, l2)  # validates the rows too
    i, j = (torch.tensor(col) for col in list(zip(*rows))[:2])
    s = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    boot = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = torch.randint(0, len(rows), (b, len(rows)), generator=g)  # (b, n_comparisons)
        W = torch.zeros(b, n_models * n_models, dtype=torch.float64)
        W.scatter_add_(1, i[idx] * n_models + j[idx], s[idx])  # wins of i over j
        W.scatter_add_(1, j[idx] * n_models + i[idx], 1 - s[idx])
        boot.append(bradley_terry_fit(W.view(b, n_models, n_models), l2))  # (b, n_models)
    lo, hi = _percentiles(torch.cat(boot), alpha)
    return strength, lo, hi


def elo_scale(s, scale=400.0, base=1000.0):
    """Log-strengths -> Elo points, Chatbot Arena's scale: scale / ln 10 * s + base, so 400 points are odds of
    10 to 1. Works on floats and tensors."""
    return scale / math.log(10) * s + base


def cohen_kappa(a, b):
    """Cohen's kappa of two raters' labels on the same units (any hashable labels; a unit where either label is
    None is left out): (p_o - p_e) / (1 - p_e), p_o the observed agreement, p_e the agreement expected from each
    rater's own label frequencies. nan when p_e = 1 (both raters always gave one and the same label)."""
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa: {len(a)} labels against {len(b)}")
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return float("nan")
    n = len(pairs)
    p_o = sum(x == y for x, y in pairs) / n
    labels = {x for x, _ in pairs} | {y for _, y in pairs}
    p_e = sum(sum(x == c for x, _ in pairs) * sum(y == c for _, y in pairs) for c in labels) / n ** 2
    return float("nan") if p_e == 1 else (p_o - p_e) / (1 - p_e)


def krippendorff_alpha(ratings, level="nominal"):
    """Krippendorff's alpha. ratings: raters x units (a list of lists), None where a rater did not rate a unit;
    level: "nominal" (labels), "ordinal" (ranks of the sorted values) or "interval" (numbers) -> float.

    As Krippendorff (2011) computes it: units with fewer than two ratings are dropped; the coincidence matrix
    o_ck adds 1 / (m_u - 1) for every ordered pair of ratings (c, k) by different raters in a unit of m_u ratings;
    n_c = sum_k o_ck, n = sum_c n_c; alpha = 1 - (n - 1) sum_ck o_ck d2_ck / sum_ck n_c n_k d2_ck, with d2 the
    level's squared difference (nominal: 0 or 1; interval: (c - k)^2; ordinal: (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2).
    nan when there is no disagreement to expect (one value only)."""
    if level not in ("nominal", "ordinal", "interval"):
        raise ValueError(f"level must be nominal, ordinal or interval, got {level!r}")
    if not ratings or len({len(r) for r in ratings}) != 1:
        raise ValueError("ratings must be raters x units, every rater's row of the same length")
    units = [[r[u] for r in ratings if r[u] is not None] for u in range(len(ratings[0]))]
    units = [u for u in units if len(u) >= 2]
    values = list(dict.fromkeys(v for u in units for v in u))  # any labels, in the order first met
    if level != "nominal":
        values = sorted(values)  # numbers: ordinal ranks them, interval subtracts them
    if len(values) < 2:
        return float("nan")
    index = {v: i for i, v in enumerate(values)}
    o = torch.zeros(len(values), len(values), dtype=torch.float64)
    for u in units:
        counts = torch.zeros(len(values), dtype=torch.float64)
        for v in u:
            counts[index[v]] += 1
        o += (torch.outer(counts, counts) - torch.diag(counts)) / (len(u) - 1)  # ordered pairs of different raters
    n_c = o.sum(1)
    n = n_c.sum()
    if level == "nominal":
        d2 = 1 - torch.eye(len(values), dtype=torch.float64)
    elif level == "interval":
        v = torch.tensor([float(x) for x in values], dtype=torch.float64)
        d2 = (v[:, None] - v[None, :]) ** 2
    else:
        cum = torch.cumsum(n_c, 0)  # sum_{g <= c} n_g
        lo = torch.minimum(torch.arange(len(values))[:, None], torch.arange(len(values))[None, :])
        hi = torch.maximum(torch.arange(len(values))[:, None], torch.arange(len(values))[None, :])
        between = cum[hi] - cum[lo] + n_c[lo]  # sum_{g = c..k} n_g
        d2 = (between - (n_c[:, None] + n_c[None, :]) / 2) ** 2
    expected = (torch.outer(n_c, n_c) * d2).sum()
    if expected == 0:
        return float("nan")
    return (1 - (n - 1) * (o * d2).sum() / expected).item()


def agreement(a, b, ignore=(None, "tie", "both_bad")):
    """The raw agreement of two raters: the share of units on which they gave the same label, counting only units
    where neither label is in `ignore` (by default missing labels and the two non-decisive preference labels, so
    it answers "when both picked a winner, did they pick the same one?"). nan when no unit is left."""
    if len(a) != len(b):
        raise ValueError(f"agreement: {len(a)} labels against {len(b)}")
    kept = [(x, y) for x, y in zip(a, b) if x not in ignore and y not in ignore]
    return sum(x == y for x, y in kept) / len(kept) if kept else float("nan")


def verdict_label(share):
    """A machine's verdict as a vote label: A's share of the win (1, 0.5, 0) -> "a", "tie", "b"."""
    return "a" if share > 0.5 else "b" if share < 0.5 else "tie"


def labeller_agreement(human, machine):
    """How often a labeller (a reward model, an LLM judge, another rater) sides with the humans, counted the two
    ways of Zheng et al. 2023 (MT-Bench): human, machine N labels each on the same pairs ("a", "b", "tie",
    "both_bad"; None = no label). -> (without_ties, n_without, with_ties, n_with):
      without_ties  (their setup S2) the share of the units where both picked a winner that they picked the same
      with_ties     (their setup S1) the share of the units both labelled on which the labels are equal, with three
                    labels: a, b, tie ("both bad" reads as a tie)
    nan where no unit counts."""
    if len(human) != len(machine):
        raise ValueError(f"labeller_agreement: {len(human)} labels against {len(machine)}")
    three = lambda x: "tie" if x == "both_bad" else x
    decisive = [(h, m) for h, m in zip(human, machine) if h in ("a", "b") and m in ("a", "b")]
    both = [(three(h), three(m)) for h, m in zip(human, machine) if h is not None and m is not None]
    share = lambda units: sum(h == m for h, m in units) / len(units) if units else math.nan
    return share(decisive), len(decisive), share(both), len(both)


# -----------------------------------------------------------------------------
# Data: pairs, votes (with undo), preference pairs


def pair_id(row):
    """A row's id when it has none: a hash of what it shows, so it survives reordering the file."""
    key = json.dumps([row["prompt"], row["a"], row["b"], row["model_a"], row["model_b"]], sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def read_rows(path):
    """A JSONL file -> [(where, dict)], every line parsed and named `path:line` for errors."""
    if not os.path.isfile(path):
        raise M.UserError(f"{path}: no such file")
    with open(path, "rb") as f:
        data = f.read()
    rows = []
    for lineno, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
        if raw.strip():
            where = f"{path}:{lineno}"
            obj = C.parse_json(raw, where)
            if not isinstance(obj, dict):
                raise M.UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            rows.append((where, obj))
    return rows


def read_pairs(path):
    """pairs JSONL -> list of {"id", "prompt" (as written), "messages", "a", "b", "model_a", "model_b"}."""
    pairs, seen = [], {}
    for where, row in read_rows(path):
        for field in ("a", "b", "model_a", "model_b"):
            if not isinstance(row.get(field), str):
                raise M.UserError(f"{where}: field '{field}' must be a string")
        if "prompt" not in row:
            raise M.UserError(f"{where}: missing field 'prompt'")
        if row["model_a"] == row["model_b"]:
            raise M.UserError(f"{where}: model_a and model_b are both {row['model_a']!r}: a pair compares two models")
        pid = row.get("id", pair_id(row))
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise M.UserError(f"{where}: 'id' must be a string or an integer")
        pid = str(pid)
        if pid in seen:
            raise M.UserError(f"{where}: id {pid!r} was already used at {seen[pid]}")
        seen[pid] = where
        pairs.append({"id": pid, "prompt": row["prompt"], "messages": C.as_messages(row["prompt"], where),
                      **{k: row[k] for k in ("a", "b", "model_a", "model_b")}})
    if not pairs:
        raise M.UserError(f"{path}: no pairs")
    return pairs


def build_pairs(path, seed):
    """{"prompt", "responses": {model: text}} rows -> every pair of models per prompt (models in sorted order,
    so model_a < model_b), the rows shuffled by seed (raters then meet the models mixed). A preference row
    {"prompt", "chosen", "rejected"} (reward.py's and dpo.py's data) is read as the responses of two "models",
    chosen and rejected: its pair asks raters, or --vote-by, to label it again."""
    out = []
    for where, row in read_rows(path):
        if "prompt" not in row:
            raise M.UserError(f"{where}: missing field 'prompt'")
        C.as_messages(row["prompt"], where)
        is_pref = "responses" not in row and "chosen" in row and "rejected" in row
        resp = {"chosen": row["chosen"], "rejected": row["rejected"]} if is_pref else row.get("responses")
        if not isinstance(resp, dict) or len(resp) < 2 or not all(isinstance(v, str) for v in resp.values()):
            raise M.UserError(f"{where}: 'responses' must map two or more model names to response strings "
                              "(or give 'chosen' and 'rejected' strings)")
        for ma, mb in itertools.combinations(sorted(resp), 2):
            r = {"prompt": row["prompt"], "a": resp[ma], "b": resp[mb], "model_a": ma, "model_b": mb}
            out.append({"id": pair_id(r), **r})
    if not out:
        raise M.UserError(f"{path}: no prompts")
    g = torch.Generator().manual_seed(seed)
    return [out[i] for i in torch.randperm(len(out), generator=g).tolist()]


def read_criteria(path):
    """One criterion a line; blank lines and lines starting with # are skipped."""
    if not path:
        return []
    if not os.path.isfile(path):
        raise M.UserError(f"{path}: no such criteria file")
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if len(set(names)) != len(names):
        raise M.UserError(f"{path}: a criterion is listed twice")
    return names


def new_state():
    """The votes replayed: active[(rater, pair)] = the vote that counts; stack[rater] = their active pairs in
    voting order (what undo takes back)."""
    return {"active": {}, "stack": {}}


def apply_record(state, rec, where):
    """Add one votes-file record to the state: a vote (a later vote of a rater on the same pair replaces the
    earlier one), or an undo of the rater's latest vote (which must be on the pair the record names)."""
    rater, pair = rec.get("rater"), rec.get("pair")
    if not isinstance(rater, str) or not isinstance(pair, str):
        raise M.UserError(f"{where}: a vote record needs string 'rater' and 'pair'")
    stack = state["stack"].setdefault(rater, [])
    if rec.get("type") == "vote":
        if rec.get("choice") not in CHOICES:
            raise M.UserError(f"{where}: 'choice' must be one of {', '.join(CHOICES)}")
        ratings = rec.get("ratings", {})
        if not isinstance(ratings, dict) or not all(
                isinstance(r, dict) and set(r) <= {"a", "b"} and all(
                    type(v) is int and RATING_RANGE[0] <= v <= RATING_RANGE[1] for v in r.values())
                for r in ratings.values()):
            raise M.UserError(f"{where}: 'ratings' must be {{criterion: {{\"a\": 1-7, \"b\": 1-7}}}}")
        if (rater, pair) in state["active"]:
            stack.remove(pair)
        state["active"][(rater, pair)] = rec
        stack.append(pair)
    elif rec.get("type") == "undo":
        if not stack or stack[-1] != pair:
            raise M.UserError(f"{where}: undo of {pair!r} by {rater!r}, which is not their latest vote")
        stack.pop()
        del state["active"][(rater, pair)]
    else:
        raise M.UserError(f"{where}: 'type' must be 'vote' or 'undo'")


def read_votes(path, pairs=None, repair=False):
    """The votes file replayed -> state (see new_state). A last line without its newline is what a killed writer
    leaves: with repair (the server) it is cut off the file, else ignored. With pairs, every record's pair must
    be one of theirs."""
    state = new_state()
    if not path or not os.path.exists(path):
        return state
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        print(f"{path}: ignoring a half-written last line ({len(data) - keep} bytes)", file=sys.stderr)
        if repair:
            with open(path, "r+b") as f:
                f.truncate(keep)
        data = data[:keep]
    ids = None if pairs is None else {p["id"] for p in pairs}
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if raw.strip():
            where = f"{path}:{lineno}"
            rec = C.parse_json(raw, where)
            if not isinstance(rec, dict):
                raise M.UserError(f"{where}: expected a JSON object")
            if ids is not None and rec.get("pair") not in ids:
                raise M.UserError(f"{where}: pair {rec.get('pair')!r} is not in the pairs file")
            apply_record(state, rec, where)
    return state


def append_record(path, rec):
    """One JSON line appended, flushed and fsynced: on disk before anyone is told it was saved."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def function_votes(pairs, state, fn, spec, rater):
    """Votes of a function rater: fn(prompt, response) -> a score (a verifier, a gold reward) for each response of
    every pair `rater` has not voted on yet -> vote records: the higher score wins, equal scores tie. A known truth
    standing in for people (a simulated rater): a judge's or a reward model's agreement with it, in --report, is
    their accuracy against that truth, measured the way their agreement with people is."""
    todo = [p for p in pairs if (rater, p["id"]) not in state["active"]]
    prompts = [p["prompt"] for p in todo]
    sa = C.call_user(fn, spec, prompts, [p["a"] for p in todo])
    sb = C.call_user(fn, spec, prompts, [p["b"] for p in todo])
    return [{"type": "vote", "rater": rater, "pair": p["id"], "choice": "a" if x > y else "b" if y > x else "tie",
             "button": "function", "left": "a", "ratings": {}, "scores": {"a": x, "b": y}, "time": time.time()}
            for p, x, y in zip(todo, sa, sb)]


def preference_rows(pairs, state):
    """Active votes -> (prefs, ties): prefs {"prompt", "chosen", "rejected", "pair", "rater"} for each decisive
    vote, ties {"prompt", "a", "b", "label", "pair", "rater"} for each tie or both-bad, in pairs-file order."""
    by_id, position = {p["id"]: p for p in pairs}, {p["id"]: i for i, p in enumerate(pairs)}
    prefs, ties = [], []
    for (rater, pid), vote in sorted(state["active"].items(), key=lambda kv: (position[kv[0][1]], kv[0][0])):
        p, choice = by_id[pid], vote["choice"]
        if choice in ("a", "b"):
            other = "b" if choice == "a" else "a"
            prefs.append({"prompt": p["prompt"], "chosen": p[choice], "rejected": p[other], "pair": pid,
                          "rater": rater})
        else:
            ties.append({"prompt": p["prompt"], "a": p["a"], "b": p["b"], "label": choice, "pair": pid, "rater": rater})
    return prefs, ties


# -----------------------------------------------------------------------------
# The report: leaderboard, win rates, agreement


def fmt_ci(x, lo, hi, digits=0):
    return f"{x:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def report(pairs, state, criteria=(), n_boot=1000, seed=0, machines=None, machine_notes=()):
    """The markdown report of the active votes: Bradley-Terry Elo with bootstrap 95% intervals, pairwise win
    rates with intervals, inter-rater agreement, mean criterion ratings (criteria: their order; default the
    criteria the votes carry, in the order first seen) and, given machines {name: {pair id: label}}
    (`machine_verdicts`, with its notes), each machine labeller's agreement with the votes."""
    by_id = {p["id"]: p for p in pairs}
    votes = [(r, by_id[pid], v) for (r, pid), v in state["active"].items()]
    lines = [f"# Arena: {len(votes)} votes by {len({r for r, _, _ in votes})} raters on {len(pairs)} pairs", ""]
    if not votes:
        return "\n".join(lines + ["No votes yet."])
    models = sorted({p[k] for _, p, _ in votes for k in ("model_a", "model_b")})
    ix = {m: i for i, m in enumerate(models)}
    comparisons = [(ix[p["model_a"]], ix[p["model_b"]], SCORE[v["choice"]]) for _, p, v in votes]
    s, lo, hi = bradley_terry_ci(comparisons, len(models), n_boot=n_boot, seed=seed)
    elo, elo_lo, elo_hi = elo_scale(s), elo_scale(lo), elo_scale(hi)
    tally = {m: [0, 0, 0] for m in models}  # wins, ties (both bad included), losses
    for _, p, v in votes:
        sc = SCORE[v["choice"]]
        for m, mine in ((p["model_a"], sc), (p["model_b"], 1 - sc)):
            tally[m][0 if mine == 1 else 1 if mine == 0.5 else 2] += 1
    lines += ["## Leaderboard (Bradley-Terry, Elo scale, 95% bootstrap interval)", "",
              "| rank | model | Elo [95% CI] | votes | wins | ties | losses |", "|---|---|---|---|---|---|---|"]
    for rank, i in enumerate(sorted(range(len(models)), key=lambda i: -s[i].item()), 1):
        w, t, lo_ = tally[models[i]]
        lines.append(f"| {rank} | {models[i]} | {fmt_ci(elo[i].item(), elo_lo[i].item(), elo_hi[i].item())} | "
                     f"{w + t + lo_} | {w} | {t} | {lo_} |")
    unrated = sorted({p[k] for p in pairs for k in ("model_a", "model_b")} - set(models))
    if unrated:
        lines += ["", f"No votes yet: {', '.join(unrated)}"]

    lines += ["", "## Pairwise win rates (model A against model B; ties count half; 95% bootstrap interval)", "",
              "| model A | model B | votes | A's win rate [95% CI] |", "|---|---|---|---|"]
    for ma, mb in itertools.combinations(models, 2):
        out = [SCORE[v["choice"]] if p["model_a"] == ma else 1 - SCORE[v["choice"]] for _, p, v in votes
               if {p["model_a"], p["model_b"]} == {ma, mb}]
        if out:
            lines.append(f"| {ma} | {mb} | {len(out)} | {fmt_ci(*win_rate_ci(out, n_boot=n_boot, seed=seed), 2)} |")

    criteria = list(criteria) or list(dict.fromkeys(c for _, _, v in votes for c in v.get("ratings", {})))
    lines += ["", "## Inter-rater agreement", ""] + agreement_lines(pairs, state, criteria)
    if machines:
        lines += ["", "## Machine labellers against the raters", ""] + machine_lines(state, machines, n_boot, seed)
        lines += [""] + [f"- {n}" for n in machine_notes] if machine_notes else []
    if criteria:
        lines += ["", "## Ratings (mean of 1-7, number of ratings)", "",
                  "| model | " + " | ".join(criteria) + " |", "|---|" + "---|" * len(criteria)]
        for m in models:
            cells = []
            for c in criteria:
                got = [v["ratings"][c][side] for _, p, v in votes for side in ("a", "b")
                       if p[f"model_{side}"] == m and side in v.get("ratings", {}).get(c, {})]
                cells.append(f"{sum(got) / len(got):.2f} ({len(got)})" if got else "-")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement_lines(pairs, state, criteria=()):
    """Agreement on the pairs two or more raters voted on: Krippendorff's alpha (nominal, over the four labels);
    with two raters also Cohen's kappa and the raw agreement where both picked a winner; per criterion, alpha
    (interval) of the 1-7 ratings, each response of a shared pair one unit."""
    raters = sorted({r for r, _ in state["active"]})
    shared = [p["id"] for p in pairs if sum((r, p["id"]) in state["active"] for r in raters) >= 2]
    if len(raters) < 2 or not shared:
        return [f"No pair was voted on by two raters ({len(raters)} rater{'s' if len(raters) != 1 else ''})."]
    votes = [[state["active"].get((r, pid)) for pid in shared] for r in raters]  # raters x shared pairs
    labels = [[v and v["choice"] for v in row] for row in votes]
    out = [f"{len(shared)} pairs voted on by two or more of {len(raters)} raters ({', '.join(raters)}).", "",
           f"- Krippendorff's alpha (nominal: a, b, tie, both bad): {krippendorff_alpha(labels, 'nominal'):.3f}"]
    if len(raters) == 2:
        out += [f"- Cohen's kappa (a, b, tie, both bad): {cohen_kappa(*labels):.3f}",
                f"- raw agreement where both picked a winner: {agreement(*labels):.3f}"]
    for c in criteria:
        ratings = [[(v or {}).get("ratings", {}).get(c, {}).get(side) for v in row for side in ("a", "b")]
                   for row in votes]
        out.append(f"- {c}: Krippendorff's alpha (interval, 1-7 ratings): {krippendorff_alpha(ratings, 'interval'):.3f}")
    return out


def machine_lines(state, machines, n_boot=1000, seed=0):
    """Each machine labeller's agreement with every active vote on the pairs it labelled (`labeller_agreement`),
    the share without ties with a bootstrap 95% interval over votes; first the humans' agreement with each other
    (every two raters who voted on one pair give one unit), the yardstick MT-Bench sets a judge against."""
    out = ["| labeller | agrees with the votes, without ties [95% CI] | units | with ties (a, b, tie) | units | "
           "pairs it calls a tie |", "|---|---|---|---|---|---|"]

    def row(name, human, other, ties):
        wo, n_wo, w, n_w = labeller_agreement(human, other)
        hits = [float(h == m) for h, m in zip(human, other) if h in ("a", "b") and m in ("a", "b")]
        cell = fmt_ci(*win_rate_ci(hits, n_boot=n_boot, seed=seed), 3) if hits else "-"
        out.append(f"| {name} | {cell} | {n_wo} | {w:.3f} | {n_w} | {ties} |")

    by_pair = {}
    for (rater, pid), v in sorted(state["active"].items()):
        by_pair.setdefault(pid, []).append(v["choice"])
    units = [(x, y) for labels in by_pair.values() for x, y in itertools.combinations(labels, 2)]
    if units:
        row("humans with each other", [x for x, _ in units], [y for _, y in units], "-")
    for name, verdicts in machines.items():
        votes = [(v["choice"], verdicts[pid]) for (_, pid), v in sorted(state["active"].items()) if pid in verdicts]
        row(name, [h for h, _ in votes], [m for _, m in votes], sum(m == "tie" for m in verdicts.values()))
    return out


def machine_verdicts(pairs, cfg):
    """{labeller: {pair id: "a" | "b" | "tie"}} on `pairs`: --reward-model's (the response it scores higher; equal
    scores tie) and --judge's (evaluate.py's pairwise judge asked with a shown first and with b shown first, its two
    verdicts averaged by `evaluate.judge_preference`: a verdict that flips with the order is a tie), plus the
    judge's position bias on these pairs (`evaluate.position_bias`)."""
    import evaluate as E  # only here: the rest of arena.py needs no model
    device = C.pick_device(cfg.device)
    prompts, a, b = [p["messages"] for p in pairs], [p["a"] for p in pairs], [p["b"] for p in pairs]
    ids, out, notes = [p["id"] for p in pairs], {}, []
    if cfg.reward_model:
        rm, enc = E.load(cfg.reward_model, device, "scalar")
        share = E.preference(C.score_responses(rm, enc, prompts, a, cfg.batch_size),
                             C.score_responses(rm, enc, prompts, b, cfg.batch_size))
        out[f"reward model {os.path.basename(cfg.reward_model)}"] = dict(zip(ids, map(verdict_label, share.tolist())))
    if cfg.judge:
        judge, enc = E.load(cfg.judge, device, "lm")
        ecfg = E.Config(batch_size=cfg.batch_size)
        first = E.judge_margins(judge, enc, prompts, a, b, ecfg, device)
        swapped = E.judge_margins(judge, enc, prompts, b, a, ecfg, device)
        name = f"LLM judge {os.path.basename(cfg.judge)}"
        out[name] = dict(zip(ids, map(verdict_label, E.judge_preference(first, swapped).tolist())))
        # the same answers read as log-odds averaged over the two orders: a constant lean towards one letter cancels
        # and what is left decides (a judge that always answers "A" still ties on every pair, its margins equal)
        out[f"{name}, log-odds averaged"] = dict(zip(ids, map(verdict_label, E.preference(first, swapped).tolist())))
        notes.append(f"{name}: position bias {E.position_bias(first, swapped):.3f} on these {len(pairs)} pairs "
                     "(the share it judged by the order shown, not by the responses)")
    return out, notes


# -----------------------------------------------------------------------------
# The page: one HTML file; data only ever arrives as JSON and is inserted with textContent


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Arena</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 12px 20px; color: #222; }
header { display: flex; justify-content: space-between; align-items: baseline; border-bottom: 1px solid #ccc; }
h1 { font-size: 20px; margin: 6px 0; }
.turn { background: #f4f4f7; border-radius: 6px; padding: 6px 10px; margin: 6px 0; white-space: pre-wrap; }
.role { font-weight: 600; font-size: 12px; text-transform: uppercase; color: #667; display: block; }
.cols { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; margin-top: 12px; }
.resp { border: 1px solid #bbc; border-radius: 6px; padding: 10px; white-space: pre-wrap; min-height: 80px;
        overflow-wrap: anywhere; }
.side { font-weight: 600; margin-bottom: 4px; }
.rating { margin-top: 6px; font-size: 13px; }
.buttons { display: flex; gap: 10px; margin: 16px 0; flex-wrap: wrap; }
button { font-size: 15px; padding: 8px 14px; border-radius: 6px; border: 1px solid #889; background: #fff;
         cursor: pointer; }
button:hover { background: #eef; } button:disabled { opacity: .5; cursor: default; }
kbd { border: 1px solid #aaa; border-radius: 3px; padding: 0 4px; font-size: 12px; background: #fafafa; }
#status { color: #a33; min-height: 1.4em; } #done { font-size: 18px; margin: 30px 0; }
</style></head>
<body>
<header><h1>Which response is better?</h1>
  <div>rater <b id="rater"></b> &middot; <span id="progress"></span></div></header>
<form id="who" hidden><p>Your name: <input name="rater" autofocus> <button>start</button></p></form>
<main id="task" hidden>
  <section id="prompt"></section>
  <div class="cols">
    <div><div class="side">Left</div><div class="resp" id="left"></div><div id="rate-left"></div></div>
    <div><div class="side">Right</div><div class="resp" id="right"></div><div id="rate-right"></div></div>
  </div>
  <div class="buttons">
    <button data-vote="left"><kbd>1</kbd> <kbd>&larr;</kbd> left is better</button>
    <button data-vote="tie"><kbd>2</kbd> <kbd>&darr;</kbd> tie</button>
    <button data-vote="right"><kbd>3</kbd> <kbd>&rarr;</kbd> right is better</button>
    <button data-vote="both_bad"><kbd>4</kbd> <kbd>&uarr;</kbd> both are bad</button>
  </div>
</main>
<div id="done" hidden>All pairs rated. Thank you!</div>
<p><button id="undo"><kbd>u</kbd> undo the last vote</button></p>
<p id="status"></p>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let rater = params.get("rater") || "", state = null, busy = false;

function text(tag, content, cls) {  // every piece of data goes in as text, never as HTML
  const el = document.createElement(tag);
  el.textContent = content;
  if (cls) el.className = cls;
  return el;
}

function ratingRow(side) {
  const box = $("rate-" + side);
  box.replaceChildren();
  for (const c of state.criteria) {
    const row = text("div", "", "rating");
    row.append(text("span", c + ": "));
    const sel = document.createElement("select");
    sel.dataset.criterion = c; sel.dataset.side = side;
    sel.append(text("option", "-"));
    for (let v = 1; v <= 7; v++) { const o = text("option", String(v)); o.value = String(v); sel.append(o); }
    sel.value = "-";
    row.append(sel);
    box.append(row);
  }
}

function show(s) {
  state = s;
  rater = s.rater;
  $("rater").textContent = s.rater;
  $("progress").textContent = s.done + " of " + s.total + " rated";
  $("undo").disabled = !s.can_undo;
  $("who").hidden = true;
  if (!s.pair) { $("task").hidden = true; $("done").hidden = false; return; }
  $("done").hidden = true; $("task").hidden = false;
  const p = $("prompt");
  p.replaceChildren();
  for (const m of s.pair.prompt) {
    const turn = text("div", "", "turn");
    turn.append(text("span", m.role, "role"), document.createTextNode(m.content));
    p.append(turn);
  }
  $("left").textContent = s.pair.left;
  $("right").textContent = s.pair.right;
  ratingRow("left"); ratingRow("right");
  window.scrollTo(0, 0);
}

async function call(path, body) {
  busy = true;
  for (const b of document.querySelectorAll("button")) b.disabled = true;
  try {
    const r = await fetch(path, body === undefined ? {} :
      {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    const j = await r.json();
    if (!r.ok) { $("status").textContent = j.error || ("error " + r.status); if (j.state) show(j.state); }
    else { $("status").textContent = ""; show(j); }
  } catch (e) {
    $("status").textContent = "the server did not answer: your last vote may not be saved (" + e + ")";
  } finally {
    busy = false;
    for (const b of document.querySelectorAll("button")) b.disabled = false;
    if (state) $("undo").disabled = !state.can_undo;
  }
}

function vote(button) {
  if (busy || !state || !state.pair) return;
  const ratings = {};
  for (const sel of document.querySelectorAll("select[data-criterion]")) {
    if (sel.value === "-") continue;
    const c = sel.dataset.criterion;
    ratings[c] = ratings[c] || {};
    ratings[c][sel.dataset.side] = Number(sel.value);
  }
  call("api/vote", {rater, pair: state.pair.id, button, ratings});
}

function undo() { if (!busy && state && state.can_undo) call("api/undo", {rater}); }

for (const b of document.querySelectorAll("button[data-vote]")) b.addEventListener("click", () => vote(b.dataset.vote));
$("undo").addEventListener("click", undo);
const KEYS = {"1": "left", "ArrowLeft": "left", "2": "tie", "ArrowDown": "tie", "3": "right", "ArrowRight": "right",
              "4": "both_bad", "ArrowUp": "both_bad"};
document.addEventListener("keydown", (e) => {
  if (e.target.closest && e.target.closest("input, select, textarea")) return;
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (KEYS[e.key]) { e.preventDefault(); vote(KEYS[e.key]); }
  else if (e.key === "u") { e.preventDefault(); undo(); }
});

async function start() {
  const r = await fetch("api/next" + (rater ? "?rater=" + encodeURIComponent(rater) : ""));
  const j = await r.json();
  if (r.ok) show(j);
  else { $("who").hidden = false; $("status").textContent = j.error; }
}
start();
</script>
</body></html>
"""


def safe_json(obj):
    """JSON with <, > and & escaped as \\u sequences: inert even if someone pastes it into HTML."""
    return (json.dumps(obj, ensure_ascii=False).replace("&", "\\u0026").replace("<", "\\u003c")
            .replace(">", "\\u003e").encode("utf-8"))


def left_side(rater, pid):
    """Which response ("a" or "b") a rater sees on the left of a pair: a hash of (rater, pair), so the order
    is random across pairs and raters but the same on every reload and after a restart."""
    return "a" if hashlib.sha256(f"{rater}\0{pid}".encode()).digest()[0] % 2 == 0 else "b"


def rater_state(arena, rater):
    """What the page needs for one rater: progress, and the first pair they have not voted on (or None)."""
    active, pairs = arena["state"]["active"], arena["pairs"]
    done = sum((rater, p["id"]) in active for p in pairs)
    nxt = next((p for p in pairs if (rater, p["id"]) not in active), None)
    out = {"rater": rater, "done": done, "total": len(pairs), "criteria": arena["criteria"],
           "can_undo": bool(arena["state"]["stack"].get(rater)), "pair": None}
    if nxt is not None:
        left = left_side(rater, nxt["id"])
        right = "b" if left == "a" else "a"
        prompt = [{"role": m["role"], "content": m["content"]} for m in nxt["messages"]]
        out["pair"] = {"id": nxt["id"], "prompt": prompt, "left": nxt[left], "right": nxt[right], "left_is": left}
    return out


class BadRequest(Exception):
    """A request the page should not have sent: (HTTP status, one-line reason)."""


def check_rater(name, default):
    name = name or default
    if not name:
        raise BadRequest(400, "no rater: open the page as /?rater=YOUR_NAME (or start the server with --rater)")
    if not isinstance(name, str) or not RATER_NAME.match(name):
        raise BadRequest(400, "a rater name is 1-64 letters, digits, spaces or . @ + - _")
    return name


def check_ratings(ratings, criteria):
    if not isinstance(ratings, dict):
        raise BadRequest(400, "'ratings' must be an object {criterion: {\"left\"|\"right\": 1-7}}")
    for c, sides in ratings.items():
        if c not in criteria:
            raise BadRequest(400, f"unknown criterion {c!r}")
        if not isinstance(sides, dict) or not set(sides) <= {"left", "right"}:
            raise BadRequest(400, f"ratings of {c!r} must be {{\"left\": 1-7, \"right\": 1-7}}")
        for v in sides.values():
            if isinstance(v, bool) or not isinstance(v, int) or not RATING_RANGE[0] <= v <= RATING_RANGE[1]:
                raise BadRequest(400, f"rating {v!r} of {c!r} is not an integer from 1 to 7")


def handle_vote(arena, body):
    rater = check_rater(body.get("rater"), arena["default_rater"])
    pid, button = body.get("pair"), body.get("button")
    if not isinstance(pid, str) or pid not in arena["by_id"]:
        raise BadRequest(400, f"unknown pair id {str(pid)[:40]!r}")
    if button not in BUTTONS:
        raise BadRequest(400, f"'button' must be one of {', '.join(BUTTONS)}")
    ratings = body.get("ratings", {})
    check_ratings(ratings, arena["criteria"])
    left = left_side(rater, pid)
    side = {"left": left, "right": "b" if left == "a" else "a"}
    choice = side.get(button, button)
    with arena["lock"]:
        if (rater, pid) in arena["state"]["active"]:
            raise BadRequest(409, f"{rater} already voted on pair {pid} (undo it first)")
        rec = {"type": "vote", "rater": rater, "pair": pid, "choice": choice, "button": button, "left": left,
               "ratings": {c: {side[s]: v for s, v in r.items()} for c, r in ratings.items()}, "time": time.time()}
        append_record(arena["votes_path"], rec)
        apply_record(arena["state"], rec, "vote")
        return rater_state(arena, rater)


def handle_undo(arena, body):
    rater = check_rater(body.get("rater"), arena["default_rater"])
    with arena["lock"]:
        stack = arena["state"]["stack"].get(rater)
        if not stack:
            raise BadRequest(409, f"{rater} has no vote to undo")
        rec = {"type": "undo", "rater": rater, "pair": stack[-1], "time": time.time()}
        append_record(arena["votes_path"], rec)
        apply_record(arena["state"], rec, "undo")
        return rater_state(arena, rater)


def make_server(pairs_path, votes_path, rater="", criteria_path="", host="127.0.0.1", port=8000):
    """The rating server, bound and ready (call .serve_forever(); .shutdown() from another thread stops it). The
    votes file is replayed first, so raters resume where they stopped."""
    pairs = read_pairs(pairs_path)
    if not votes_path:
        raise M.UserError("--serve needs --votes FILE (the votes are appended to it)")
    os.makedirs(os.path.dirname(os.path.abspath(votes_path)), exist_ok=True)
    arena = {"pairs": pairs, "by_id": {p["id"]: p for p in pairs}, "criteria": read_criteria(criteria_path),
             "votes_path": votes_path, "state": read_votes(votes_path, pairs, repair=True), "lock": threading.Lock(),
             "default_rater": rater}
    if rater and not RATER_NAME.match(rater):
            raise M.UserError(f"--rater {rater!r}: a name is 1-64 letters, digits, spaces or . @ + - _")

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "arena"

        def log_message(self, *args):  # quiet: the votes file is the log
            pass

        def reply(self, status, body, kind="application/json; charset=utf-8"):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            if kind.startswith("text/html"):
                self.send_header("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; "
                                 "style-src 'unsafe-inline'")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            try:
                if url.path in ("/", "/index.html"):
                    return self.reply(200, PAGE.encode("utf-8"), "text/html; charset=utf-8")
                if url.path == "/api/next":
                    who = check_rater(query.get("rater", [""])[0], arena["default_rater"])
                    with arena["lock"]:
                        return self.reply(200, safe_json(rater_state(arena, who)))
                raise BadRequest(404, f"no such page {url.path[:60]!r}")
            except BadRequest as e:
                self.reply(e.args[0], safe_json({"error": e.args[1]}))

        def do_POST(self):
            url = urllib.parse.urlsplit(self.path)
            try:
                handler = {"/api/vote": handle_vote, "/api/undo": handle_undo}.get(url.path)
                if handler is None:
                    raise BadRequest(404, f"no such endpoint {url.path[:60]!r}")
                try:
                    size = int(self.headers.get("Content-Length", "0"))
                except ValueError:
                    raise BadRequest(400, "bad Content-Length")
                if not 0 < size <= MAX_BODY:
                    raise BadRequest(413 if size > MAX_BODY else 400, f"a request body of 1 to {MAX_BODY} bytes")
                try:
                    body = json.loads(self.rfile.read(size).decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    raise BadRequest(400, "the body is not JSON")
                if not isinstance(body, dict):
                    raise BadRequest(400, "the body must be a JSON object")
                self.reply(200, safe_json(handler(arena, body)))
            except BadRequest as e:
                self.reply(e.args[0], safe_json({"error": e.args[1]}))

    try:
        server = http.server.ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise M.UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})")
    server.daemon_threads = True
    server.arena = arena
    return server


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = C.parse_config(Config, argv, description=__doc__)
    if cfg.n_boot < 1:
        raise M.UserError(f"--n-boot {cfg.n_boot} must be at least 1")
    if cfg.build_pairs:
        if not cfg.pairs:
            raise M.UserError("--build-pairs needs --pairs FILE to write the pairs to")
        rows = build_pairs(cfg.build_pairs, cfg.seed)
        C.write_jsonl(cfg.pairs, rows)
        print(f"{cfg.pairs}: {len(rows)} pairs")
        return
    if not cfg.pairs:
        raise M.UserError("--pairs FILE is needed (--build-pairs makes one)")
    if cfg.serve:
        server = make_server(cfg.pairs, cfg.votes, cfg.rater, cfg.criteria, cfg.host, cfg.port)
        host, port = server.server_address[:2]
        if cfg.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: listening on {cfg.host}: anyone who can reach this machine can vote", file=sys.stderr)
        who = f"?rater={urllib.parse.quote(cfg.rater)}" if cfg.rater else "?rater=YOUR_NAME"
        print(f"arena: {len(server.arena['pairs'])} pairs, votes to {cfg.votes}; open http://{host}:{port}/{who}",
              flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("arena: stopped; every vote given is in " + cfg.votes, file=sys.stderr)
        finally:
            server.server_close()
        return
    if cfg.vote_by:
        if not cfg.votes:
            raise M.UserError("--vote-by needs --votes FILE to append its votes to")
        fn = C.load_function(cfg.vote_by, "--vote-by")
        rater = cfg.rater or cfg.vote_by.rpartition(":")[2]
        if not RATER_NAME.match(rater):
            raise M.UserError(f"--rater {rater!r}: a rater name is 1-64 letters, digits, spaces or . @ + - _")
        pairs = read_pairs(cfg.pairs)
        recs = function_votes(pairs, read_votes(cfg.votes, pairs, repair=True), fn, cfg.vote_by, rater)
        for rec in recs:
            append_record(cfg.votes, rec)
        print(f"{cfg.votes}: {len(recs)} votes by {rater} ({cfg.vote_by}): "
              f"{sum(r['choice'] == 'a' for r in recs)} a, {sum(r['choice'] == 'b' for r in recs)} b, "
              f"{sum(r['choice'] == 'tie' for r in recs)} ties", file=sys.stderr)
        if not (cfg.report or cfg.out_prefs or cfg.out_ties):
            return
    if (cfg.reward_model or cfg.judge) and not cfg.report:
        raise M.UserError("--reward-model and --judge are set beside the votes in --report: add --report")
    if cfg.batch_size < 1:
        raise M.UserError(f"--batch-size {cfg.batch_size} must be at least 1")
    if not (cfg.report or cfg.out_prefs or cfg.out_ties):
        raise M.UserError("nothing to do: give --serve, --build-pairs, --report or --out-prefs")
    pairs = read_pairs(cfg.pairs)
    if not cfg.votes or not os.path.exists(cfg.votes):
        raise M.UserError(f"--votes {cfg.votes!r}: no such votes file")
    state = read_votes(cfg.votes, pairs)
    if cfg.out_prefs or cfg.out_ties:
        prefs, ties = preference_rows(pairs, state)
        if cfg.out_prefs:
            C.write_jsonl(cfg.out_prefs, prefs)
        if cfg.out_ties:
            C.write_jsonl(cfg.out_ties, ties)
        print(f"{len(prefs)} preference pairs" + (f" to {cfg.out_prefs}" if cfg.out_prefs else "") +
              f"; {sum(t['label'] == 'tie' for t in ties)} ties and {sum(t['label'] == 'both_bad' for t in ties)} "
              f"both-bad votes " + (f"to {cfg.out_ties}" if cfg.out_ties else "left out"), file=sys.stderr)
    if cfg.report:
        machines, notes = {}, []
        if cfg.reward_model or cfg.judge:
            voted = {pid for _, pid in state["active"]}
            machines, notes = machine_verdicts([p for p in pairs if p["id"] in voted], cfg)
        print(report(pairs, state, read_criteria(cfg.criteria), cfg.n_boot, cfg.seed, machines, notes))


if __name__ == "__main__":
    C.run(main)
