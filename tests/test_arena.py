"""arena.py: the statistics (bootstrap coverage on simulated studies, Bradley-Terry recovering known strengths,
Cohen's kappa and Krippendorff's alpha on textbook examples), the rating server in-process (votes on disk at once,
undo, resume after a restart, input validation, escaping), votes -> prefs.jsonl -> reward.py, and (slow) the page
driven in headless Chromium.

    python -m pytest tests/test_arena.py -q
    make arena-browser            # installs chromium + playwright, then the slow browser test
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import arena as A
import common as C
from conftest import ROOT, always_a_judge, assert_one_line_error, run_script, save_tiny

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
XSS = "<script>alert(1)</script>"


# ----------------------------------------------------------------------------- win rates


def test_bootstrap_interval_covers_the_true_rate_at_about_its_level():
    """200 simulated studies of 60 votes (A wins 45%, ties 20%: true rate 0.55). A 95% interval's coverage over 200
    studies has sd sqrt(.95 * .05 / 200) = 0.015; the percentile bootstrap runs a little under nominal at this n
    (~0.93), so [0.88, 0.99] is about 3 sd either side of what it should give: a wrong interval (e.g. the sd of
    one vote instead of the mean's, or a 68% one) falls far outside, and the fixed seeds keep it deterministic."""
    g = torch.Generator().manual_seed(0)
    covered = 0
    for study in range(200):
        u = torch.rand(60, generator=g, dtype=torch.float64)
        outcomes = torch.where(u < 0.45, 1.0, torch.where(u < 0.65, 0.5, 0.0))
        rate, lo, hi = A.win_rate_ci(outcomes, n_boot=400, seed=study)
        covered += lo <= 0.55 <= hi
    assert 0.88 <= covered / 200 <= 0.99, covered


@FAST
@given(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=1, max_size=40), st.integers(0, 10))
def test_win_rate_interval_properties(outcomes, seed):
    rate, lo, hi = A.win_rate_ci(outcomes, n_boot=200, seed=seed)
    assert rate == pytest.approx(sum(outcomes) / len(outcomes))
    assert 0 <= lo <= rate + 1e-12 and rate - 1e-12 <= hi <= 1
    assert A.win_rate_ci(outcomes, n_boot=200, seed=seed) == (rate, lo, hi)  # seeded
    flipped = A.win_rate_ci([1 - x for x in outcomes], n_boot=200, seed=seed)
    assert flipped[0] == pytest.approx(1 - rate)


def test_win_rate_refuses_what_is_no_outcome():
    with pytest.raises(ValueError):
        A.win_rate_ci([1, 2])
    with pytest.raises(ValueError):
        A.win_rate_ci([])
    assert A.win_rate_ci([1, 1, 1]) == (1.0, 1.0, 1.0)


# ----------------------------------------------------------------------------- Bradley-Terry


def simulate(true, n, seed):
    """n comparisons of random model pairs, each won by Bradley-Terry sampling on the true log-strengths."""
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, len(true), (n,), generator=g)
    j = (i + torch.randint(1, len(true), (n,), generator=g)) % len(true)
    wins = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(true[i] - true[j])
    return [(a, b) if w else (b, a) for a, b, w in zip(i.tolist(), j.tolist(), wins.tolist())]


def test_bradley_terry_recovers_known_strengths():
    true = torch.tensor([-1.5, -0.9, -0.2, 0.3, 0.8, 1.5], dtype=torch.float64)  # mean 0
    s = A.bradley_terry(simulate(true, 4000, 0), len(true))
    assert s.sum().abs() < 1e-9
    assert torch.corrcoef(torch.stack([s, true]))[0, 1] > 0.99
    assert (s - true).abs().max() < 0.25  # sd of each estimate ~0.07 with ~1300 games per model
    strength, lo, hi = A.bradley_terry_ci(simulate(true, 4000, 0), len(true), n_boot=300)
    torch.testing.assert_close(strength, s)
    assert (lo <= strength).all() and (strength <= hi).all()
    assert ((lo <= true) & (true <= hi)).sum() >= 5  # 95% intervals: at most one miss of six expected


def hunter_mm(W, iters=5000):
    """Hunter (2004)'s MM algorithm for the unpenalised maximum likelihood, an independent implementation:
    pi_i <- W_i / sum_j N_ij / (pi_i + pi_j)."""
    n = W.shape[0]
    N, pi = W + W.T, torch.ones(n, dtype=torch.float64)
    for _ in range(iters):
        pi = W.sum(1) / (N / (pi[:, None] + pi[None, :])).sum(1)
        pi = pi / pi.sum()
    s = pi.log()
    return s - s.mean()


