"""ppo.py: GAE, the KL estimators (exact expectations on an enumerable toy), the policy-gradient estimate vs the
exact gradient, group advantages, clipping, loss aggregation, the sampler/trainer log-prob contract, smoke runs of
every --advantage, resume, bad input; and a slow benchmark (rollout tokens/s and share of a step, training steps/s).

    python -m pytest tests/test_ppo.py -q                   (fast tests)
    python -m pytest tests/test_ppo.py -q -s -m slow -k bench   (writes out/bench/ppo.json)
"""
import itertools
import json
import math
import os
import statistics

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import common as C
import model as M
import ppo
from conftest import ROOT, run_script

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
V = 3  # the enumerable toy: sequences of two tokens over a vocabulary of three


# ----------------------------------------------------------------------------- GAE


def gae_reference(rewards, values, length, gamma, lam):
    """One row, plain Python: delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after the last token), A_t = delta_t +
    gamma lam A_{t+1}."""
    adv, nxt_adv = [0.0] * len(rewards), 0.0
    for t in reversed(range(length)):
        nxt_v = values[t + 1] if t + 1 < length else 0.0
        nxt_adv = rewards[t] + gamma * nxt_v - values[t] + gamma * lam * nxt_adv
        adv[t] = nxt_adv
    ret = [adv[t] + values[t] if t < length else 0.0 for t in range(len(rewards))]
    return adv, ret


@FAST
@given(st.data(), st.integers(1, 4), st.integers(1, 9), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_gae_matches_reverse_loop(data, B, T, gamma, lam):
    floats = st.lists(st.floats(-5, 5), min_size=T, max_size=T)
    rewards = [data.draw(floats) for _ in range(B)]
    values = [data.draw(floats) for _ in range(B)]
    lengths = [data.draw(st.integers(0, T)) for _ in range(B)]  # different response lengths, right padded
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=torch.float64)
    adv, ret = ppo.gae(torch.tensor(rewards, dtype=torch.float64), torch.tensor(values, dtype=torch.float64), mask,
                       gamma, lam)
    for b in range(B):
        want_adv, want_ret = gae_reference(rewards[b], values[b], lengths[b], gamma, lam)
        assert adv[b].tolist() == pytest.approx(want_adv, abs=1e-9)
        assert ret[b].tolist() == pytest.approx(want_ret, abs=1e-9)


