"""Faults a long run meets: SIGKILL at any moment (during saves too), Ctrl-C, an --out that cannot be written, a
loss that diverges, two runs saving to one path. Every training script shares the mechanisms (common.py's
atomic_write, check_out, catch_interrupts / interrupted, check_finite); sft.py carries the heavier loops.

    python -m pytest tests/test_faults.py -q                # a few SIGKILL tries
    python -m pytest tests/test_faults.py -q -m slow        # 20 SIGKILL tries
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import common as C
import model as M
from conftest import ROOT, assert_one_line_error, run_script
from test_sft import write_chats


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small model (its checkpoint with AdamW state is ~6 MB, so a save takes a while) and a chats file."""
    out = tmp_path_factory.mktemp("faults")
    enc = C.get_tokenizer("byte")
    torch.manual_seed(0)
    path = str(out / "init.pt")
    C.save_checkpoint(path, M.build_model("tiny", enc, n_layer=4, d_model=128, d_ff=384, max_seq_len=128), enc)
    return path, write_chats(out / "c.jsonl", n=60)


def sft_args(setup, out, *extra, steps=12):
    return ["sft.py", "--model", setup[0], "--data", setup[1], "--out", str(out), "--steps", str(steps),
            "--seq-len", "64", "--batch-size", "4", "--eval-every", "0", "--eval-frac", "0", "--warmup", "0",
            "--device", "cpu", *extra]


