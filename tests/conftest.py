"""Shared fixtures: the byte tokenizer, tiny random models, the built-in world built once per session."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common as C
import model as M  # noqa: E402


def run_script(*args, timeout=600, check=True, env=None):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def enc():
    return C.get_tokenizer("byte")


@pytest.fixture(params=["tiny", "tiny-gpt2"])
def tiny_model(request, enc):
    torch.manual_seed(0)
    model = M.build_model(request.param, enc, n_layer=2, dropout=0.0).eval()
    for p in model.parameters():  # larger weights than the init so differences would show
        torch.nn.init.normal_(p, std=0.1)
    return model


def save_tiny(path, enc, std=None, score_std=None, preset="tiny", **overrides):
    """A tiny random model saved as a checkpoint (seed 0): 2 layers, d_model 64 unless `overrides` say otherwise;
    std re-draws every weight from N(0, std) (so a policy and its reference visibly differ after a step);
    score_std gives a scalar head (head="scalar") something to read. Returns path as a string."""
    torch.manual_seed(0)
    model = M.build_model(preset, enc, **{"n_layer": 2, "d_model": 64, "d_ff": 128, "max_seq_len": 128, **overrides})
    if std is not None:
        for p in model.parameters():
            torch.nn.init.normal_(p, std=std)
    if score_std is not None:
        torch.nn.init.normal_(model.score.weight, std=score_std)
    C.save_checkpoint(str(path), model, enc)
    return str(path)


def always_a_judge(enc):
    """A judge LM that answers "A" whatever it reads: its final norm ignores the input and points at "A"."""
    torch.manual_seed(0)
    judge = M.build_model("tiny-gpt2", enc, n_layer=1).eval()
    with torch.no_grad():
        judge.norm.weight.zero_()
        judge.norm.bias.copy_(judge.embed.weight[ord("A")] * 50)
    return judge


@pytest.fixture
def tiny_ckpt(tmp_path, enc):
    return save_tiny(tmp_path / "init.pt", enc)


def assert_refused(script, *args, message):
    """The script run with impossible flags: exit code 2 and one line on stderr that contains `message`."""
    assert_one_line_error(run_script(script, *args, check=False), "", message)


def hf_tokenizer(enc):
    """A transformers tokenizer for TRL's bookkeeping (pad / eos ids): a word-level vocabulary over our ids. TRL
    gets our token ids, never text, so it never encodes with it. (transformers and tokenizers: bench only.)"""
    import transformers
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    vocab = {f"<{i}>": i for i in range(enc.n_vocab)}
    for name in C.SPECIAL_TOKENS:
        vocab[name] = C.special_id(enc, name)
        vocab.pop(f"<{C.special_id(enc, name)}>", None)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<|pad|>")))
    tok.pad_token, tok.eos_token = "<|pad|>", "<|im_end|>"
    return tok


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """The built-in world, generated once per test session."""
    from data.toyworld import build
    out = tmp_path_factory.mktemp("toy")
    build(str(out), seed=0)
    return str(out)


@pytest.fixture(scope="module")
def policy_and_rm(tmp_path_factory):
    """A tiny random policy and a tiny reward model (zero value head), saved: what ppo.py needs to start."""
    enc = C.get_tokenizer("byte")
    out = tmp_path_factory.mktemp("policy_and_rm")
    torch.manual_seed(0)
    shape = dict(n_layer=1, d_model=32, d_ff=64, n_head=2, n_kv_head=1, max_seq_len=192)
    paths = str(out / "policy.pt"), str(out / "rm.pt")
    C.save_checkpoint(paths[0], M.build_model("tiny", enc, **shape), enc)
    C.save_checkpoint(paths[1], M.build_model("tiny", enc, head="scalar", **shape), enc)
    return paths


def assert_one_line_error(proc, where, message):
    """A user error: exit code 2, exactly one line on stderr naming `where` (e.g. "file:3:") and `message`."""
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and where in err[0] and message in err[0], proc.stderr


def assert_error_ends_run(proc, where, message):
    """A user error raised mid-run (progress bars and log lines came first): exit code 2, no traceback, and exactly
    one `error:` line, the last, naming `where` and `message`."""
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and [e for e in err if e.startswith("error:")] == err[-1:], proc.stderr
    assert where in err[-1] and message in err[-1], proc.stderr


# Adam moves a weight by lr * m_hat / sqrt(v_hat) per step, and for betas (0.9, 0.95) Cauchy-Schwarz bounds
# |m_hat| / sqrt(v_hat) by 0.1 * sqrt(20) * sqrt(1 / (1 - 0.9**2 / 0.95)) = 1.165 at any step
ADAM_MAX_STEP = 1.17


def assert_same_training(a, b, lr, steps, bulk=1e-2, frac=1e-3):
    """Two runs' final weights (state dicts) that are the same computation up to the order of fp32 sums:
    DDP vs one process, k micro-batches vs one batch, compiled vs eager.

    Bit-equality is not promised there: rounding differs with the reduction order and with the CPU's vector
    width, and Adam divides each gradient by its own running size, so a weight whose gradient is nearly zero
    can move by anything up to a whole step. The tolerances follow from that:
      - every weight: |a - b| <= 2 * ADAM_MAX_STEP * lr * steps (two runs, each at most one Adam step a step);
        rounding can never exceed it;
      - the bulk: at most `frac` of all weights differ by more than `bulk` * lr. Rounding (relative ~1e-6)
        pushes a weight that far only where its gradient is ~1e4 times smaller than typical; a real bug
        (other rows, a missed step, a wrong mask) moves most weights by ~lr and fails here.
    Gradient scale bugs are invisible to Adam (it is scale free): pair this with a tight check of the first
    step's loss and gradient norm, taken before any weights differ."""
    assert set(a) == set(b)
    hard = 2 * ADAM_MAX_STEP * lr * steps
    diffs = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in sorted(a)])
    worst = max(a, key=lambda k: (a[k].double() - b[k].double()).abs().max())
    assert diffs.max() <= hard, f"{worst}: |diff| {diffs.max():.3g} > {hard:.3g}, more than Adam can move a weight"
    moved = (diffs > bulk * lr).double().mean().item()
    assert moved <= frac, f"{moved:.2%} of weights differ by more than {bulk} * lr (allowed {frac:.2%})"