def test_gae_special_cases():
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5], dtype=torch.float64)
    # lam = 1 and V = 0: discounted returns-to-go (what reinforce_pp uses)
    adv, ret = ppo.gae(r, torch.zeros_like(r), mask, 0.9, 1.0)
    for b in range(3):
        n = int(mask[b].sum())
        want = [sum(0.9 ** (s - t) * r[b, s].item() for s in range(t, n)) for t in range(n)]
        assert adv[b, :n].tolist() == pytest.approx(want) and ret[b, :n].tolist() == pytest.approx(want)
    # lam = 0: the one-step TD error
    adv, _ = ppo.gae(r, v, mask, 1.0, 0.0)
    nxt = torch.cat([v[:, 1:] * mask[:, 1:], torch.zeros(3, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(adv, (r + nxt - v) * mask)


# ----------------------------------------------------------------------------- KL estimators


@FAST
@given(st.lists(st.tuples(st.floats(-8, 0), st.floats(-8, 0)), min_size=1, max_size=10))
def test_kl_estimate_definitions(pairs):
    logp, ref = (torch.tensor(c, dtype=torch.float64) for c in zip(*pairs))
    for (lp, lr), k1, k2, k3 in zip(pairs, ppo.kl_estimate(logp, ref, "k1"), ppo.kl_estimate(logp, ref, "k2"),
                                     ppo.kl_estimate(logp, ref, "k3")):
        log_r = lr - lp
        assert k1.item() == pytest.approx(-log_r, abs=1e-12)
        assert k2.item() == pytest.approx(log_r ** 2 / 2, abs=1e-12)
        assert k3.item() == pytest.approx(math.exp(log_r) - 1 - log_r, rel=1e-9, abs=1e-12)
        assert k2.item() >= 0 and k3.item() >= 0
    for kind in ("k1", "k2", "k3"):
        assert ppo.kl_estimate(logp, logp, kind).abs().max() == 0  # identical policies: zero, every estimator


def two_step_model(seed):
    """Random logits of a two-token sequence model: first token (V,), second token given the first (V, V)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g, dtype=torch.float64), torch.randn(V, V, generator=g, dtype=torch.float64)


def token_logps(model, seqs):
    """seqs (N, 2) -> per-token log-probs (N, 2) under a two_step_model."""
    first, second = model
    lp1 = torch.log_softmax(first, -1)[seqs[:, 0]]
    lp2 = torch.log_softmax(second, -1)[seqs[:, 0], seqs[:, 1]]
    return torch.stack([lp1, lp2], 1)


ALL = torch.tensor(list(itertools.product(range(V), repeat=2)))  # (V^2, 2): every sequence


def sample_seqs(model, n, seed):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.multinomial(torch.softmax(model[0], -1), n, replacement=True, generator=g)
    x2 = torch.multinomial(torch.softmax(model[1], -1)[x1], 1, generator=g).squeeze(1)
    return torch.stack([x1, x2], 1)


def within(samples, exact, n_se=4.0):
    mean, se = samples.mean().item(), samples.std().item() / math.sqrt(len(samples))
    return abs(mean - exact) < n_se * se + 1e-9, (mean, exact, se)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_estimators_expectations_on_enumerable_toy(seed):
    pi, ref = two_step_model(seed), two_step_model(100 + seed)
    lp, lr = token_logps(pi, ALL), token_logps(ref, ALL)
    q = lp.sum(1).exp()  # probability of each of the V^2 sequences under pi
    exact_kl = (q * (lp.sum(1) - lr.sum(1))).sum().item()  # KL(pi || ref) over whole sequences
    expect = {k: (q * ppo.kl_estimate(lp, lr, k).sum(1)).sum().item() for k in ("k1", "k2", "k3")}
    # exact expectations: k1 and k3 (summed over tokens) are unbiased for the sequence KL; k2 is not
    assert expect["k1"] == pytest.approx(exact_kl, abs=1e-12)
    assert expect["k3"] == pytest.approx(exact_kl, abs=1e-12)
    k2_exact = sum(q[i].item() * sum(0.5 * (lp[i, t] - lr[i, t]).item() ** 2 for t in range(2)) for i in range(V * V))
    assert expect["k2"] == pytest.approx(k2_exact, abs=1e-12) and abs(expect["k2"] - exact_kl) > 1e-3
    # Monte Carlo with a fixed seed: sample means within 4 standard errors of those expectations
    seqs = sample_seqs(pi, 20000, seed)
    slp, slr = token_logps(pi, seqs), token_logps(ref, seqs)
    for kind in ("k1", "k2", "k3"):
        ok, info = within(ppo.kl_estimate(slp, slr, kind).sum(1), expect[kind])
        assert ok, (kind, info)


def test_kl_estimators_as_losses_have_the_known_gradients():
    """On a categorical, E_{x~pi}[grad k(x)] with the sample x held fixed:
    k1 -> 0, k2 -> grad KL(pi || ref), k3 -> grad KL(ref || pi)."""
    theta = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ref_logp = torch.log_softmax(torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), -1)

    def grad(f):
        return torch.autograd.grad(f(), theta)[0]

    def expected_grad(kind):
        logp = torch.log_softmax(theta, -1)
        return grad(lambda: (logp.exp().detach() * ppo.kl_estimate(torch.log_softmax(theta, -1), ref_logp, kind)).sum())

    def reverse_kl():
        logp = torch.log_softmax(theta, -1)
        return (logp.exp() * (logp - ref_logp)).sum()

    def forward_kl():
        return (ref_logp.exp() * (ref_logp - torch.log_softmax(theta, -1))).sum()

    torch.testing.assert_close(expected_grad("k1"), torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(expected_grad("k2"), grad(reverse_kl))
    torch.testing.assert_close(expected_grad("k3"), grad(forward_kl))

    # k3_ratio: k3 times the importance ratio pi / pi_old, which carries gradient; on-policy (pi_old = pi) its value
    # is k3's, and its expected gradient is KL(pi || ref)'s (k2's), the stated formula (log pi - log ref) grad log pi
    def k3_ratio(theta_now):
        logp = torch.log_softmax(theta_now, -1)
        return ppo.kl_estimate(logp, ref_logp, "k3_ratio", log_rho=logp - logp.detach())

    logp = torch.log_softmax(theta, -1)
    torch.testing.assert_close(k3_ratio(theta), ppo.kl_estimate(logp, ref_logp, "k3"), atol=0, rtol=0)
    expected = grad(lambda: (logp.exp().detach() * k3_ratio(theta)).sum())
    torch.testing.assert_close(expected, grad(reverse_kl))
    per_sample = torch.stack([torch.autograd.grad(k3_ratio(theta)[x], theta)[0] for x in range(5)])
    score = torch.stack([torch.autograd.grad(torch.log_softmax(theta, -1)[x], theta)[0] for x in range(5)])
    torch.testing.assert_close(per_sample, (logp - ref_logp).detach()[:, None] * score)  # every sample, not only
    with pytest.raises(ValueError, match="log_rho"):
        ppo.kl_estimate(logp, ref_logp, "k3_ratio")


@FAST
@given(st.data(), st.integers(1, 4), st.integers(1, 7))
def test_sequence_and_gspo_ratios_equal_their_formulas(data, B, T):
    """log_ratio by level, against direct per-row formulas: token d_t; sequence sum_t d_t; gspo sum_t d_t / |y|;
    one value per response broadcast to its tokens; all three the same for one-token responses."""
    floats = st.floats(-3, 0, allow_nan=False)
    lengths = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    logp = torch.tensor(data.draw(st.lists(st.lists(floats, min_size=T, max_size=T), min_size=B, max_size=B)),
                        dtype=torch.float64)
    old = torch.tensor(data.draw(st.lists(st.lists(floats, min_size=T, max_size=T), min_size=B, max_size=B)),
                       dtype=torch.float64)
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=torch.float64)
    token, seq, gspo = (ppo.log_ratio(logp, old, mask, level) for level in ("token", "sequence", "gspo"))
    assert torch.equal(token, logp - old)
    for i, n in enumerate(lengths):
        d = [logp[i, t].item() - old[i, t].item() for t in range(n)]
        assert seq[i].tolist() == pytest.approx([sum(d)] * T, abs=1e-12)
        assert gspo[i].tolist() == pytest.approx([sum(d) / n] * T, abs=1e-12)
    ones = torch.ones(B, 1, dtype=torch.float64)
    first = [ppo.log_ratio(logp[:, :1], old[:, :1], ones, level) for level in ("token", "sequence", "gspo")]
    assert torch.equal(first[0], first[1]) and torch.allclose(first[0], first[2], atol=0, rtol=0)


def test_sequence_ratio_clips_whole_sequences():
    """With a sequence ratio, a response whose ratio leaves [1 - eps, 1 + eps] on the side its advantage pushes is
    clipped at every token, and none of its tokens gets gradient; the other response keeps all of its gradient,
    though its own tokens' ratios would be clipped one by one."""
    eps = 0.2
    old = torch.zeros(2, 3, dtype=torch.float64)
    # row 0: token ratios 1.5, 1.0, 1.0 (sequence ratio 1.5 > 1.2, clipped with A > 0)
    # row 1: token ratios 1.5, 0.7, 1.0 (sequence ratio 1.05, inside, though tokens 0 and 1 are outside)
    logp = torch.log(torch.tensor([[1.5, 1.0, 1.0], [1.5, 0.7, 1.0]], dtype=torch.float64)).requires_grad_()
    adv, mask = torch.ones(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
    pg, _, clipped = ppo.ppo_losses(logp, old, adv, eps, mask=mask, level="sequence")
    (g,) = torch.autograd.grad(pg.sum(), logp)
    assert clipped.tolist() == [[True] * 3, [False] * 3]
    assert (g[0] == 0).all() and (g[1] != 0).all()
    assert pg.detach()[0].tolist() == pytest.approx([-1.2] * 3)
    assert pg.detach()[1].tolist() == pytest.approx([-1.05] * 3)
    _, _, token_clipped = ppo.ppo_losses(logp, old, adv, eps, mask=mask, level="token")
    assert token_clipped.tolist() == [[True, False, False], [True, False, False]]


# ----------------------------------------------------------------------------- the policy-gradient estimate


def exact_and_sampled_pg(seed, advantage_of):
    """The exact gradient of J = E_pi[R] over the two-step toy's logits, and per-sample gradient estimates
    from ppo_losses at ratio 1 (advantages from advantage_of(R of the samples))."""
    first, second = (p.clone().requires_grad_() for p in two_step_model(seed))
    R_all = torch.randn(V, V, dtype=torch.float64, generator=torch.Generator().manual_seed(50 + seed))
    params = [first, second]
    q = token_logps((first, second), ALL).sum(1).exp()
    exact = torch.autograd.grad((q * R_all[ALL[:, 0], ALL[:, 1]]).sum(), params)
    exact = torch.cat([g.reshape(-1) for g in exact])
    # each sequence's gradient of -(pg loss) at ratio 1 per unit advantage = grad log pi(seq); enumerate them once
    lp = token_logps((first, second), ALL)
    unit = []
    for i in range(len(ALL)):
        pg, _, _ = ppo.ppo_losses(lp[i:i + 1], lp[i:i + 1].detach(), torch.ones(1, 2, dtype=torch.float64), 0.2)
        unit.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(-pg.sum(), params, retain_graph=True)]))
    unit = torch.stack(unit)  # (V^2, D)
    seqs = sample_seqs((first.detach(), second.detach()), 24000, seed)
    index = seqs[:, 0] * V + seqs[:, 1]
    adv = advantage_of(R_all[seqs[:, 0], seqs[:, 1]])
    return exact, adv[:, None] * unit[index], q, R_all, unit  # per-sample estimates (N, D)


@pytest.mark.parametrize("seed", [0, 1])
def test_policy_gradient_matches_exact_gradient(seed):
    exact, per_sample, q, R_all, unit = exact_and_sampled_pg(seed, lambda R: R)
    # in exact expectation (weights pi(seq)) the estimator is the gradient, to rounding
    torch.testing.assert_close((q[:, None] * R_all.reshape(-1)[:, None] * unit).sum(0), exact)
    for d in range(per_sample.shape[1]):
        ok, info = within(per_sample[:, d], exact[d].item())
        assert ok, (d, info)


def test_rloo_baseline_keeps_the_gradient_unbiased():
    k = 4
    exact, per_sample, *_ = exact_and_sampled_pg(3, lambda R: ppo.group_advantages(R, k, "rloo"))
    per_group = per_sample.view(-1, k, per_sample.shape[1]).mean(1)  # one estimate per group of k samples
    for d in range(per_group.shape[1]):
        ok, info = within(per_group[:, d], exact[d].item())
        assert ok, (d, info)


# ----------------------------------------------------------------------------- group advantages


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    s2, s6 = math.sqrt(0.5), math.sqrt(4.5)  # Bessel-corrected stds of [1, 2] and [3, 6]
    eps = 1e-4
    assert ppo.group_advantages(r, 2, "grpo").tolist() == pytest.approx(
        [-0.5 / (s2 + eps), 0.5 / (s2 + eps), -1.5 / (s6 + eps), 1.5 / (s6 + eps)])
    assert ppo.group_advantages(r, 4, "dr_grpo").tolist() == pytest.approx([-2.0, -1.0, 0.0, 3.0])
    assert ppo.group_advantages(r, 4, "rloo").tolist() == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2])
    assert ppo.group_advantages(r, 2, "rloo").tolist() == pytest.approx([-1.0, 1.0, -3.0, 3.0])
    assert ppo.group_advantages(r, 2, "reinforce_pp").tolist() == pytest.approx([-0.5, 0.5, -1.5, 1.5])
    assert ppo.group_advantages(r, 1, "reinforce_pp").tolist() == r.tolist()
    assert ppo.group_advantages(torch.full((4,), 0.7), 4, "grpo").abs().max() == 0  # all equal: no signal