def test_bradley_terry_equals_hunters_mm_and_its_gradient_vanishes():
    true = torch.tensor([-1.0, 0.0, 0.4, 0.6], dtype=torch.float64)
    comps = simulate(true, 300, 1) + [(0, 1, 0.5), (2, 3, 0.5)]  # ties: half a win each way
    W = A.win_matrix(comps, 4)
    torch.testing.assert_close(A.bradley_terry(comps, 4, l2=1e-10), hunter_mm(W), atol=1e-6, rtol=0)
    s = A.bradley_terry(comps, 4).requires_grad_()
    objective = A._bt_objective(s[None], W[None], 0.01)[0]
    (grad,) = torch.autograd.grad(objective, s)  # autograd, not the hand-written gradient of the fit
    assert grad.abs().max() < 1e-8


@FAST
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.sampled_from([0.0, 0.5, 1.0])), min_size=1,
                max_size=30).map(lambda rows: [r for r in rows if r[0] != r[1]]).filter(bool))
def test_bradley_terry_properties(comps):
    s = A.bradley_terry(comps, 4)
    assert torch.isfinite(s).all() and abs(s.sum().item()) < 1e-9
    swapped = A.bradley_terry([(j, i, 1 - x) for i, j, x in comps], 4)  # the same games told the other way round
    torch.testing.assert_close(swapped, s, atol=1e-7, rtol=0)
    flipped = A.bradley_terry([(i, j, 1 - x) for i, j, x in comps], 4)  # every result reversed
    torch.testing.assert_close(flipped, -s, atol=1e-7, rtol=0)


def test_bradley_terry_edge_cases():
    assert A.bradley_terry([(0, 1, 0.5), (1, 2, 0.5)], 3).abs().max() < 1e-12  # only ties: all equal
    s = A.bradley_terry([(0, 1), (0, 2), (0, 1), (1, 2)], 4)  # 0 never loses, 3 never plays
    assert torch.isfinite(s).all() and s[0] == s.max() and s[0] > s[1] > s[2]
    with pytest.raises(ValueError):
        A.bradley_terry([(0, 0)], 2)
    with pytest.raises(ValueError):
        A.bradley_terry([(0, 5)], 2)


def test_elo_scale():
    assert A.elo_scale(0.0) == 1000
    # 400 Elo points apart = odds of 10 to 1
    assert A.elo_scale(math.log(10)) - A.elo_scale(0.0) == pytest.approx(400)
    torch.testing.assert_close(A.elo_scale(torch.zeros(2)), torch.full((2,), 1000.0))


# ----------------------------------------------------------------------------- agreement

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers x 12 units, missing data
KRIPPENDORFF_2011 = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]


