"""Shared fixtures: the byte tokenizer, tiny random models, the built-in world built once per session."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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
    return M.get_tokenizer("byte")


@pytest.fixture(params=["tiny", "tiny-gpt2"])
def tiny_model(request, enc):
    torch.manual_seed(0)
    model = M.build_model(request.param, enc, n_layer=2, dropout=0.0).eval()
    for p in model.parameters():  # larger weights than the init so differences would show
        torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """The built-in world, generated once per test session."""
    from data.toyworld import build
    out = tmp_path_factory.mktemp("toy")
    build(str(out), seed=0)
    return str(out)


def assert_one_line_error(proc, where, message):
    """A user error: exit code 2, exactly one line on stderr naming `where` (e.g. "file:3:") and `message`."""
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and where in err[0] and message in err[0], proc.stderr