@FAST
@given(st.integers(1, 4), st.integers(2, 5), st.data())
def test_group_advantages_properties(n_groups, k, data):
    r = torch.tensor(data.draw(st.lists(st.floats(-10, 10), min_size=n_groups * k, max_size=n_groups * k)),
                     dtype=torch.float64)
    for kind in ("grpo", "dr_grpo", "rloo", "reinforce_pp"):
        a = ppo.group_advantages(r, k, kind)
        assert a.shape == r.shape
        assert a.view(n_groups, k).sum(1).abs().max() < 1e-8 * (1 + r.abs().max())  # zero-sum within a group
    centred = r.view(n_groups, k) - r.view(n_groups, k).mean(1, keepdim=True)
    torch.testing.assert_close(ppo.group_advantages(r, k, "rloo"), (k / (k - 1) * centred).reshape(-1))
    # shifting a group's rewards by a constant changes nothing
    torch.testing.assert_close(ppo.group_advantages(r + 3.0, k, "grpo"), ppo.group_advantages(r, k, "grpo"))


# ----------------------------------------------------------------------------- the PPO losses


def test_ppo_clipping_stops_the_gradient_only_on_the_clipped_side():
    eps = 0.2
    old = torch.zeros(1, 4, dtype=torch.float64)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=torch.float64)
    pg, _, clipped = ppo.ppo_losses(logp, old, adv, eps)
    (g,) = torch.autograd.grad(pg.sum(), logp)
    # rho > 1 + eps with A > 0 and rho < 1 - eps with A < 0: clipped, no gradient; the other two still pull
    assert clipped.tolist() == [[True, False, True, False]]
    assert g[0, 0] == 0 and g[0, 2] == 0 and g[0, 1] != 0 and g[0, 3] != 0
    assert pg.detach()[0].tolist() == pytest.approx([-1.2, 1.5, 0.8, -0.5])
    assert ppo.aggregate(clipped.double(), torch.ones(1, 4), "dapo").item() == 0.5  # clipfrac
    # inside the range nothing is clipped and the gradient is -A * rho
    logp = torch.log(torch.tensor([[1.1, 0.9]], dtype=torch.float64)).requires_grad_()
    pg, _, clipped = ppo.ppo_losses(logp, torch.zeros(1, 2, dtype=torch.float64), torch.tensor([[2.0, -3.0]]), eps)
    (g,) = torch.autograd.grad(pg.sum(), logp)
    assert not clipped.any() and g[0].tolist() == pytest.approx([-2.0 * 1.1, 3.0 * 0.9])


