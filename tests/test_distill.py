"""distill.py: each divergence against its formula, the JSD's ends, T^2, masking, the hard-label term, hidden-state
matching, the on-policy sampler / trainer contract, resume, the tokenizer check and smoke runs of every data mode.

    python -m pytest tests/test_distill.py -q
"""
import base64
import json
import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import common as C
import distill
import model as M
import sft
from conftest import assert_one_line_error, run_script, save_tiny

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ("forward", "reverse", "jsd")


def direct(kind, s, t, beta=0.5, T=1.0):
    """The textbook formulas in float64, p the teacher's softmax(t / T), q the student's: sum_v a_v log(a_v / b_v)."""
    p, q = torch.softmax(t.double() / T, -1), torch.softmax(s.double() / T, -1)

    def kl(a, b):
        return (a * (a / b).log()).sum(-1)
    if kind == "forward" or (kind == "jsd" and beta == 0):
        return kl(p, q)
    if kind == "reverse" or (kind == "jsd" and beta == 1):
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def logits_pair(draw, n=None, v=None, lo=-8.0, hi=8.0):
    n = n or draw(st.integers(1, 4))
    v = v or draw(st.integers(2, 6))
    values = st.floats(lo, hi, allow_nan=False, width=32)
    s = torch.tensor(draw(st.lists(values, min_size=n * v, max_size=n * v))).view(n, v)
    t = torch.tensor(draw(st.lists(values, min_size=n * v, max_size=n * v))).view(n, v)
    return s, t


@st.composite
def pairs(draw):
    return logits_pair(draw)


