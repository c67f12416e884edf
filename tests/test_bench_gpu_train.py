"""Benchmark: training on a CUDA GPU (JSON in out/bench/gpu_train.json). Skips without one.

    python -m pytest tests/test_bench_gpu_train.py -q -s -m slow      (or: make bench; on a GPU machine)

  - SFT model FLOPs utilisation, the `gpt2` preset (124 M) with the GPT-2 tokenizer, packed rows of 1,024 tokens
    (each 6 documents cut at random places, flex_attention's document mask), batch 16, bf16 autocast, fused AdamW,
    eager and torch.compile'd. MFU = 6 N tokens/s (N: the parameters, the tied embedding counted once; attention's
    own FLOPs left out, as nanoGPT's estimate leaves most of them) over the bf16 matmul rate of an 8192^3 product
    measured in the same run, and over the datasheet's 989 TFLOP/s (H100 / H200 SXM, dense).
  - packed attention: the same packed batch's forward + backward through compiled flex_attention with the document
    BlockMask against SDPA with a dense (B, 1, T, T) boolean mask.
  - FSDP2 on one GPU (a one-rank NCCL group, parallel.shard) against the plain step: step time and peak memory.
Timings are medians over steps after a warm-up, measured, never asserted.
"""
import json
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import common as C
import model as M
from conftest import packed_rows, write_bench

pytestmark = pytest.mark.slow
DATASHEET_BF16 = 989e12  # H100 / H200 SXM dense bf16, FLOP/s


def step_times(model, opt, ids, doc, steps, device):
    """Median seconds of a bf16-autocast training step (forward, loss, backward, AdamW) after 3 warm-up steps."""
    times = []
    for i in range(steps + 3):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(ids, doc_ids=doc)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_rate(device, n=8192):
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * 10 / (time.perf_counter() - t0)


def mfu(device, compile, B=16, T=1024, steps=10):
    enc = C.get_tokenizer("gpt2")
    torch.manual_seed(0)
    model = M.build_model("gpt2", enc, max_seq_len=T).to(device).train()
    N = sum(p.numel() for p in model.parameters())  # a tied embedding is one parameter tensor
    opt = C.make_optimizer(model, 3e-4, weight_decay=0.1)
    run = torch.compile(model) if compile else model
    ids, doc = (t.to(device) for t in packed_rows(model.cfg.vocab_size, B, T))
    seconds = step_times(run, opt, ids, doc, steps, device)
    return {"params": N, "tokens_per_step": B * T, "step_ms": seconds * 1e3, "tok_s": B * T / seconds,
            "model_flops_s": 6 * N * B * T / seconds}


def attention_paths(device, B=16, T=1024, steps=10):
    """Forward + backward of the gpt2 preset on packed rows: flex's BlockMask vs the dense boolean mask (bf16)."""
    enc = C.get_tokenizer("gpt2")
    torch.manual_seed(0)
    model = M.build_model("gpt2", enc, max_seq_len=T).to(device).train()
    ids, doc = (t.to(device) for t in packed_rows(model.cfg.vocab_size, B, T))
    out = {}
    flex_devices = M.FLEX_DEVICES
    try:
        for name, devices in (("flex_ms", {"cuda"}), ("dense_mask_ms", set())):
            M.FLEX_DEVICES = devices
            times = []
            for i in range(steps + 3):
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    model(ids, doc_ids=doc).float().logsumexp(-1).mean().backward()
                torch.cuda.synchronize(device)
                if i >= 3:
                    times.append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
            out[name] = statistics.median(times) * 1e3
    finally:
        M.FLEX_DEVICES = flex_devices
    out["flex_speedup"] = out["dense_mask_ms"] / out["flex_ms"]
    return out


def fsdp_one_gpu(device, B=8, T=1024, steps=10):
    """The gpt2 preset's training step plain (fp32 weights, bf16 autocast) against FSDP2 on a one-rank NCCL group
    (parallel.shard: bf16 weights, fp32 reductions, as `torchrun --nproc_per_node=1 sft.py --fsdp` runs): step time
    and peak GPU memory."""
    import torch.distributed as dist

    import parallel
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1)
    enc = C.get_tokenizer("gpt2")
    out = {}
    try:
        for name in ("plain", "fsdp2"):
            torch.manual_seed(0)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            model = M.build_model("gpt2", enc, max_seq_len=T).to(device).train()
            if name == "fsdp2":
                model = parallel.shard(model, device)
            opt = C.make_optimizer(model, 3e-4, weight_decay=0.1)
            ids, doc = (t.to(device) for t in packed_rows(model.cfg.vocab_size, B, T))
            out[name] = {"step_ms": step_times(model, opt, ids, doc, steps, device) * 1e3,
                         "peak_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20}
            del model, opt
    finally:
        dist.destroy_process_group()
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_gpu_train():
    device = torch.device("cuda")
    rate = matmul_rate(device)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "bf16_matmul_flops_s": rate}
    for compile in (False, True):
        r = mfu(device, compile)
        r["mfu_vs_measured"], r["mfu_vs_datasheet"] = r["model_flops_s"] / rate, r["model_flops_s"] / DATASHEET_BF16
        result["sft_compiled" if compile else "sft_eager"] = r
        write_bench("gpu_train", result)
    result["packed_attention"] = attention_paths(device)
    write_bench("gpu_train", result)
    result["fsdp_one_gpu"] = fsdp_one_gpu(device)
    write_bench("gpu_train", result)
    print(json.dumps(result, indent=1))
    assert result["sft_compiled"]["tok_s"] > 0 and result["packed_attention"]["flex_ms"] > 0