@FAST
@given(st.lists(st.tuples(st.floats(-3, 3), st.floats(-3, 3), st.floats(-3, 3)), min_size=1, max_size=8),
       st.floats(0.01, 1.0))
def test_value_loss_matches_definition(rows, eps):
    v, old, ret = (torch.tensor([c], dtype=torch.float64) for c in zip(*rows))
    z = torch.zeros_like(v)
    _, vf, _ = ppo.ppo_losses(z, z, z, 0.2, v, old, ret, eps)
    for i, (vi, oi, ri) in enumerate(rows):
        clipped = oi + min(max(vi - oi, -eps), eps)
        assert vf[0, i].item() == pytest.approx(0.5 * max((vi - ri) ** 2, (clipped - ri) ** 2), abs=1e-12)


def test_aggregate_hand_computed_and_micro_batches_sum_to_the_batch():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert ppo.aggregate(x, mask, "grpo").item() == pytest.approx((2.0 + 4.0) / 2)
    assert ppo.aggregate(x, mask, "bnpo").item() == pytest.approx(10.0 / 4)
    assert ppo.aggregate(x, mask, "dapo").item() == pytest.approx(10.0 / 4)
    assert ppo.aggregate(x, mask, "dr_grpo", max_len=4).item() == pytest.approx(10.0 / 8)
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(6, 5, generator=g, dtype=torch.float64), (torch.rand(6, 5, generator=g) > 0.3).long()
    for kind in ("grpo", "dapo", "dr_grpo"):
        whole = ppo.aggregate(x, mask, kind, max_len=5)
        parts = sum(ppo.aggregate(x[b], mask[b], kind, 5, n_seqs=6, n_tokens=mask.sum())
                    for b in ([0, 1], [2, 3, 4], [5]))
        assert parts.item() == pytest.approx(whole.item(), abs=1e-12)