def test_krippendorff_alpha_on_krippendorffs_example():
    assert A.krippendorff_alpha(KRIPPENDORFF_2011, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert A.krippendorff_alpha(KRIPPENDORFF_2011, "ordinal") == pytest.approx(0.815, abs=5e-4)
    assert A.krippendorff_alpha(KRIPPENDORFF_2011, "interval") == pytest.approx(0.849, abs=5e-4)


def alpha_by_pairs(ratings, delta):
    """Krippendorff's alpha from pairs of values, without a coincidence matrix: 1 - D_o / D_e, D_o the mean
    within-unit disagreement (each unit's pairs weighted 1 / (m_u - 1)), D_e the mean over all pairs of values."""
    units = [[r[u] for r in ratings if r[u] is not None] for u in range(len(ratings[0]))]
    units = [u for u in units if len(u) >= 2]
    values = [v for u in units for v in u]
    n = len(values)
    d_o = sum(delta(u[i], u[j]) / (len(u) - 1)
              for u in units for i in range(len(u)) for j in range(len(u)) if i != j) / n
    d_e = sum(delta(values[i], values[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return 1 - d_o / d_e


@FAST
@given(st.integers(2, 4).flatmap(lambda raters: st.lists(
    st.lists(st.one_of(st.none(), st.integers(1, 4)), min_size=raters, max_size=raters), min_size=2, max_size=8)))
def test_krippendorff_alpha_equals_the_pairwise_definition(units):
    ratings = [list(r) for r in zip(*units)]  # raters x units
    for level, delta in (("nominal", lambda a, b: float(a != b)), ("interval", lambda a, b: (a - b) ** 2)):
        got = A.krippendorff_alpha(ratings, level)
        try:
            want = alpha_by_pairs(ratings, delta)
        except ZeroDivisionError:  # no pairable values, or only one value: alpha is undefined
            assert math.isnan(got)
            continue
        assert got == pytest.approx(want, abs=1e-9)


def test_cohen_kappa_on_the_textbook_example():
    # Wikipedia's "Cohen's kappa" example: 50 proposals, both yes 20, A yes B no 5, A no B yes 10, both no 15
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert A.cohen_kappa(a, b) == pytest.approx(0.4)
    assert A.agreement(a, b) == pytest.approx(0.7)
    assert A.cohen_kappa(a, a) == 1.0
    assert A.cohen_kappa(a + [None], b + ["yes"]) == pytest.approx(0.4)  # a missing label leaves the unit out
    assert math.isnan(A.cohen_kappa(["x", "x"], ["x", "x"]))


@FAST
@given(st.lists(st.tuples(st.sampled_from("ab"), st.sampled_from("ab")), min_size=1, max_size=30))
def test_kappa_is_symmetric_and_at_most_one(rows):
    a, b = [x for x, _ in rows], [y for _, y in rows]
    k = A.cohen_kappa(a, b)
    assert math.isnan(k) and math.isnan(A.cohen_kappa(b, a)) or k == pytest.approx(A.cohen_kappa(b, a)) and k <= 1


def test_agreement_leaves_out_ties_and_missing_labels():
    a = ["a", "b", "tie", None, "a", "both_bad"]
    b = ["a", "a", "a", "b", "tie", "b"]
    assert A.agreement(a, b) == 0.5  # only the first two units count
    assert math.isnan(A.agreement(["tie"], ["a"]))


def test_labeller_agreement_worked_example():
    human = ["a", "b", "tie", "both_bad", None, "a"]
    machine = ["a", "a", "tie", "tie", "b", "b"]
    # without ties: units 0, 1, 5 (both decisive), one of three alike; with ties: every unit both labelled (0-3, 5),
    # alike on 0, 2 and 3 (both bad reads as a tie)
    assert A.labeller_agreement(human, machine) == (pytest.approx(1 / 3), 3, pytest.approx(3 / 5), 5)
    wo, n, w, m = A.labeller_agreement(["tie"], ["a"])
    assert math.isnan(wo) and n == 0 and w == 0 and m == 1
    with pytest.raises(ValueError):
        A.labeller_agreement(["a"], [])
    assert [A.verdict_label(x) for x in (1.0, 0.75, 0.5, 0.25, 0.0)] == ["a", "a", "tie", "b", "b"]


LABEL = st.sampled_from(["a", "b", "tie", "both_bad", None])


@FAST
@given(st.lists(st.tuples(LABEL, LABEL), min_size=1, max_size=30))
def test_labeller_agreement_properties(units):
    h, m = [x for x, _ in units], [y for _, y in units]
    wo, n_wo, w, n_w = A.labeller_agreement(h, m)
    assert (wo, n_wo, w, n_w)[1::2] == A.labeller_agreement(m, h)[1::2]  # symmetric counts
    assert n_wo <= n_w and (math.isnan(wo) and n_wo == 0 or 0 <= wo <= 1)
    assert math.isnan(wo) and math.isnan(A.agreement(h, m)) or wo == pytest.approx(A.agreement(h, m))
    self_wo, _, self_w, _ = A.labeller_agreement(h, h)  # a labeller always agrees with itself
    assert (math.isnan(self_wo) or self_wo == 1) and (math.isnan(self_w) or self_w == 1)


# ----------------------------------------------------------------------------- the server


def pair_rows():
    return [
        {"id": "p1", "prompt": "What is 2 + 3?", "a": "5", "b": "The answer is 5.", "model_a": "m1", "model_b": "m2"},
        {"id": "p2", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>!</b>"}],
         "a": XSS, "b": "Hello.", "model_a": "m2", "model_b": "m3"},
        {"id": "p3", "prompt": "Reverse abc.", "a": "cba", "b": "abc", "model_a": "m1", "model_b": "m3"},
        {"id": "p4", "prompt": "Upper-case hi.", "a": "HI", "b": "hi", "model_a": "m3", "model_b": "m1"},
    ]


@pytest.fixture
def files(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pair_rows()))
    criteria = tmp_path / "criteria.txt"
    criteria.write_text("helpful\n\n# comment\ncorrect\n")
    return pairs, tmp_path / "votes.jsonl", criteria


class Server:
    """make_server in a thread on a free port; .get / .post return (status, JSON)."""

    def __init__(self, pairs, votes, **kw):
        self.server = A.make_server(str(pairs), str(votes), port=0, **kw)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def raw(self, path, body=None):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def get(self, path):
        status, _, body = self.raw(path)
        return status, json.loads(body)

    def post(self, path, body):
        status, _, body = self.raw(path, body)
        return status, json.loads(body)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_page_inserts_text_never_html(files):
    pairs, votes, criteria = files
    srv = Server(pairs, votes, rater="ann", criteria_path=str(criteria))
    try:
        status, headers, page = srv.raw("/")
        page = page.decode()
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert "textContent" in page and "createTextNode" in page
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in page, sink
        assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere
        assert srv.post("/api/vote", {"pair": "p1", "button": "left"})[0] == 200
        status, _, raw = srv.raw("/api/next")  # p2: the response that is a script tag
        assert status == 200 and b"<script" not in raw and b"<b>" not in raw and b"\\u003cscript\\u003e" in raw
        state = json.loads(raw)
        assert state["pair"]["id"] == "p2" and XSS in (state["pair"]["left"], state["pair"]["right"])
        assert state["pair"]["prompt"][1] == {"role": "user", "content": "Hi <b>!</b>"}
        assert "model_a" not in json.dumps(state) and "m2" not in json.dumps(state)  # blind: no model names
        assert state["criteria"] == ["helpful", "correct"]
    finally:
        srv.stop()


def test_votes_reach_the_file_at_once_and_a_restart_resumes(files):
    pairs, votes, _ = files
    srv = Server(pairs, votes, rater="ann")
    try:
        status, state = srv.get("/api/next")
        assert status == 200 and state["pair"]["id"] == "p1" and (state["done"], state["total"]) == (0, 4)
        assert srv.get("/api/next")[1] == state  # a reload shows the same pair in the same order
        left = state["pair"]["left_is"]
        status, nxt = srv.post("/api/vote", {"pair": "p1", "button": "left"})
        assert status == 200 and nxt["pair"]["id"] == "p2" and nxt["done"] == 1
        rec = lines(votes)
        assert len(rec) == 1 and rec[0]["type"] == "vote" and rec[0]["rater"] == "ann" and rec[0]["left"] == left
        assert rec[0]["choice"] == left  # "left is better" is a vote for whichever response was on the left
        srv.post("/api/vote", {"pair": "p2", "button": "tie"})
        assert [r["choice"] for r in lines(votes)] == [left, "tie"]
    finally:
        srv.stop()
    srv = Server(pairs, votes, rater="ann")
    try:
        status, state = srv.get("/api/next")
        assert state["pair"]["id"] == "p3" and state["done"] == 2 and state["can_undo"]
        status, state = srv.get("/api/next?rater=bob")  # another rater starts at the beginning
        assert state["rater"] == "bob" and state["pair"]["id"] == "p1" and not state["can_undo"]
    finally:
        srv.stop()


def test_a_killed_server_loses_no_vote(files):
    """The real command, killed with SIGKILL right after two votes: both are on disk, and the next server resumes."""
    pairs, votes, _ = files
    proc = subprocess.Popen([sys.executable, "arena.py", "--serve", "--pairs", str(pairs), "--votes", str(votes),
                             "--rater", "ann", "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        url = re.search(r"http://[^/]+", proc.stdout.readline()).group(0)
        for pid, button in (("p1", "left"), ("p2", "right")):
            req = urllib.request.Request(url + "/api/vote", data=json.dumps({"pair": pid, "button": button}).encode())
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 200
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
    assert [(r["pair"], r["button"]) for r in lines(votes)] == [("p1", "left"), ("p2", "right")]
    srv = Server(pairs, votes, rater="ann")
    try:
        assert srv.get("/api/next")[1]["pair"]["id"] == "p3"
    finally:
        srv.stop()


def test_undo_takes_back_the_last_vote_everywhere(files):
    pairs, votes, _ = files
    srv = Server(pairs, votes)
    try:
        assert srv.post("/api/undo", {"rater": "ann"})[0] == 409  # nothing to undo yet
        srv.post("/api/vote", {"rater": "ann", "pair": "p1", "button": "right"})
        srv.post("/api/vote", {"rater": "ann", "pair": "p2", "button": "left"})
        status, state = srv.post("/api/undo", {"rater": "ann"})
        assert status == 200 and state["pair"]["id"] == "p2" and state["done"] == 1
        assert lines(votes)[-1] == {**lines(votes)[-1], "type": "undo", "rater": "ann", "pair": "p2"}
        status, state = srv.post("/api/vote", {"rater": "ann", "pair": "p2", "button": "both_bad"})
        assert status == 200 and state["pair"]["id"] == "p3"
    finally:
        srv.stop()
    st_ = A.read_votes(str(votes), A.read_pairs(str(pairs)))
    assert {k: v["choice"] for k, v in st_["active"].items()}[("ann", "p2")] == "both_bad"
    prefs, ties = A.preference_rows(A.read_pairs(str(pairs)), st_)
    assert [p["pair"] for p in prefs] == ["p1"] and [(t["pair"], t["label"]) for t in ties] == [("p2", "both_bad")]


def test_bad_requests_are_refused_with_json(files):
    pairs, votes, criteria = files
    srv = Server(pairs, votes, criteria_path=str(criteria))
    try:
        cases = [
            ({"rater": "ann", "pair": "nope", "button": "left"}, 400, "unknown pair"),
            ({"rater": "ann", "pair": "p1", "button": "up"}, 400, "'button'"),
            ({"pair": "p1", "button": "left"}, 400, "no rater"),
            ({"rater": "<x>", "pair": "p1", "button": "left"}, 400, "rater name"),
            ({"rater": "ann", "pair": "p1", "button": "left", "ratings": {"helpful": {"left": 9}}}, 400, "1 to 7"),
            ({"rater": "ann", "pair": "p1", "button": "left", "ratings": {"fun": {"left": 3}}}, 400, "criterion"),
        ]
        for body, code, message in cases:
            status, out = srv.post("/api/vote", body)
            assert status == code and message in out["error"], (body, out)
        assert srv.post("/api/vote", b"{not json")[0] == 400
        assert srv.post("/api/nothing", {})[0] == 404
        assert srv.get("/api/next")[0] == 400  # no rater anywhere
        assert not votes.exists() or votes.read_text() == ""  # nothing refused was written
        ok = {"rater": "ann", "pair": "p1", "button": "left", "ratings": {"helpful": {"left": 7, "right": 2}}}
        assert srv.post("/api/vote", ok)[0] == 200
        assert srv.post("/api/vote", ok)[0] == 409  # a double click does not vote twice
        rec = lines(votes)
        assert len(rec) == 1
        left, right = rec[0]["left"], "b" if rec[0]["left"] == "a" else "a"
        assert rec[0]["ratings"] == {"helpful": {left: 7, right: 2}}  # stored per response, not per side
    finally:
        srv.stop()


def test_a_half_written_last_line_is_cut_on_restart(files):
    pairs, votes, _ = files
    votes.write_text(json.dumps({"type": "vote", "rater": "ann", "pair": "p1", "choice": "a"}) + "\n" + '{"type": "vo')
    srv = Server(pairs, votes)
    try:
        assert srv.get("/api/next?rater=ann")[1]["pair"]["id"] == "p2"
        srv.post("/api/vote", {"rater": "ann", "pair": "p2", "button": "tie"})
        assert [r["pair"] for r in lines(votes)] == ["p1", "p2"]
    finally:
        srv.stop()


def test_the_order_shown_is_random_across_pairs_and_fixed_per_rater_and_pair():
    sides = [A.left_side("ann", f"p{i}") for i in range(64)]
    assert 16 < sides.count("a") < 48
    assert sides == [A.left_side("ann", f"p{i}") for i in range(64)]
    assert sides != [A.left_side("bob", f"p{i}") for i in range(64)]


# ----------------------------------------------------------------------------- files and the command line


def vote_all(pairs, votes, raters_buttons):
    srv = Server(pairs, votes)
    try:
        for rater, buttons in raters_buttons.items():
            for button in buttons:
                state = srv.get(f"/api/next?rater={rater}")[1]
                assert srv.post("/api/vote", {"rater": rater, "pair": state["pair"]["id"], "button": button})[0] == 200
    finally:
        srv.stop()


def test_report_and_prefs_from_the_command_line(files, tmp_path):
    pairs, votes, _ = files
    vote_all(pairs, votes, {"ann": ["left", "right", "tie", "left"], "bob": ["left", "both_bad", "right"]})
    prefs, ties = tmp_path / "prefs.jsonl", tmp_path / "ties.jsonl"
    proc = run_script("arena.py", "--pairs", str(pairs), "--votes", str(votes), "--report", "--n-boot", "200",
                      "--out-prefs", str(prefs), "--out-ties", str(ties))
    out = proc.stdout
    assert "## Leaderboard" in out and "| 1 |" in out and all(m in out for m in ("m1", "m2", "m3"))
    assert "Krippendorff's alpha" in out and "Cohen's kappa" in out and "3 pairs voted on by two" in out
    assert "## Pairwise win rates" in out
    rows = C.read_jsonl(str(prefs), "pref")  # what reward.py / dpo.py read
    assert [(r["pair"], r["rater"]) for r in rows] == [("p1", "ann"), ("p1", "bob"), ("p2", "ann"), ("p3", "bob"),
                                                       ("p4", "ann")]
    assert [(t["pair"], t["label"]) for t in lines(ties)] == [("p2", "both_bad"), ("p3", "tie")]
    assert "5 preference pairs" in proc.stderr and "1 ties and 1 both-bad" in proc.stderr


def machine_row(out, name):
    """A row of the report's machine table -> (without ties, units, with ties, units, pairs called a tie)."""
    row = next(line for line in out.splitlines() if line.startswith(f"| {name}"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    return (math.nan if cells[1] == "-" else float(cells[1].split()[0])), int(cells[2]), float(cells[3]), \
        int(cells[4]), cells[5]


def test_reward_model_and_judge_against_the_humans(files, tmp_path, enc):
    """The report's agreement of a reward model and an LLM judge with the votes equals the same counted by hand from
    the reward model's own scores; a judge that always answers "A" calls every pair a tie and shows bias 1."""
    pairs, votes, _ = files
    vote_all(pairs, votes, {"ann": ["left", "right", "tie", "left"], "bob": ["left", "both_bad", "right", "right"]})
    rm = save_tiny(tmp_path / "rm.pt", enc, score_std=0.5, head="scalar")
    judge = tmp_path / "judge.pt"
    C.save_checkpoint(str(judge), always_a_judge(enc), enc)
    proc = run_script("arena.py", "--pairs", str(pairs), "--votes", str(votes), "--report", "--n-boot", "50",
                      "--reward-model", rm, "--judge", str(judge), "--device", "cpu")
    out = proc.stdout
    assert "## Machine labellers against the raters" in out
    state, rows = A.read_votes(str(votes)), A.read_pairs(str(pairs))
    model, _, _ = C.load_model(rm, torch.device("cpu"))
    scores = {p["id"]: C.score_responses(model.eval(), enc, [p["messages"]] * 2, [p["a"], p["b"]]) for p in rows}
    by_hand = [(v["choice"], "a" if scores[pid][0] > scores[pid][1] else "b" if scores[pid][0] < scores[pid][1]
                else "tie") for (_, pid), v in sorted(state["active"].items())]
    wo, n_wo, w, n_w = A.labeller_agreement([h for h, _ in by_hand], [m for _, m in by_hand])
    got = machine_row(out, "reward model rm.pt")
    assert got[:4] == (pytest.approx(wo, abs=5e-4), n_wo, pytest.approx(w, abs=5e-4), n_w) and n_w == 8
    # the always-"A" judge: a tie on all 4 pairs, so no decisive unit; with ties it matches the human ties only
    assert machine_row(out, "LLM judge judge.pt")[1:] == (0, pytest.approx(2 / 8, abs=5e-4), 8, "4")
    assert machine_row(out, "LLM judge judge.pt, log-odds averaged")[1:] == (0, pytest.approx(2 / 8, abs=5e-4), 8, "4")
    assert "judge.pt: position bias 1.000 on these 4 pairs" in out
    # humans with each other: one unit per pair (both voted on all 4), ann's label against bob's
    ann, bob = ([state["active"][(r, p["id"])]["choice"] for p in rows] for r in ("ann", "bob"))
    wo, n_wo, w, n_w = A.labeller_agreement(ann, bob)
    assert machine_row(out, "humans with each other")[1:4] == (n_wo, pytest.approx(w, abs=5e-4), 4)


def test_the_judges_two_readings_of_both_orders(monkeypatch):
    """Margins m1 (a shown as A) and m2 (a shown as B) of a judge that leans to "A": by verdicts every pair flips
    with the order (a tie); by log-odds averaged a wins where m1 > m2, b where m1 < m2, a tie where equal."""
    import evaluate as E
    margins = {("x", "y"): torch.tensor([2.0, 2.0, 0.5, -1.0]), ("y", "x"): torch.tensor([1.0, 3.0, 0.5, 1.0])}
    monkeypatch.setattr(E, "load", lambda *a: (None, None))
    monkeypatch.setattr(E, "judge_margins", lambda judge, enc, prompts, first, second, *a: margins[(first[0], second[0])])
    pairs = [{"id": f"p{i}", "messages": [], "a": "x", "b": "y"} for i in range(4)]
    out, notes = A.machine_verdicts(pairs, A.Config(judge="j.pt", device="cpu"))
    assert out["LLM judge j.pt"] == {"p0": "tie", "p1": "tie", "p2": "tie", "p3": "b"}
    assert out["LLM judge j.pt, log-odds averaged"] == {"p0": "a", "p1": "b", "p2": "tie", "p3": "b"}
    assert notes == ["LLM judge j.pt: position bias 0.750 on these 4 pairs (the share it judged by the order shown, "
                     "not by the responses)"]


def test_machine_labellers_need_the_report(files):
    pairs, votes, _ = files
    vote_all(pairs, votes, {"ann": ["left"]})
    proc = run_script("arena.py", "--pairs", str(pairs), "--votes", str(votes), "--out-prefs", str(votes) + ".p",
                      "--judge", "x.pt", check=False)
    assert_one_line_error(proc, "", "add --report")


def test_build_pairs_makes_every_pair_of_models(tmp_path):
    src = tmp_path / "responses.jsonl"
    rows = [{"prompt": f"q{i}", "responses": {"z": f"z{i}", "y": f"y{i}", "x": f"x{i}"}} for i in range(2)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pairs.jsonl"
    run_script("arena.py", "--build-pairs", str(src), "--pairs", str(out))
    pairs = A.read_pairs(str(out))
    assert len(pairs) == 6 and len({p["id"] for p in pairs}) == 6
    assert sorted((p["prompt"], p["model_a"], p["model_b"]) for p in pairs) == [
        (f"q{i}", a, b) for i in range(2) for a, b in (("x", "y"), ("x", "z"), ("y", "z"))]
    assert all(p["a"] == p["model_a"] + p["prompt"][1:] for p in pairs)


def test_a_function_rater_labels_preference_rows_and_a_judge_is_measured_against_it(tmp_path, enc):
    """--build-pairs on preference rows, --vote-by a length function (the longer response wins): every pair gets
    exactly the vote the function gives by hand, a rerun adds none, and --report sets a reward model against it
    with the agreement counted by hand (a function rater stands where a person would)."""
    src = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": "x" * (i % 3 + 1), "rejected": "yy"} for i in range(6)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, votes = tmp_path / "pairs.jsonl", tmp_path / "votes.jsonl"
    run_script("arena.py", "--build-pairs", str(src), "--pairs", str(pairs))
    got = A.read_pairs(str(pairs))
    assert sorted((p["prompt"], p["model_a"], p["a"], p["b"]) for p in got) == [
        (r["prompt"], "chosen", r["chosen"], r["rejected"]) for r in rows]
    (tmp_path / "score.py").write_text("def longer(prompt, response):\n    return len(response)\n")
    fn = f"{tmp_path}/score.py:longer"
    proc = run_script("arena.py", "--pairs", str(pairs), "--votes", str(votes), "--vote-by", fn)
    assert "6 votes by longer" in proc.stderr and "2 a, 2 b, 2 ties" in proc.stderr
    want = {p["id"]: "a" if len(p["a"]) > len(p["b"]) else "b" if len(p["a"]) < len(p["b"]) else "tie" for p in got}
    state = A.read_votes(str(votes), got)
    assert {pid: v["choice"] for (r, pid), v in state["active"].items() if r == "longer"} == want
    run_script("arena.py", "--pairs", str(pairs), "--votes", str(votes), "--vote-by", fn, "--rater", "len")
    run_script("arena.py", "--pairs", str(pairs), "--votes", str(votes), "--vote-by", fn, "--rater", "len")
    assert len(lines(votes)) == 12  # a second rater name votes again; its rerun adds nothing
    rm = save_tiny(tmp_path / "rm.pt", enc, score_std=0.5, head="scalar")
    out = run_script("arena.py", "--pairs", str(pairs), "--votes", str(votes), "--vote-by", fn, "--report",
                     "--n-boot", "50", "--reward-model", rm, "--device", "cpu").stdout
    model, _, _ = C.load_model(rm, torch.device("cpu"))
    s = {p["id"]: C.score_responses(model.eval(), enc, [p["messages"]] * 2, [p["a"], p["b"]]) for p in got}
    mine = {pid: "a" if x > y else "b" if x < y else "tie" for pid, (x, y) in s.items()}
    human = [want[p["id"]] for p in got for _ in ("longer", "len")]
    wo, n_wo, w, n_w = A.labeller_agreement(human, [mine[p["id"]] for p in got for _ in ("longer", "len")])
    assert machine_row(out, "reward model rm.pt")[:4] == (pytest.approx(wo, abs=5e-4), n_wo,
                                                          pytest.approx(w, abs=5e-4), n_w)
    assert machine_row(out, "humans with each other")[1:4] == (4, 1.0, 6)  # two copies of one function agree
    bad = run_script("arena.py", "--pairs", str(pairs), "--votes", str(votes), "--vote-by", fn, "--rater", "<x>",
                     check=False)
    assert_one_line_error(bad, "", "a rater name is")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "a": "x", "b": "y", "model_a": "m"}, "'model_b'"),
    ({"prompt": "q", "a": "x", "b": "y", "model_a": "m", "model_b": "m"}, "two models"),
    ({"prompt": 3, "a": "x", "b": "y", "model_a": "m", "model_b": "n"}, "'prompt'"),
])
def test_bad_pairs_exit_2_with_file_and_line(tmp_path, row, message):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "q", "a": "x", "b": "y", "model_a": "m", "model_b": "n"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    proc = run_script("arena.py", "--serve", "--pairs", str(path), "--votes", str(tmp_path / "v.jsonl"), check=False)
    assert_one_line_error(proc, f"{path}:2:", message)


def test_votes_for_unknown_pairs_exit_2(files):
    pairs, votes, _ = files
    votes.write_text(json.dumps({"type": "vote", "rater": "ann", "pair": "gone", "choice": "a"}) + "\n")
    proc = run_script("arena.py", "--pairs", str(pairs), "--votes", str(votes), "--report", check=False)
    assert_one_line_error(proc, f"{votes}:1:", "not in the pairs file")


def test_reward_model_trains_on_human_votes(tmp_path, enc):
    """votes -> prefs.jsonl -> reward.py: two optimiser steps on the human labels."""
    pairs, votes = tmp_path / "pairs.jsonl", tmp_path / "votes.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "a": f"The answer is {i + 1}.", "b": "No.",
                                         "model_a": "good", "model_b": "bad"}) + "\n" for i in range(8)))
    vote_all(pairs, votes, {"ann": ["left"] * 8})
    prefs = tmp_path / "prefs.jsonl"
    run_script("arena.py", "--pairs", str(pairs), "--votes", str(votes), "--out-prefs", str(prefs))
    ckpt = save_tiny(tmp_path / "init.pt", enc)
    log = tmp_path / "log.jsonl"
    run_script("reward.py", "--model", ckpt, "--data", str(prefs), "--out", str(tmp_path / "rm.pt"), "--steps", "2",
               "--batch-size", "4", "--seq-len", "128", "--eval-frac", "0", "--warmup", "0", "--log", str(log),
               env={"OMP_NUM_THREADS": "1"})
    records = lines(log)
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)


