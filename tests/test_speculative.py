"""Speculative decoding (speculative.py): the output distribution is the target's, exactly (enumerated on a tiny
vocabulary), greedy gives the target's greedy tokens, the log-probs are the target's, stops and lengths hold.

    python -m pytest -q tests/test_speculative.py
"""
import functools
import itertools
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import common as C
import model as M
import speculative as S
from conftest import run_script, save_tiny
from test_copy_alone import NOT_THERE, PASTE, pure_block

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SETTINGS = [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.5, 0, 0.8), (0.8, 4, 0.7), (0.0, 0, 1.0)]  # temperature, top_k, top_p


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and far faster than two on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(arch, vocab_size, seed, std=0.3, n_layer=1):
    """A small random model of the family, vocabulary vocab_size, weights N(0, std): clearly peaked distributions."""
    torch.manual_seed(seed)
    cfg = M.Config(arch=arch, vocab_size=vocab_size, n_layer=n_layer, n_head=2, n_kv_head=2 if arch == "gpt2" else 1,
                   d_model=16, d_ff=32, max_seq_len=64)
    model = M.Transformer(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)
    return model


def noisy_copy(model, std, seed):
    """The model with every weight moved by N(0, std): a draft that agrees with it often, not always."""
    torch.manual_seed(seed)
    draft = M.Transformer(model.cfg).eval()
    draft.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * std)
    return draft


@st.composite
def distributions(draw):
    """Hypothesis: a (k+1, V) p and a (k, V) q, float64, rows summing to 1, some entries zero (filtered)."""
    k, V = draw(st.integers(1, 4)), draw(st.integers(2, 6))

    def rows(n):
        w = torch.tensor(draw(st.lists(st.floats(0, 1), min_size=n * V, max_size=n * V)), dtype=torch.float64)
        w = w.view(n, V) * (torch.rand(n, V, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) > 0.3)
        w[:, draw(st.integers(0, V - 1))] += 0.1  # no row all zero
        return w / w.sum(-1, keepdim=True)
    return rows(k + 1), rows(k)