def test_whiten_and_kl_controller():
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(4, 7, generator=g, dtype=torch.float64) * 3 + 2, (torch.rand(4, 7, generator=g) > 0.4)
    w = ppo.whiten(x, mask)
    assert w[mask].mean().item() == pytest.approx(0, abs=1e-9)
    assert w[mask].std(unbiased=False).item() == pytest.approx(1, abs=1e-6)
    assert (w[~mask] == 0).all()
    assert ppo.update_kl_coef(0.1, 6.0, 6.0, 64, 10000) == 0.1
    assert ppo.update_kl_coef(0.1, 600.0, 6.0, 64, 10000) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    assert ppo.update_kl_coef(0.1, 0.0, 6.0, 64, 10000) == pytest.approx(0.1 * (1 - 0.2 * 64 / 10000))
    assert ppo.explained_variance(x, x, torch.ones_like(x)) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- sampler / trainer contract


def test_sampler_logprobs_equal_trainer_forward(tiny_model, enc):
    chats = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Hi"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse 'cat'."}]]
    prompts = [C.render_chat(enc, c, add_generation_prompt=True)[0] for c in chats]  # different lengths
    cfg = ppo.Config(max_new_tokens=10, dtype="fp32")
    for temperature in (1.0, 0.7):
        gen = torch.Generator().manual_seed(0)
        r = ppo.sample(tiny_model, prompts, cfg, enc, torch.device("cpu"), temperature, gen)
        with torch.no_grad():
            logp, entropy = ppo.response_logprobs(tiny_model, r["seq"], r["attn"], r["P"], temperature, True,
                                                  r["banned"])
        assert ((logp - r["logp"]).abs() * r["mask"]).max() < 1e-4 and (entropy >= 0).all()
    # rows that stop early (right padding after the stop token): a frequent stop set makes lengths differ
    pad = C.special_id(enc, "<|pad|>")
    tokens, slogp, mask = M.generate(tiny_model, prompts, 10, 1.0, stop_ids=range(0, 120), pad_id=pad,
                                     generator=torch.Generator().manual_seed(1))
    p_ids, p_mask = M.pad_left(prompts, pad)
    seq, attn = torch.cat([p_ids, tokens], 1), torch.cat([p_mask, mask], 1)
    with torch.no_grad():
        logp, _ = ppo.response_logprobs(tiny_model, seq, attn, p_ids.shape[1], 1.0,
                                        banned=M.ban_mask(tiny_model.cfg.vocab_size, [pad]))  # generate bans pad_id
    assert ((logp - slogp).abs() * mask).max() < 1e-4


