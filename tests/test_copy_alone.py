"""What the README says can be copied alone, can: each script's pure block (marked "this block can be copied
alone") needs nothing but torch, math and re, and model.py runs with only torch installed beside it."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

SCRIPTS = ["sft.py", "reward.py", "dpo.py", "ppo.py", "evaluate.py", "quantize.py", "distill.py", "prune.py", "qat.py",
           "cai.py", "online.py", "arena.py"]
NOT_THERE = ["common", "model", "formats", "numpy", "tiktoken", "tqdm", "safetensors", "hypothesis"]


def pure_block(script):
    """The lines from the section header that says "can be copied alone" to the next section separator."""
    with open(os.path.join(ROOT, script)) as f:
        lines = f.read().splitlines()
    start = [i for i, line in enumerate(lines) if line.startswith("#") and "can be copied alone" in line]
    assert len(start) == 1, f"{script}: expected one block marked 'can be copied alone', found {len(start)}"
    end = next((i for i in range(start[0] + 1, len(lines)) if lines[i].startswith("# ---")), len(lines))
    return "\n".join(lines[start[0]:end]) + "\n"


# Run in a fresh interpreter: the project's modules and the other dependencies made unimportable, the block pasted
# after the only imports it may use, then every global name its functions read (LOAD_GLOBAL, nested code too)
# looked up. A name from common.py or model.py fails here even if no test ever calls that function.
PASTE = r"""
import builtins, dis, json, sys, types
import math, re, torch, torch.nn.functional as F
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # `import name` now raises ImportError
ns = {"math": math, "re": re, "torch": torch, "F": F, "__name__": "pasted"}
exec(compile(sys.stdin.read(), "pasted", "exec"), ns)

def read_globals(code):
    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= read_globals(const)
    return names

functions = {k: v for k, v in ns.items() if isinstance(v, types.FunctionType)}
unresolved = sorted({n for f in functions.values() for n in read_globals(f.__code__)} - set(ns) - set(dir(builtins)))
print(json.dumps({"functions": sorted(functions), "unresolved": unresolved}))
"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_pure_block_needs_only_torch_and_math(script):
    import json
    proc = subprocess.run([sys.executable, "-c", PASTE, ",".join(NOT_THERE)], input=pure_block(script),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["functions"], f"{script}: the block defines no functions"
    assert out["unresolved"] == [], f"{script}: the pure block reads {out['unresolved']}, defined outside it"
    module = __import__(script[:-3])
    assert all(callable(getattr(module, name, None)) for name in out["functions"])  # the same names as the file's


def test_pasted_block_computes_what_the_module_does():
    """The DPO block pasted alone gives the module's own losses: nothing it needs was left behind."""
    import dpo
    ns = {}
    exec(compile("import math, torch\nimport torch.nn.functional as F\n" + pure_block("dpo.py"), "pasted", "exec"), ns)
    g = torch.Generator().manual_seed(0)
    logps = [-torch.rand(8, generator=g) * 20 for _ in range(4)]
    for loss_type in dpo.LOSS_TYPES:
        want = dpo.preference_loss(*logps, beta=0.3, loss_type=loss_type)
        got = ns["preference_loss"](*logps, beta=0.3, loss_type=loss_type)
        for a, b in zip(want, got):
            assert torch.equal(a, b), loss_type


def test_model_py_runs_with_only_torch(tmp_path):
    """model.py copied into an empty folder: builds every preset's tiny sibling, runs a forward, a LoRA step and
    greedy sampling, with the project's other modules and tiktoken, numpy, safetensors unimportable."""
    shutil.copy(os.path.join(ROOT, "model.py"), tmp_path / "model.py")
    code = r"""
import sys
import torch  # first: torch itself looks for numpy when it loads
for name in sys.argv[1].split(","):
    sys.modules[name] = None
import model as M

class Vocab:  # what build_model reads of a tokenizer
    n_vocab = 300

torch.manual_seed(0)
for preset in ("tiny", "tiny-gpt2"):
    m = M.build_model(preset, Vocab(), n_layer=1, d_model=32, d_ff=64, n_head=2, n_kv_head=2, max_seq_len=64)
    ids = torch.randint(0, 300, (2, 10))
    logits = m(ids)
    assert logits.shape == (2, 10, 300)
    M.apply_lora(m, 4)
    loss = -M.token_logprobs(m(ids), ids, torch.ones_like(ids)).sum()
    loss.backward()
    tokens, logp, mask = M.generate(m.eval(), [[1, 2, 3], [4, 5]], 5, 0.0, 0, 1.0, [], 0)
    assert tokens.shape[0] == 2
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code, ",".join(n for n in NOT_THERE if n != "model")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