def start(args, log):
    return subprocess.Popen([sys.executable, *args, "--log", str(log)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_steps(proc, log, n, timeout=120):
    """Block until the run has logged n steps (it is then inside the loop)."""
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if os.path.exists(log) and sum(1 for _ in open(log)) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {n}: {proc.communicate()[1][-2000:]}")


# ----------------------------------------------------------------------------- SIGKILL


def kill_and_resume(setup, tmp_path, want, tries, seed):
    rng = random.Random(seed)
    for i in range(tries):
        out, log = tmp_path / f"k{i}.pt", tmp_path / f"k{i}.jsonl"
        proc = start(sft_args(setup, out, "--save-every", "1"), log)
        wait_for_steps(proc, log, 1)
        time.sleep(rng.uniform(0, 1.0))  # anywhere in the run: a step, a save, the fsync, the rename
        proc.kill()
        proc.communicate()
        if not out.exists():
            continue  # killed before its first rename: nothing to resume, and nothing half-written either
        step = C.load_checkpoint(str(out))["step"]  # loadable, whatever moment the kill hit
        assert 1 <= step <= 12
        run_script(*sft_args(setup, out, "--resume", str(out)), env={"OMP_NUM_THREADS": "1"})
        got = C.load_checkpoint(str(out))
        assert got["step"] == 12
        for k in want:  # resuming is the same computation in the same order: bit-exact
            assert torch.equal(got["model"][k], want[k]), (i, step, k)


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "s.pt"
    run_script(*sft_args(setup, out, "--save-every", "1"), env={"OMP_NUM_THREADS": "1"})
    return C.load_checkpoint(str(out))["model"]


def test_sigkill_at_random_moments_leaves_a_resumable_checkpoint(setup, straight, tmp_path):
    kill_and_resume(setup, tmp_path, straight, tries=2, seed=0)


@pytest.mark.slow
def test_sigkill_twenty_times(setup, straight, tmp_path):
    kill_and_resume(setup, tmp_path, straight, tries=20, seed=1)


# ----------------------------------------------------------------------------- Ctrl-C


def interrupt(proc, log, n=2):
    wait_for_steps(proc, log, n)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert lines[-1].startswith("interrupted: ") and sum(e.startswith(("interrupted", "error")) for e in lines) == 1
    return lines[-1]


def test_ctrl_c_stops_at_once_with_one_line(setup, tmp_path):
    out, log = tmp_path / "o.pt", tmp_path / "o.jsonl"
    line = interrupt(start(sft_args(setup, out, steps=10_000), log), log)
    assert "nothing saved" in line and "--save-on-interrupt" in line
    assert not out.exists()


def script_args(script, setup, toy_dir, ckpts, out):
    if script == "sft.py":
        return sft_args(setup, out, steps=10_000)
    if script == "ppo.py":
        return ["ppo.py", "--model", ckpts[0], "--reward-model", ckpts[1], "--out", str(out), "--steps", "10000",
                "--data", os.path.join(toy_dir, "prompts.jsonl"), "--batch-size", "2", "--max-new-tokens", "4",
                "--device", "cpu", "--eval-every", "0"]
    prefs = os.path.join(os.path.dirname(str(out)), "prefs.jsonl")
    with open(os.path.join(toy_dir, "prefs.jsonl")) as f, open(prefs, "w") as g:
        g.writelines(f.readlines()[:24])  # few pairs: dpo.py computes reference log-probs for all before step 1
    return [script, "--model", setup[0], "--data", prefs, "--out", str(out),
            "--steps", "10000", "--seq-len", "128", "--batch-size", "2", "--eval-every", "0", "--device", "cpu",
            *(["--kl-prompts", "0"] if script == "dpo.py" else [])]


@pytest.mark.parametrize("script", ["sft.py", "reward.py", "dpo.py", "ppo.py"])
def test_ctrl_c_with_save_on_interrupt_saves_at_the_step_boundary(setup, toy_dir, policy_and_rm, tmp_path, script):
    out, log = tmp_path / "o.pt", tmp_path / "o.jsonl"
    args = script_args(script, setup, toy_dir, policy_and_rm, out)
    line = interrupt(start(args + ["--save-on-interrupt"], log), log)
    logged = [json.loads(r) for r in open(log)]
    ckpt = C.load_checkpoint(str(out))
    assert ckpt["step"] == logged[-1]["step"] >= 2  # the step that was running when the signal came, completed
    assert f"(step {ckpt['step']})" in line and f"--resume {out}" in line
    steps = ["--steps", str(ckpt["step"] + 1)]
    run_script(*args[:args.index("--steps")], *steps, *args[args.index("--steps") + 2:], "--resume", str(out),
               env={"OMP_NUM_THREADS": "1"})
    assert C.load_checkpoint(str(out))["step"] == ckpt["step"] + 1  # and it continues from there


# ----------------------------------------------------------------------------- --out, divergence, two writers


@pytest.mark.parametrize("where, message", [
    ("/dev/full", "not a regular file"),
    ("FILE/sub/o.pt", "cannot write --out there"),
    ("/proc/o.pt", "cannot write --out there"),
    ("RO/o.pt", "cannot write --out there"),
])
def test_unwritable_out_fails_before_training(setup, tmp_path, where, message):
    if where.startswith("RO"):
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders; /proc covers a read-only place")
        (tmp_path / "RO").mkdir(mode=0o555)
    (tmp_path / "FILE").write_text("a file, not a folder")
    out = where.replace("FILE", str(tmp_path / "FILE")).replace("RO", str(tmp_path / "RO"))
    log = tmp_path / "log.jsonl"
    proc = run_script(*sft_args(setup, out), "--log", str(log), check=False)
    assert_one_line_error(proc, os.path.abspath(out), message)
    assert not log.exists()  # not one step was trained


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_old_file(tmp_path, enc):
    model = M.build_model("tiny", enc, n_layer=1, d_model=32, d_ff=64)
    path = str(tmp_path / "c.pt")
    C.save_checkpoint(path, model, enc, step=1)

    def fill(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(M.UserError, match="c.pt: could not write it .No space left on device.; any earlier"):
        C.atomic_write(path, fill)
    assert C.load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["c.pt"]


def test_a_diverging_loss_stops_with_the_step_and_the_last_good_checkpoint(setup, tmp_path):
    out, log = tmp_path / "o.pt", tmp_path / "o.jsonl"
    proc = run_script(*sft_args(setup, out, "--save-every", "1", "--lr", "1e5", "--grad-clip", "0", steps=50),
                      "--log", str(log), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    logged = sum(1 for _ in open(log))  # the steps before the diverged one, each logged and saved
    ckpt = C.load_checkpoint(str(out))
    assert f"step {logged + 1}: " in err and " is nan" in err and f"Last good checkpoint: {out} (step {logged})" in err
    assert ckpt["step"] == logged and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nan_weights_from_the_start_name_no_checkpoint(tmp_path, setup, enc):
    model, _, _ = C.load_model(setup[0])
    with torch.no_grad():
        model.blocks[0].attn.q.weight[0, 0] = float("nan")
    bad = tmp_path / "nan.pt"
    C.save_checkpoint(str(bad), model, enc)
    proc = run_script(*sft_args((str(bad), setup[1]), tmp_path / "o.pt"), check=False)
    assert proc.returncode == 2 and "step 1: loss is nan" in proc.stderr and "Last good checkpoint: none yet" in proc.stderr
    assert not (tmp_path / "o.pt").exists()


def test_two_runs_saving_to_one_out_leave_one_valid_checkpoint(setup, straight, tmp_path):
    """Two runs (seeds 0 and 1) save 12 times each to one path at the same time: the file left is whole, and is
    exactly what one of them computed (never a mix of the two)."""
    out = tmp_path / "o.pt"
    procs = [start(sft_args(setup, out, "--save-every", "1", "--seed", str(i)), tmp_path / f"{i}.jsonl")
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    ckpt = C.load_checkpoint(str(out))
    assert ckpt["step"] == 12 and not [f for f in os.listdir(tmp_path) if ".tmp." in f]
    want = straight
    if ckpt["args"]["seed"] == 1:
        run_script(*sft_args(setup, tmp_path / "s1.pt", "--save-every", "1", "--seed", "1"),
                   env={"OMP_NUM_THREADS": "1"})
        want = C.load_checkpoint(str(tmp_path / "s1.pt"))["model"]
    assert all(torch.equal(ckpt["model"][k], want[k]) for k in want)