def test_pad_is_never_sampled_and_the_trainer_scores_the_same_distribution(tiny_model, enc):
    """A model whose logits put (almost) all mass on <|pad|> and <|im_start|>: the sampler never emits them (nor
    any id of common.never_sampled), greedy or at temperature 1, and the trainer's log-probs of what was sampled,
    with the same ban, still equal the sampler's."""
    pad, start = C.special_id(enc, "<|pad|>"), C.special_id(enc, "<|im_start|>")
    forward = tiny_model.forward

    def loves_pad(*args, **kwargs):
        logits = forward(*args, **kwargs).clone()
        logits[..., pad] += 30.0
        logits[..., start] += 25.0
        return logits

    tiny_model.forward = loves_pad
    prompts = [C.render_chat(enc, [{"role": "user", "content": c}], add_generation_prompt=True)[0]
               for c in ("What is 2 + 3?", "Hi")]
    cfg = ppo.Config(max_new_tokens=12, dtype="fp32")
    banned = set(C.never_sampled(enc, tiny_model.cfg.vocab_size, [C.special_id(enc, "<|im_end|>")]))
    assert {pad, start, C.special_id(enc, "<|endoftext|>")} <= banned
    for temperature in (1.0, 0.0):
        gen = torch.Generator().manual_seed(0)
        r = ppo.sample(tiny_model, prompts, cfg, enc, torch.device("cpu"), temperature, gen)
        sampled = {t for row, m in zip(r["tokens"].tolist(), r["mask"].tolist()) for t, k in zip(row, m) if k}
        assert sampled and not sampled & banned, sampled & banned
        if temperature > 0:
            with torch.no_grad():
                logp, _ = ppo.response_logprobs(tiny_model, r["seq"], r["attn"], r["P"], temperature,
                                                banned=r["banned"])
            assert ((logp - r["logp"]).abs() * r["mask"]).max() < 1e-4
    tokens, _, mask = M.generate(tiny_model, prompts, 12, 1.0, pad_id=pad, generator=torch.Generator().manual_seed(0))
    assert not ((tokens == pad) & mask.bool()).any()  # pad_id is banned even when the caller bans nothing else


# ----------------------------------------------------------------------------- the script


@pytest.fixture
def tiny_ckpts(tmp_path, enc):
    """A tiny random policy and a tiny random reward model (head scalar), saved as checkpoints."""
    torch.manual_seed(0)
    shape = dict(n_layer=1, d_model=32, d_ff=64, n_head=2, n_kv_head=1, max_seq_len=192)
    policy, rm = M.build_model("tiny", enc, **shape), M.build_model("tiny", enc, head="scalar", **shape)
    torch.nn.init.normal_(rm.score.weight, std=0.1)
    paths = str(tmp_path / "policy.pt"), str(tmp_path / "rm.pt")
    C.save_checkpoint(paths[0], policy, enc)
    C.save_checkpoint(paths[1], rm, enc)
    return paths


