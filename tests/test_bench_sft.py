"""Benchmark: SFT training throughput on the tiny config, packed vs padded rows (JSON in out/bench/sft.json).

    python -m pytest tests/test_bench_sft.py -q -s -m slow      (or: make bench)

Both variants train on the same examples of the built-in world's sft.jsonl with the same batch size; the
figure that matters is real (non-pad) tokens per second, and so the time to one epoch. Timings are measured,
never asserted.
"""
import json
import os
import time

import pytest
import torch

import common as C
import model as M
import sft
from conftest import ROOT


def measure(rows, steps, batch_size, device="cpu"):
    torch.manual_seed(0)
    enc = C.get_tokenizer("byte")
    model = M.build_model("tiny", enc).to(device).train()
    opt = C.make_optimizer(model, 1e-3)
    ids, mask, doc = rows
    real = ids != C.special_id(enc, "<|pad|>")  # the pad id never occurs in data
    times, tokens = [], 0
    for step in range(steps + 1):
        b = slice(step * batch_size % len(ids), step * batch_size % len(ids) + batch_size)
        t0 = time.perf_counter()
        b_ids, b_mask, b_doc = sft.batch_of(rows, b, device)  # as sft.py does: trimmed after the last target
        logits = model(b_ids, doc_ids=b_doc)
        nll, n = sft.lm_loss_sum(logits, b_ids, b_mask)
        (nll / n).backward()
        opt.step()
        opt.zero_grad()
        if step:  # the first step warms up the allocator and kernels
            times.append(time.perf_counter() - t0)
            tokens += int(real[b].sum())
    seconds = sum(times)
    return {"rows": len(ids), "steps_per_s": len(times) / seconds, "real_tok_per_s": tokens / seconds,
            "epoch_seconds_est": len(ids) / batch_size * seconds / len(times),
            "pad_fraction": 1 - float(real.float().mean())}


@pytest.mark.slow
def test_bench_sft_packed_vs_padded(toy_dir):
    enc = C.get_tokenizer("byte")
    cfg = sft.Config(data=os.path.join(toy_dir, "sft.jsonl"), seq_len=256)
    examples, _ = sft.tokenize(cfg, enc)
    pad = C.special_id(enc, "<|pad|>")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    result = {"config": "tiny", "seq_len": cfg.seq_len, "batch_size": 16, "examples": len(examples),
              "device": "cpu", "torch_threads": torch.get_num_threads()}
    for packing in (True, False):
        rows = sft.make_rows(examples, sft.Config(seq_len=256, packing=packing), pad)
        result["packed" if packing else "padded"] = measure(rows, steps=10, batch_size=16)
    result["speedup_epoch"] = result["padded"]["epoch_seconds_est"] / result["packed"]["epoch_seconds_est"]
    os.makedirs(os.path.join(ROOT, "out", "bench"), exist_ok=True)
    with open(os.path.join(ROOT, "out", "bench", "sft.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    assert result["packed"]["rows"] < result["padded"]["rows"]  # packing must actually pack