def test_help_lists_every_field():
    proc = run_script("arena.py", "--help")
    for f in A.Config.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in proc.stdout
    assert "Chatbot Arena" in proc.stdout


# ----------------------------------------------------------------------------- the page in a browser


@pytest.mark.slow
def test_the_page_in_headless_chromium(tmp_path, enc):
    """make arena-browser: Debian's chromium driven by playwright votes with the keyboard, undoes, rates a criterion
    and leaves a screenshot in out/arena/screenshot.png; the server (the real command) is killed with SIGKILL after
    two votes, a new one resumes the page at the third pair, and the votes then train reward.py."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium on PATH (make arena-browser installs it)")
    pairs, votes, criteria = tmp_path / "pairs.jsonl", tmp_path / "votes.jsonl", tmp_path / "criteria.txt"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pair_rows()))
    criteria.write_text("helpful\ncorrect\n")

    def serve():
        proc = subprocess.Popen([sys.executable, "arena.py", "--serve", "--pairs", str(pairs), "--votes", str(votes),
                                 "--criteria", str(criteria), "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True)
        return proc, re.search(r"http://[^/]+", proc.stdout.readline()).group(0)

    def kill(proc):
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()

    dialogs = []
    proc, url = serve()
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(url + "/?rater=ann")
            page.wait_for_selector("#progress:has-text('0 of 4')")
            page.keyboard.press("1")  # p1: left is better
            page.wait_for_selector("#progress:has-text('1 of 4')")
            assert XSS in page.inner_text("main")  # p2's script tag shows as text and never runs
            page.select_option("#rate-left select[data-criterion='helpful']", "6")
            os.makedirs(os.path.join(ROOT, "out", "arena"), exist_ok=True)
            page.screenshot(path=os.path.join(ROOT, "out", "arena", "screenshot.png"), full_page=True)
            page.evaluate("document.activeElement.blur()")  # focus off the select: keys vote again
            page.keyboard.press("ArrowRight")  # p2: right is better
            page.wait_for_selector("#progress:has-text('2 of 4')")
            page.keyboard.press("u")  # undo p2
            page.wait_for_selector("#progress:has-text('1 of 4')")
            page.keyboard.press("2")  # p2 again: tie
            page.wait_for_selector("#progress:has-text('2 of 4')")
            kill(proc)  # mid-session: every vote given must already be on disk
            assert [(r["type"], r["pair"]) for r in lines(votes)] == [("vote", "p1"), ("vote", "p2"),
                                                                       ("undo", "p2"), ("vote", "p2")]
            proc, url = serve()
            page.goto(url + "/?rater=ann")  # the new server puts ann where she was
            page.wait_for_selector("#progress:has-text('2 of 4')")
            page.keyboard.press("ArrowUp")  # p3: both bad
            page.wait_for_selector("#progress:has-text('3 of 4')")
            page.click("button[data-vote='right']")  # p4 by mouse
            page.wait_for_selector("#done", state="visible")
            browser.close()
    finally:
        kill(proc)
    assert dialogs == []  # alert(1) never ran
    rec = lines(votes)
    assert [(r["type"], r["pair"]) for r in rec] == [("vote", "p1"), ("vote", "p2"), ("undo", "p2"), ("vote", "p2"),
                                                     ("vote", "p3"), ("vote", "p4")]
    assert [r.get("button") for r in rec] == ["left", "right", None, "tie", "both_bad", "right"]
    assert rec[1]["ratings"] == {"helpful": {rec[1]["left"]: 6}}
    # the page's votes as preference pairs train reward.py (p1 and p4 decisive; p2's tie and p3's both-bad left out)
    prefs, log = tmp_path / "prefs.jsonl", tmp_path / "log.jsonl"
    run_script("arena.py", "--pairs", str(pairs), "--votes", str(votes), "--out-prefs", str(prefs))
    assert [r["pair"] for r in C.read_jsonl(str(prefs), "pref")] == ["p1", "p4"]
    run_script("reward.py", "--model", save_tiny(tmp_path / "init.pt", enc), "--data", str(prefs), "--out",
               str(tmp_path / "rm.pt"), "--steps", "2", "--batch-size", "2", "--seq-len", "128", "--eval-frac", "0",
               "--warmup", "0", "--log", str(log), env={"OMP_NUM_THREADS": "1"})
    assert [r["step"] for r in lines(log)] == [1, 2] and all(math.isfinite(r["loss"]) for r in lines(log))