def smoke_args(toy_dir, policy, out, log, *extra):
    return ["ppo.py", "--model", policy, "--data", os.path.join(toy_dir, "prompts.jsonl"), "--out", out, "--log", log,
            "--eval-data", os.path.join(toy_dir, "eval.jsonl"), "--eval-limit", "4", "--steps", "2",
            "--batch-size", "2", "--max-new-tokens", "8", "--device", "cpu", "--debug-logprobs-every", "1", *extra]


@pytest.mark.parametrize("advantage,extra", [
    ("ppo", ["--reward", "data/toyworld.py:gold_reward"]),
    ("ppo", ["--reward-model", "RM", "--kl-target", "1.0", "--whiten-rewards"]),
    ("grpo", ["--reward", "data/toyworld.py:gold_reward", "--group-size", "2"]),
    ("dr_grpo", ["--reward", "data/toyworld.py:gold_reward", "--group-size", "2"]),
    ("rloo", ["--reward-model", "RM", "--group-size", "2", "--lora-rank", "2"]),
    ("reinforce_pp", ["--reward", "data/toyworld.py:gold_reward", "--group-size", "2", "--grad-accum", "2"]),
    ("grpo", ["--reward", "data/toyworld.py:gold_reward", "--group-size", "2", "--ratio", "gspo",
              "--kl-estimator", "k3_ratio", "--ppo-epochs", "2"]),
    ("rloo", ["--reward", "data/toyworld.py:gold_reward", "--group-size", "2", "--ratio", "sequence"]),
])
def test_script_smoke(toy_dir, tiny_ckpts, tmp_path, advantage, extra):
    out, log = str(tmp_path / "out.pt"), str(tmp_path / "log.jsonl")
    extra = [tiny_ckpts[1] if e == "RM" else e for e in extra]
    proc = run_script(*smoke_args(toy_dir, tiny_ckpts[0], out, log, "--advantage", advantage, *extra))
    assert "saved" in proc.stdout
    records = [json.loads(line) for line in open(log)]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert "eval_gold" in records[0] and "eval_proxy" in records[-1]
    for key in ("score", "kl", "entropy", "clipfrac", "approx_kl", "response_len", "rollout_tok_s"):
        assert math.isfinite(records[-1][key]), key
    if advantage == "ppo":
        assert math.isfinite(records[-1]["value_loss"]) and "explained_var" in records[-1]
    ckpt = C.load_checkpoint(out)
    assert ckpt["step"] == 2 and ckpt["lineage"][-1] == advantage and "train_state" in ckpt
    C.load_model(out)  # a plain policy checkpoint, LoRA merged