def write_chats(path, n=40, seed=0):
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = r.randint(0, 99), r.randint(0, 99)
            msgs = [{"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"The answer is {a + b}."}]
            if r.random() < 0.3:
                msgs += [{"role": "user", "content": "And add 5 to that?"},
                         {"role": "assistant", "content": f"That makes {a + b + 5}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A teacher (d_model 64) and a narrower student (d_model 32), both 2 layers, and 40 chats."""
    enc = C.get_tokenizer("byte")
    out = tmp_path_factory.mktemp("distill")
    teacher = save_tiny(out / "teacher.pt", enc, std=0.05)
    student = save_tiny(out / "student.pt", enc, d_model=32, d_ff=64)
    return dict(teacher=teacher, student=student, data=write_chats(out / "chats.jsonl"), dir=out)


def args(world, out, *extra):
    """The flags of a tiny run: teacher, student, the chats, --out, 64-token rows, 4 per micro-batch, 8 new tokens."""
    return ["--teacher", world["teacher"], "--model", world["student"], "--data", world["data"], "--out", str(out),
            "--seq-len", "64", "--batch-size", "4", "--max-new-tokens", "8", "--eval-every", "0", *extra]


# ----------------------------------------------------------------------------- the divergences


@FAST
@given(pairs(), st.sampled_from([0.5, 1.0, 2.0, 4.0]), st.floats(0.01, 0.99))
def test_each_divergence_equals_its_formula(st_pair, T, beta):
    s, t = st_pair
    for kind in KINDS:
        got = distill.divergence(s, t, kind, beta, T).double()
        assert torch.allclose(got, direct(kind, s, t, beta, T), rtol=1e-4, atol=1e-5), kind


def test_hand_computed_values():
    """p = (1/2, 1/2), q = (9/10, 1/10), written as log-probabilities."""
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    fwd = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    rev = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    m = (0.7, 0.3)  # beta = 1/2: the plain Jensen-Shannon divergence
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + \
        0.5 * (0.9 * math.log(0.9 / m[0]) + 0.1 * math.log(0.1 / m[1]))
    for kind, want in (("forward", fwd), ("reverse", rev), ("jsd", jsd)):
        assert distill.divergence(q.log(), p.log(), kind, 0.5).item() == pytest.approx(want, rel=1e-5), kind


@FAST
@given(pairs(), st.floats(0.01, 0.99))
def test_jsd_ends_are_the_kls_and_it_is_symmetric_and_bounded(st_pair, beta):
    s, t = st_pair
    assert torch.equal(distill.divergence(s, t, "jsd", 0.0), distill.divergence(s, t, "forward"))
    assert torch.equal(distill.divergence(s, t, "jsd", 1.0), distill.divergence(s, t, "reverse"))
    jsd = distill.divergence(s, t, "jsd", beta)
    # swapping the two distributions and beta <-> 1 - beta is the same divergence
    assert torch.allclose(jsd, distill.divergence(t, s, "jsd", 1 - beta), rtol=1e-4, atol=1e-6)
    # 0 <= JSD(beta) <= H(beta), the entropy of the coin that picks p or q
    h = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert (jsd >= -1e-6).all() and (jsd <= h + 1e-5).all()


@FEW
@given(pairs())
def test_jsd_divided_by_beta_tends_to_the_kls(st_pair):
    """JSD(beta) / beta -> KL(p || q) as beta -> 0 and JSD(beta) / (1 - beta) -> KL(q || p) as beta -> 1 (GKD): to
    second order the gap is -beta chi^2(p || q) / 2, bounded here by beta chi^2 plus fp32 rounding."""
    s, t = st_pair
    s, t = s / 4, t / 4  # moderate distributions: chi^2 stays small
    b = 1e-3
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    for kind, beta, scale, chi2 in (("forward", b, b, ((p - q) ** 2 / q).sum(-1)),
                                    ("reverse", 1 - b, b, ((p - q) ** 2 / p).sum(-1))):
        gap = (distill.divergence(s, t, "jsd", beta).double() / scale - direct(kind, s, t)).abs()
        assert (gap <= b * chi2 + 2e-3).all(), (kind, gap, chi2)


@pytest.mark.parametrize("T", [0.5, 1.0, 3.0])
def test_zero_loss_and_zero_gradient_when_the_student_is_the_teacher(T):
    torch.manual_seed(0)
    t = torch.randn(3, 5, 11) * 4
    mask = torch.ones(3, 5)
    for kind in KINDS:
        s = t.clone().requires_grad_(True)
        loss, kd, _ = distill.distill_loss(s, t, mask, kind, 0.3, T)
        loss.backward()
        assert abs(loss.item()) < 1e-6 and s.grad.abs().max() < 1e-6, kind
        s2 = (t + torch.randn_like(t)).requires_grad_(True)  # and a different student does get a gradient
        distill.distill_loss(s2, t, mask, kind, 0.3, T)[0].backward()
        assert s2.grad.abs().max() > 1e-3, kind


@pytest.mark.parametrize("scale", [1e2, 1e4, 3e4])
def test_finite_gradients_at_extreme_logits(scale):
    """Peaked, opposite and flat distributions whose logits span +-scale (fp32 softmax underflows to exact zeros):
    loss and gradient stay finite for every kind, temperature and hard-label weight."""
    V = 7
    s = torch.zeros(4, V)
    s[0, 0], s[1, :] = scale, -scale  # peaked; all equal and very negative
    s[2, ::2], s[3, 1] = scale, -scale
    t = torch.zeros(4, V)
    t[0, 6], t[1, 3], t[2, 1::2], t[3, 1] = scale, scale, scale, scale  # peaked where the student is not
    labels = torch.tensor([6, 3, 1, 0])
    for kind in KINDS:
        for T in (0.5, 1.0, 4.0):
            for w in (0.0, 0.5):
                x = s.clone().requires_grad_(True)
                loss, kd, ce = distill.distill_loss(x, t, torch.ones(4), kind, 0.5, T, labels, w)
                loss.backward()
                assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), (kind, T, w)
                assert kd > 0  # the student is far from the teacher; nothing rounded the divergence away


@FEW
@given(st.data())
def test_masked_positions_contribute_nothing(data):
    """Whatever the logits hold at masked positions, NaN and inf included, the loss is that of the supervised
    positions alone, and no gradient reaches the masked ones; micro-batches with the whole count sum to the whole."""
    s, t = logits_pair(data.draw, n=6, v=5)
    mask = torch.tensor(data.draw(st.lists(st.integers(0, 1), min_size=6, max_size=6)))
    labels = torch.tensor(data.draw(st.lists(st.integers(0, 4), min_size=6, max_size=6)))
    kind = data.draw(st.sampled_from(KINDS))
    keep = mask.bool()
    want = distill.distill_loss(s[keep], t[keep], torch.ones(int(keep.sum())), kind, 0.4, 2.0, labels[keep], 0.3)
    bad_s, bad_t = s.clone(), t.clone()
    bad_s[~keep], bad_t[~keep] = float("nan"), float("inf")
    x = bad_s.requires_grad_(True)
    got = distill.distill_loss(x, bad_t, mask, kind, 0.4, 2.0, labels, 0.3)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    got[0].backward()
    assert torch.isfinite(x.grad).all() and (x.grad[~keep] == 0).all()
    n = keep.sum().clamp(min=1)
    halves = [distill.distill_loss(s[i:i + 3], t[i:i + 3], mask[i:i + 3], kind, 0.4, 2.0, labels[i:i + 3], 0.3,
                                   n_tokens=n)[0] for i in (0, 3)]
    assert (halves[0] + halves[1]).item() == pytest.approx(want[0].item(), rel=1e-5, abs=1e-6)


def test_temperature_T_squared_keeps_the_soft_gradient_the_same_size():
    """Hinton Sec. 2.1: at high T the gradient of T^2 KL(p || q) in the student's logits z is (z - v) / V for
    zero-mean logits z, v (teacher), whatever T; reverse KL agrees to that order, and JSD(beta) is
    beta (1 - beta) chi^2 / 2 there, so its gradient is beta (1 - beta) (z - v) / V. The corrections are O(|z| / T).
    Without T^2 the soft term would shrink as 1 / T^2: its value at 2T is a quarter of that at T, the loss's is not."""
    torch.manual_seed(0)
    V = 6
    z, v = torch.randn(2, V), torch.randn(2, V)
    z, v = z - z.mean(-1, keepdim=True), v - v.mean(-1, keepdim=True)
    for kind, factor in (("forward", 1.0), ("reverse", 1.0), ("jsd", 0.3 * 0.7)):
        for T in (100.0, 200.0):
            x = z.clone().requires_grad_(True)
            loss, kd, _ = distill.distill_loss(x, v, torch.ones(2), kind, 0.3, T)
            loss.backward()
            want = factor * (z - v) / V / 2  # the loss is the mean over the 2 rows
            assert (x.grad - want).norm() <= 3e-2 * want.norm(), (kind, T)
            assert loss.item() == pytest.approx(T ** 2 * kd.item(), rel=1e-6)
        low = distill.distill_loss(z, v, torch.ones(2), kind, 0.3, 50.0)
        high = distill.distill_loss(z, v, torch.ones(2), kind, 0.3, 100.0)
        assert high[0].item() == pytest.approx(low[0].item(), rel=5e-2)  # with T^2: the same size
        assert high[1].item() == pytest.approx(low[1].item() / 4, rel=5e-2)  # the divergence alone: 1 / T^2


def test_hard_label_term_is_sfts_cross_entropy_and_mixes_linearly(enc):
    torch.manual_seed(0)
    s, t = torch.randn(2, 7, enc.n_vocab), torch.randn(2, 7, enc.n_vocab)
    ids, mask = torch.randint(0, 256, (2, 7)), torch.randint(0, 2, (2, 7))
    mask[0, 3] = 1
    nll, count = sft.lm_loss_sum(s, ids, mask)
    args_ = (s[:, :-1], t[:, :-1], mask[:, 1:], "forward", 0.5, 2.0, ids[:, 1:])
    loss, kd, ce = distill.distill_loss(*args_, ce_weight=1.0)
    assert ce.item() == pytest.approx((nll / count).item(), rel=1e-5) and loss.item() == pytest.approx(ce.item())
    for w in (0.0, 0.25):
        loss_w = distill.distill_loss(*args_, ce_weight=w)[0]
        assert loss_w.item() == pytest.approx((1 - w) * 4.0 * kd.item() + w * ce.item(), rel=1e-5)


def test_hidden_state_loss_is_the_mean_cosine_distance():
    torch.manual_seed(0)
    h = torch.randn(2, 3, 8)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert distill.hidden_state_loss([2.5 * h], [h], mask).item() == pytest.approx(0.0, abs=1e-6)  # scale-blind
    assert distill.hidden_state_loss([-h], [h], mask).item() == pytest.approx(2.0, abs=1e-6)
    other = torch.randn(2, 3, 8)
    garbage = other.clone()
    garbage[mask == 0] = float("nan")  # masked positions are never read
    want = (1 - torch.nn.functional.cosine_similarity(other, h, dim=-1))[mask.bool()].mean()
    got = distill.hidden_state_loss([garbage, h], [h, h], mask)  # two pairs: their mean
    assert got.item() == pytest.approx(want.item() / 2, rel=1e-5)


def test_off_policy_rows_are_sfts_rows(world, enc):
    """distill.py reads chats as sft.py does, so an off-policy run and an SFT run of the same flags see the same
    rows in the same order (the SFT-vs-KD comparison is for the same data, not only the same steps)."""
    cfg = distill.Config(data=world["data"], seq_len=128, max_new_tokens=8)
    examples, prompts, truncated = distill.load_examples(cfg, enc, need_prompts=True)
    assert examples == sft.tokenize(sft.Config(data=world["data"], seq_len=128), enc)[0] and truncated == 0
    for (messages, ids), (full, _) in zip(prompts, examples):
        assert messages[-1]["role"] == "user" and enc.decode(ids).endswith("<|im_start|>assistant\n")
        assert full[:len(ids)] == ids  # the prompt is the chat's own beginning (the byte tokenizer splits alike)


def test_on_policy_steps_come_at_rate_lmbda():
    for lmbda in (0.0, 0.3, 1.0):
        draws = [distill.on_policy_step(0, s, lmbda) for s in range(2000)]
        assert abs(sum(draws) / 2000 - lmbda) < 0.04
        assert draws == [distill.on_policy_step(0, s, lmbda) for s in range(2000)]  # a pure function of the step


# ----------------------------------------------------------------------------- the sampler / trainer contract


def test_on_policy_batches_are_sampled_from_the_student(world, tmp_path, monkeypatch):
    """Every on-policy batch the loop trains on was sampled from the student as it is at that step: the sampler's
    log-probs of the sampled tokens equal the trainer's forward of the same batch (filter_logits at
    --gen-temperature, the same banned ids), and they are not the teacher's."""
    calls = []
    original = distill.rollout
    teacher = C.load_model(world["teacher"])[0].eval()

    def checked(model, prompt_ids, cfg, enc, device, gen):
        batch = original(model, prompt_ids, cfg, enc, device, gen)
        with torch.no_grad():
            logits, t_logits = distill.forward(model, batch), distill.forward(teacher, batch)
        logp, t_logp = (M.token_logprobs(M.filter_logits(x, cfg.gen_temperature, banned=batch["banned"]),
                                         batch["ids"], batch["mask"]) for x in (logits, t_logits))
        gap = ((logp - batch["logp"]).abs() * batch["mask"]).max().item()
        gap_teacher = ((t_logp - batch["logp"]).abs() * batch["mask"]).max().item()
        calls.append((model.cfg.d_model, gap, gap_teacher, batch["mask"].sum().item()))
        return batch

    monkeypatch.setattr(distill, "rollout", checked)
    distill.main(args(world, tmp_path / "o.pt", "--lmbda", "1", "--steps", "2", "--gen-temperature", "0.7",
                      "--grad-accum", "2", "--lr", "1e-2", "--log", str(tmp_path / "o.jsonl")))
    assert len(calls) == 4  # 2 steps x 2 micro-batches
    for d_model, gap, gap_teacher, n in calls:
        assert d_model == 32 and n > 0 and gap < 1e-4 and gap_teacher > 1e-2
    records = [json.loads(line) for line in open(tmp_path / "o.jsonl")]
    assert [r["on_policy"] for r in records] == [1, 1] and all(r["ce"] == 0 for r in records)


# ----------------------------------------------------------------------------- the loop


def test_resume_equals_straight_run(world, tmp_path):
    """k steps + --resume + N - k steps == N steps, bit for bit on CPU (as tests/test_sft.py's resume test: the same
    computation in the same order, so no tolerance is needed): the data position, the lmbda draws (seed 0 draws
    on, off, off, on), the per-step sampling seeds, the learned projection and both optimisers all restored."""
    flags = ["--steps", "4", "--lmbda", "0.5", "--hidden-layers", "0:1,-1:-1", "--loss", "jsd", "--beta", "0.3",
             "--ce-weight", "0.3", "--temperature", "2", "--warmup", "1", "--lr", "1e-2"]
    distill.main(args(world, tmp_path / "straight.pt", *flags, "--log", str(tmp_path / "straight.jsonl")))
    distill.main(args(world, tmp_path / "part.pt", *flags, "--stop-at", "2"))
    distill.main(args(world, tmp_path / "resumed.pt", *flags, "--resume", str(tmp_path / "part.pt")))
    a, b = C.load_checkpoint(str(tmp_path / "straight.pt")), C.load_checkpoint(str(tmp_path / "resumed.pt"))
    init = C.load_checkpoint(world["student"])["model"]
    assert any(not torch.equal(a["model"][k], init[k]) for k in init)  # it trained
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in a["train_state"]["projection"].items():
        assert torch.equal(v, b["train_state"]["projection"][k]), k
    records = [json.loads(line) for line in open(tmp_path / "straight.jsonl")]
    assert [r["on_policy"] for r in records] == [1, 0, 0, 1] and all(r["hidden"] > 0 for r in records)


def permuted_byte_ranks(path):
    """A .tiktoken ranks file of the 256 bytes in reverse order: as many ids as the byte tokenizer, other tokens."""
    with open(path, "w") as f:
        for i in range(256):
            f.write(f"{base64.b64encode(bytes([255 - i])).decode()} {i}\n")
    return str(path)


def test_teacher_and_student_with_different_tokenizers_are_refused(world, tmp_path):
    """Same vocabulary size, other bytes behind the ids: one line, exit 2, before anything trains."""
    other = C.get_tokenizer(permuted_byte_ranks(tmp_path / "reversed.tiktoken"))
    teacher = save_tiny(tmp_path / "other.pt", other)
    proc = run_script("distill.py", *args(dict(world, teacher=teacher), tmp_path / "o.pt", "--steps", "1"),
                      check=False)
    assert_one_line_error(proc, "do not share a tokenizer", "the same number of ids, but different tokens")
    assert not (tmp_path / "o.pt").exists()
    smollm = save_tiny(tmp_path / "smollm.pt", C.get_tokenizer("byte", "smollm2"))  # same ids, another template
    with pytest.raises(M.UserError, match="chat template smollm2 vs chatml"):
        distill.main(args(dict(world, teacher=smollm), tmp_path / "o.pt", "--steps", "1"))


@pytest.mark.parametrize("mode, extra", [
    ("off-policy, hidden states 32 -> 64", ["--hidden-layers", "0:0,1:1", "--ce-weight", "0.5"]),
    ("sequence-level", ["--seq-kd", "--loss", "jsd", "--beta", "0.2"]),
    ("on-policy, fresh student", ["--lmbda", "1", "--loss", "reverse", "--init", "tiny:n_layer=1,d_model=32"]),
])
def test_cli_smoke(world, tmp_path, mode, extra):
    argv = args(world, tmp_path / "o.pt", "--steps", "2", "--log", str(tmp_path / "o.jsonl"), *extra)
    if "--init" in extra:
        i = argv.index("--model")
        del argv[i:i + 2]
    proc = run_script("distill.py", *argv)
    assert "saved" in proc.stdout
    ckpt = C.load_checkpoint(str(tmp_path / "o.pt"))
    records = [json.loads(line) for line in open(tmp_path / "o.jsonl")]
    assert ckpt["lineage"][-1] == "distill" and ckpt["config"]["d_model"] == 32 and ckpt["step"] == 2
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] > 0 for r in records)
    assert "eval_kd" in records[-1] and "eval_loss" in records[-1]
    if "--hidden-layers" in extra:
        assert all(r["hidden"] > 0 and r["ce"] > 0 for r in records) and "learned projection" in proc.stdout
        assert set(ckpt["train_state"]["projection"]) == {"maps.0.weight", "maps.1.weight"}
        assert not any("maps" in k for k in ckpt["model"])  # the projection is not part of the student
    if "--seq-kd" in extra:
        chats = [json.loads(line) for line in open(str(tmp_path / "o.pt") + ".seqkd.jsonl")]
        n_train = int(proc.stdout.split(" train")[0])
        assert len(chats) == n_train and all(c["messages"][-1]["role"] == "assistant" for c in chats)
    if "--lmbda" in extra:
        assert all(r["on_policy"] == 1 and r["gen_s"] > 0 for r in records)
        assert ckpt["lineage"] == ["init:tiny:n_layer=1,d_model=32", "distill"]


@pytest.mark.parametrize("extra, message", [
    (["--loss", "kl"], "--loss must be one of"),
    (["--beta", "0.3"], "use it with --loss jsd"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--lmbda", "1.5"], "--lmbda must be in [0, 1]"),
    (["--format", "text", "--seq-kd"], "need chats"),
    (["--lmbda", "1", "--max-new-tokens", "60"], "leaves no room"),
    (["--init", "tiny:width=3"], "is not field=number"),
    (["--hidden-layers", "0:5"], "the teacher 0..1"),
    (["--hidden-layers", "a-b"], "student_block:teacher_block"),
])
def test_impossible_flags_are_one_line_errors(world, tmp_path, extra, message):
    argv = args(world, tmp_path / "o.pt", "--steps", "1", *extra)
    if "--init" in extra:
        i = argv.index("--model")
        del argv[i:i + 2]
    with pytest.raises(M.UserError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        distill.main(argv)
    assert "\n" not in str(e.value)


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        C.parse_config(distill.Config, ["--help"], description=distill.__doc__)
    text = capsys.readouterr().out
    for f in distill.Config.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in text
    assert "GKD" in text and "T^2" in text