# -----------------------------------------------------------------------------
# The rule, pure


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_rule_emits_p_at_every_position(data):
    """For each drafted position and every token x: q(x) accept(x) + P(reject) residual(x) = p(x) (Leviathan et al.
    App. A.1), with P(reject) = 1 - sum_y q(y) accept(y); accept in [0, 1], every fallback a distribution."""
    p, q = data.draw(distributions())
    k, V = q.shape
    every = torch.arange(V)[:, None].expand(V, k)  # row x drafts x at every position
    accept, fallback = S.speculative_probs(p.expand(V, -1, -1), q.expand(V, -1, -1), every)  # (V, k), (V, k+1, V)
    assert ((accept >= 0) & (accept <= 1)).all()
    assert torch.allclose(fallback.sum(-1), torch.ones(V, k + 1, dtype=torch.float64))
    for i in range(k):
        a = accept[:, i]  # (V,) acceptance of each token at position i
        reject = 1 - (q[i] * a).sum()
        assert torch.allclose(q[i] * a + reject * fallback[0, i], p[i], atol=1e-12)
    assert torch.equal(fallback[0, k], p[k])  # the bonus token comes from p_{k+1}


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_expected_alpha_is_the_mean_keep_probability(data):
    """expected_alpha == E_{x~q} accept(x) (the rule's own keep probability, summed over every x), == 1 - TV(p, q);
    symmetric; 1 when q == p."""
    p, q = data.draw(distributions())
    k, V = q.shape
    every = torch.arange(V)[:, None].expand(V, k)
    accept, _ = S.speculative_probs(p.expand(V, -1, -1), q.expand(V, -1, -1), every)  # (V, k)
    alpha = S.expected_alpha(p[:k], q)  # (k,)
    assert torch.allclose(alpha, (q * accept.T).sum(-1), atol=1e-12)
    assert torch.allclose(alpha, 1 - 0.5 * (p[:k] - q).abs().sum(-1), atol=1e-12)
    assert torch.allclose(alpha, S.expected_alpha(q, p[:k]), atol=0)
    assert torch.allclose(S.expected_alpha(q, q), torch.ones(k, dtype=torch.float64), atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_accept_keeps_a_prefix_and_draws_from_its_fallback(data):
    """speculative_accept: n in 0..k; the emitted token possible under fallback[n]; q == p keeps all k; one-hot p and
    q (greedy) keep exactly the leading matches and emit the target's argmax after them."""
    p, q = data.draw(distributions())
    k, V = q.shape
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    draft = torch.multinomial(q, 1, generator=g).T  # (1, k)
    n, token = S.speculative_accept(p[None], q[None], draft, g)
    _, fallback = S.speculative_probs(p[None], q[None], draft)
    assert 0 <= int(n) <= k and fallback[0, int(n), token] > 0
    n, _ = S.speculative_accept(p[None], p[None, :k], torch.multinomial(p[:k], 1, generator=g).T, g)
    assert int(n) == k
    hot_p, hot_q = (torch.nn.functional.one_hot(d.argmax(-1), V).double() for d in (p, q))
    n, token = S.speculative_accept(hot_p[None], hot_q[None], q.argmax(-1)[None], g)
    matches = (q.argmax(-1) == p[:k].argmax(-1)).long().cumprod(0).sum()
    assert int(n) == int(matches) and int(token) == int(p[int(n)].argmax())


# -----------------------------------------------------------------------------
# The whole procedure, enumerated exactly on a tiny vocabulary


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_output_distribution_is_the_targets_by_enumeration(arch, temperature, top_k, top_p):
    """Vocabulary 6 (pad 0 banned: 5 tokens), 3 new tokens, k = 2 (so a second round follows a first one, bonus
    tokens included, as `generate` runs it): every outcome of every round enumerated (each draft sequence with its q
    probability, each number kept with the rule's probabilities, each residual / bonus token), the probability of
    every 3-token output summed, against the target's own sequence probabilities. Equal to 1e-12: no sampling."""
    V, N, k, prompt = 6, 3, 2, (1, 2, 3)
    target, draft = tiny(arch, V, seed=0), tiny(arch, V, seed=1)
    banned = M.ban_mask(V, [0])

    @functools.cache
    def probs(model, prefix):
        logits = model(torch.tensor([prefix]))[0, -1]
        p = S.sampling_probs(logits, temperature, top_k, top_p, banned)[0].double()
        return p / p.sum()  # float64, summing to 1: the identity is then exact to rounding

    def drafts(prefix, n):
        """Every n-token draft from prefix with its probability under q, and the q rows it was drawn from."""
        if n == 0:
            yield (), 1.0, []
            return
        q = probs(draft, prefix)
        for x in torch.nonzero(q).flatten().tolist():
            for rest, w, qs in drafts(prefix + (x,), n - 1):
                yield (x, *rest), float(q[x]) * w, [q, *qs]

    def speculative(prefix, r):
        """{r-token output: probability} of the speculative procedure from prefix, k per round as generate's."""
        out = {}
        k_now = max(1, min(k, r - 1))
        for x, w, qs in drafts(prefix, k_now):
            p = torch.stack([probs(target, prefix + x[:i]) for i in range(k_now + 1)])  # (k+1, V)
            accept, fallback = S.speculative_probs(p[None], torch.stack(qs)[None], torch.tensor([x]))
            for n in range(k_now + 1):
                w_n = w * float(accept[0, :n].prod()) * (float(1 - accept[0, n]) if n < k_now else 1.0)
                for y in torch.nonzero(fallback[0, n]).flatten().tolist():
                    kept = (x[:n] + (y,))[:r]
                    tail = {(): 1.0} if len(kept) == r else speculative(prefix + kept, r - len(kept))
                    for seq, w_t in tail.items():
                        out[kept + seq] = out.get(kept + seq, 0.0) + w_n * float(fallback[0, n, y]) * w_t
        return out

    with torch.no_grad():
        got = speculative(prompt, N)
        want = {}
        for seq in itertools.product(range(V), repeat=N):
            w = 1.0
            for i, t in enumerate(seq):
                w *= float(probs(target, prompt + seq[:i])[t])
            if w > 0:
                want[seq] = w
    assert abs(sum(got.values()) - 1) < 1e-12
    assert max(abs(got.get(s, 0.0) - want.get(s, 0.0)) for s in set(got) | set(want)) < 1e-12


# -----------------------------------------------------------------------------
# The loop: greedy tokens, log-probs, cache rollback, stops


PROMPTS = [[5, 6, 7, 8, 9], [10], [11, 12]]  # different lengths: left padding


@pytest.fixture(params=["llama", "gpt2"])
def pair(request):
    """A tiny target (2 layers, vocabulary 32) and a draft of it with noisy weights: they agree on some tokens."""
    target = tiny(request.param, 32, seed=0, std=0.3, n_layer=2)
    return target, noisy_copy(target, 0.1, seed=1)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_greedy_equals_the_targets_greedy(pair, k):
    """Temperature 0: the target's greedy tokens, mask and log-probs, token for token, with rejections and
    acceptances both happening (rows of three prompt lengths, so they reject at different places)."""
    target, draft = pair
    want = M.generate(target, PROMPTS, 16, temperature=0, pad_id=0)
    tokens, logps, mask, counts = S.generate(target, draft, PROMPTS, 16, k, temperature=0, pad_id=0)
    assert torch.equal(tokens, want[0]) and torch.equal(mask, want[2])
    assert torch.allclose(logps, want[1], atol=1e-5)
    assert 0 < counts["accepted"] < counts["drafted"] and 0 < counts["rejected"] <= len(PROMPTS) * counts["rounds"]


def test_draft_equal_to_target_keeps_every_token(pair):
    """Draft == target (sampled, top-p): every draft token is accepted, k + 1 tokens a round (a draft cache rolled
    back wrongly would give the draft other distributions and show as rejections)."""
    target, _ = pair
    g = torch.Generator().manual_seed(0)
    tokens, _, mask, counts = S.generate(target, target, PROMPTS, 17, 4, temperature=1.0, top_p=0.9, generator=g)
    assert counts["accepted"] == counts["drafted"] > 0 and counts["rejected"] == 0
    assert counts["rounds"] == 4 and tokens.shape == (3, 17)  # 5 + 5 + 5 + 2 tokens (the last round drafts 1)


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_logprobs_are_the_targets_forward(pair, temperature, top_k, top_p):
    """The returned log-probs equal the target's forward over prompt + sampled tokens, filtered as sampled (pad
    banned): every position's target distribution came from the right cache slots after the rollbacks."""
    target, draft = pair
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        tokens, logps, mask, counts = S.generate(target, draft, PROMPTS, 12, 3, temperature, top_k, top_p, pad_id=0,
                                                 generator=g)
        assert counts["accepted"] < counts["drafted"]
        banned = M.ban_mask(32, [0])
        for row, prompt in enumerate(PROMPTS):
            seq = torch.tensor([prompt + tokens[row][mask[row] == 1].tolist()])
            logits = M.filter_logits(target(seq), temperature, top_k, top_p, banned)
            want = M.token_logprobs(logits, seq)[0, len(prompt):]
            got = logps[row][mask[row] == 1]
            assert torch.allclose(got, want, atol=1e-5), (seed, row)


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_stop_ids_and_max_new_tokens(pair, n):
    """A row stops at its stop token (kept, mask 1), then pads with mask 0; no row gets more than max_new_tokens."""
    target, draft = pair
    free = M.generate(target, PROMPTS, 9, temperature=0, pad_id=0)[0]
    stop = int(free[0, 2])  # row 0's third greedy token
    tokens, logps, mask, _ = S.generate(target, draft, PROMPTS, n, 4, temperature=0, stop_ids=[stop], pad_id=0)
    want, want_logps, want_mask = M.generate(target, PROMPTS, n, temperature=0, stop_ids=[stop], pad_id=0)
    assert tokens.shape[1] <= n
    assert torch.equal(tokens, want) and torch.equal(mask, want_mask)
    at = int((free[0] == stop).long().argmax())  # where row 0 stops (at or before its third token)
    if n > at:
        assert int(tokens[0, at]) == stop and mask[0, at + 1:].sum() == 0 and (tokens[0, at + 1:] == 0).all()


def test_refuses_other_vocabularies_empty_prompts_and_k0():
    target = tiny("llama", 32, seed=0)
    for draft, prompts, k in [(tiny("llama", 33, seed=1), [[1]], 2), (target, [[1], []], 2), (target, [[1]], 0)]:
        with pytest.raises(M.UserError):
            S.generate(target, draft, prompts, 4, k)


def test_rule_block_copies_alone():
    """The acceptance rule pasted alone runs with torch only (the test_copy_alone check, for this file)."""
    proc = subprocess.run([sys.executable, "-c", PASTE, ",".join(NOT_THERE)], input=pure_block("speculative.py"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["functions"] == ["expected_alpha", "speculative_accept", "speculative_probs"] and out["unresolved"] == []


# -----------------------------------------------------------------------------
# The measurement, as a user runs it


def test_script_measures_and_refuses_another_tokenizer(tmp_path, enc):
    target = save_tiny(tmp_path / "target.pt", enc, std=0.1)  # larger weights than the init: peaked distributions
    draft = str(tmp_path / "draft.pt")  # a noisy copy: agrees with the target often, not always
    C.save_checkpoint(draft, noisy_copy(C.load_model(target)[0], 0.03, seed=1), enc)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "spec.json"
    proc = run_script("speculative.py", "--model", target, "--draft", f"{target},{draft}", "--data", str(text),
                      "--n-prompts", "2", "--prompt-len", "8", "--max-new-tokens", "6", "--k", "1,3",
                      "--temperatures", "0,1", "--threads", "1", "--out", str(out), env=ONE_THREAD)
    result = json.loads(out.read_text())
    assert len(result["runs"]) == 2 * 2 * 2 and "| draft |" in proc.stdout
    self_runs = [r for r in result["runs"] if r["draft"] == target]
    assert all(r["acceptance"] == 1.0 for r in self_runs)  # the target as its own draft keeps everything
    assert all(r["same_as_plain"] for r in result["runs"] if r["temperature"] == 0)
    # alpha computed over the text: the target against itself keeps everything; another draft at T=0 keeps a token
    # exactly where the two argmaxes agree, counted here by hand over the same windows
    assert result["alpha_exact"][target] == {"0.0": 1.0, "1.0": pytest.approx(1.0, abs=1e-6)}
    t_model, _, _ = C.load_model(target)
    d_model, _, _ = C.load_model(draft)
    ids = torch.tensor(enc.encode_ordinary(text.read_text()))
    L = min(512, t_model.cfg.max_seq_len)
    stride = max(L, len(ids) // 4)  # --alpha-windows 4 windows of L tokens spread over the text
    windows = torch.stack([ids[i:i + L] for i in range(0, len(ids) - L + 1, stride)][:4])
    banned = M.ban_mask(t_model.cfg.vocab_size, C.never_sampled(enc, t_model.cfg.vocab_size, []))
    with torch.no_grad():
        agree = (t_model.eval()(windows).masked_fill(banned, -torch.inf).argmax(-1) ==
                 d_model.eval()(windows).masked_fill(banned, -torch.inf).argmax(-1)).double().mean().item()
    assert result["alpha_exact_positions"] == windows.numel()
    assert result["alpha_exact"][draft]["0.0"] == pytest.approx(agree, abs=1e-9) and 0 < agree < 1
    other = save_tiny(tmp_path / "other.pt", C.get_tokenizer("gpt2"))  # in-process: a subprocess costs seconds
    with pytest.raises(M.UserError, match="do not share a tokenizer"):
        S.main(["--model", target, "--draft", other, "--data", str(text)])