def test_resume_continues_exactly(toy_dir, tiny_ckpts, tmp_path):
    base = ["--reward-model", tiny_ckpts[1], "--steps", "3", "--eval-every", "0"]
    straight = str(tmp_path / "straight.pt")
    run_script(*smoke_args(toy_dir, tiny_ckpts[0], straight, str(tmp_path / "a.jsonl"), *base))
    parts = str(tmp_path / "parts.pt")
    run_script(*smoke_args(toy_dir, tiny_ckpts[0], parts, str(tmp_path / "b.jsonl"), *base, "--stop-at", "1"))
    run_script(*smoke_args(toy_dir, tiny_ckpts[0], parts, str(tmp_path / "b.jsonl"), *base, "--resume", parts))
    a, b = C.load_checkpoint(straight), C.load_checkpoint(parts)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-6, rtol=0)
    for k in a["train_state"]["critic"]:
        torch.testing.assert_close(a["train_state"]["critic"][k], b["train_state"]["critic"][k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("advantage", ["ppo", "grpo"])
def test_ddp_two_processes_run(toy_dir, tiny_ckpts, tmp_path, advantage):
    """torchrun --nproc_per_node=2 (gloo, CPU): micro-batches under no_sync, counts all-reduced, rank 0 saves.
    (Each rank samples its own responses, so the result is not bit-equal to one process.)"""
    out, log = str(tmp_path / "ddp.pt"), str(tmp_path / "ddp.jsonl")
    args = smoke_args(toy_dir, tiny_ckpts[0], out, log, "--advantage", advantage, "--group-size", "2",
                      "--grad-accum", "2", "--reward", "data/toyworld.py:gold_reward")
    run_script("-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", args[0], "--", *args[1:],
               env={"OMP_NUM_THREADS": "1"})
    records = [json.loads(line) for line in open(log)]
    assert [r["step"] for r in records] == [0, 1, 2] and C.load_checkpoint(out)["step"] == 2


def test_help_lists_every_field():
    out = run_script("ppo.py", "--help").stdout
    for f in ppo.Config.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in out, f


@pytest.mark.parametrize("extra,message", [
    (["--reward", "nowhere.py:gold_reward"], "no such file"),
    (["--reward", "data/toyworld.py"], "expected path/to/file.py:function"),
    (["--reward", "data/toyworld.py:no_such_fn"], "has no function"),
    (["--reward", "data/toyworld.py:gold_reward", "--reward-model", "x.pt"], "exactly one"),
    (["--reward", "data/toyworld.py:gold_reward", "--advantage", "grpo"], "--group-size"),
    (["--reward", "data/toyworld.py:gold_reward", "--advantage", "a2c"], "--advantage"),
    (["--reward", "data/toyworld.py:gold_reward", "--minibatches", "3"], "minibatches"),
    (["--reward", "data/toyworld.py:gold_reward", "--ratio", "seq"], "--ratio"),
    (["--reward", "data/toyworld.py:gold_reward", "--kl-estimator", "k3_ratio"], "--kl-penalty loss"),
])
def test_bad_flags_exit_2(toy_dir, tiny_ckpts, tmp_path, extra, message):
    proc = run_script(*smoke_args(toy_dir, tiny_ckpts[0], str(tmp_path / "o.pt"), str(tmp_path / "l.jsonl"), *extra),
                      check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- benchmark


@pytest.mark.slow
def test_bench_ppo(toy_dir, tmp_path, enc):
    """Rollout tokens/s, the rollout's share of a step, training (optimiser) steps/s and whole iterations/s of PPO
    and GRPO on the tiny config, CPU; GRPO also with --compile-decode: it compiles at the first step (left out as
    warm-up) and again at each new cache length, so medians beside the means. Measured, not asserted."""
    torch.manual_seed(0)
    policy = str(tmp_path / "tiny.pt")
    C.save_checkpoint(policy, M.build_model("tiny", enc), enc)
    result = {"config": "tiny", "device": "cpu", "batch_size": 16, "max_new_tokens": 48,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset")}
    for name, advantage, extra in (("ppo", "ppo", []), ("grpo", "grpo", ["--group-size", "4", "--batch-size", "4"]),
                                   ("grpo_compile_decode", "grpo", ["--group-size", "4", "--batch-size", "4",
                                                                    "--compile-decode"])):
        log = str(tmp_path / f"{name}.jsonl")
        run_script("ppo.py", "--model", policy, "--data", os.path.join(toy_dir, "prompts.jsonl"), "--reward",
                   "data/toyworld.py:gold_reward", "--out", str(tmp_path / "o.pt"), "--log", log, "--steps", "12",
                   "--batch-size", "16", "--max-new-tokens", "48", "--eval-every", "0", "--device", "cpu",
                   "--advantage", advantage, *extra)
        recs = [json.loads(line) for line in open(log)][1:]  # the first step warms up (and compiles)
        updates = 2 * 2  # default --ppo-epochs x --minibatches
        roll, step = [r["rollout_s"] for r in recs], [r["step_s"] for r in recs]
        result[name] = {
            "rollout_tok_per_s": sum(r["rollout_tok_s"] for r in recs) / len(recs),
            "rollout_share": sum(roll) / sum(step),
            "train_steps_per_s": len(recs) * updates / sum(r["update_s"] for r in recs),
            "iterations_per_s": len(recs) / sum(step),
            # a step that compiles (a new cache length) is an outlier: the medians are the steady state
            "median_rollout_share": statistics.median(roll) / statistics.median(step),
            "median_iterations_per_s": 1 / statistics.median(step),
            "rollout_s_over_median": sum(roll) - len(roll) * statistics.median(roll),  # compiling, mostly
            "mean_response_len": sum(r["response_len"] for r in recs) / len(recs)}
    os.makedirs(os.path.join(ROOT, "out", "bench"), exist_ok=True)
    with open(os.path.join(ROOT, "out", "bench", "ppo.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