def assert_resume_equals_straight(main, args, tmp_path, stop_at=2):
    """main(args) straight to the end, and stopped at step `stop_at` then resumed: the same final weights, bit for
    bit (on CPU the resumed run repeats the same computation). -> the straight run's state dict."""
    main(args + ["--out", str(tmp_path / "straight.pt")])
    main(args + ["--out", str(tmp_path / "part.pt"), "--stop-at", str(stop_at)])
    main(args + ["--out", str(tmp_path / "resumed.pt"), "--resume", str(tmp_path / "part.pt")])
    a = C.load_checkpoint(str(tmp_path / "straight.pt"))["model"]
    b = C.load_checkpoint(str(tmp_path / "resumed.pt"))["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return a


def first_record(log_path):
    import json
    with open(log_path) as f:
        return json.loads(f.readline())


def assert_same_first_step(log_a, log_b, keys=("loss", "grad_norm"), rel=1e-5):
    """The first logged step of two runs from the same weights: only the order of fp32 sums differs, so the loss
    and the gradient norm agree to float precision (relative ~1e-6); a scale or normalisation bug does not."""
    ra, rb = first_record(log_a), first_record(log_b)
    for key in keys:
        assert ra[key] == pytest.approx(rb[key], rel=rel, abs=1e-7), (key, ra[key], rb[key])


# -----------------------------------------------------------------------------
# GPU benchmarks' shared timing (tests/test_bench_kernels.py, tests/test_bench_fp8.py)

DECODE_SHAPE = dict(n_layer=16, d_model=2048, n_head=16, n_kv_head=8, d_ff=8192, max_seq_len=1024)  # ~0.8 B


def cuda_ms(fn, reps=100):
    """Median of CUDA-event timings of fn() after 10 warm-up calls (device time between the events: for calls of a
    few microseconds, capture them in a CUDA graph first, as test_bench_kernels.graph_ms does)."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def packed_rows(vocab, B, T, seed=0, cuts=5):
    """Random token rows as packed training sees them: (ids (B, T), doc_ids (B, T)), each row split into documents
    at `cuts` random positions (tests/test_cuda_paths.py, tests/test_bench_gpu_train.py)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    doc = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        for c in torch.randint(1, T, (cuts,), generator=g).tolist():
            doc[b, c:] += 1
    return ids, doc


def write_bench(name, result):
    """out/bench/{name}.json <- result, rewritten after each section of a GPU benchmark: one stopped by its time limit
    (scripts/gpu_check.sh) still leaves what it measured."""
    import json
    os.makedirs(os.path.join(ROOT, "out", "bench"), exist_ok=True)
    with open(os.path.join(ROOT, "out", "bench", f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)


def decode_tok_s(model, batch, new_tokens=128):
    """Greedy decode speed on CUDA: `batch` 16-token prompts, `new_tokens` each, after an 8-token warm-up."""
    import time
    prompts = [[1 + i % 200] * 16 for i in range(batch)]
    with torch.no_grad():
        M.generate(model, prompts, 8, temperature=0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        _, _, mask = M.generate(model, prompts, new_tokens, temperature=0, stop_ids=())
        torch.cuda.synchronize()
    return mask.sum().item() / (time.perf_counter() - t)
