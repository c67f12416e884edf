"""Benchmark: FP8 on a GPU of compute capability >= 8.9 (Ada, Hopper; JSON in out/bench/fp8.json). Skips elsewhere.

    python -m pytest tests/test_bench_fp8.py -q -s -m slow      (or: make bench; on a GPU machine)

  - matmul: quantize.fp8_matmul (torch._scaled_mm, the inputs quantised to e4m3 at each call, per token with per-row
    weight scales, or per tensor) against a bf16 matmul, for x of 1 to 4096 rows; `scaled_mm_only_ms` times the
    e4m3 product alone (x already quantised), and `max_err_vs_ref_rel` is _scaled_mm's error against the reference.
  - decode: greedy tokens/s at batch 1 and 16 of a random Llama of ~0.8 B parameters in bf16, w8a8-fp8 and
    w8a8-fp8-tensor (16-token prompts, 128 new tokens), and the weights' size.
Timings are medians of CUDA-event timings, measured, never asserted.
"""
import json

import pytest
import torch
import torch.nn.functional as F

import common as C
import model as M
import quantize as Q
from conftest import DECODE_SHAPE, cuda_ms, decode_tok_s, write_bench

pytestmark = pytest.mark.slow


def matmuls():
    rows = []
    for M_, K, N in [(1, 4096, 4096), (16, 4096, 4096), (256, 4096, 14336), (4096, 4096, 4096), (4096, 8192, 8192)]:
        x = torch.randn(M_, K, device="cuda")
        W = torch.randn(N, K, device="cuda") / K ** 0.5
        xb, Wb = x.bfloat16(), W.bfloat16()
        for per_token in (True, False):
            codes, scales = Q.quantize_fp8(W, per_token)
            xq, sx = Q.quantize_fp8(x, per_token)
            ref = Q.fp8_matmul_ref(x, codes, scales, per_token)
            err = ((Q.fp8_matmul(x, codes, scales, per_token) - ref).abs().max() / ref.abs().max()).item()
            sb = scales.t().contiguous()

            def scaled_mm():
                return torch._scaled_mm(xq, codes.t(), scale_a=sx, scale_b=sb, out_dtype=torch.bfloat16)
            rows.append({
                "M": M_, "K": K, "N": N, "scales": "channel/token" if per_token else "tensor",
                "bf16_ms": cuda_ms(lambda: F.linear(xb, Wb)),
                "fp8_matmul_ms": cuda_ms(lambda: Q.fp8_matmul(x, codes, scales, per_token)),  # x quantised too
                "scaled_mm_only_ms": cuda_ms(scaled_mm) if M_ % 16 == 0 else None,  # x already e4m3
                "max_err_vs_ref_rel": err})
    return rows


def decode(enc):
    out = {}
    torch.manual_seed(0)
    base = M.build_model("tiny", enc, **DECODE_SHAPE).eval()
    for name in ("bf16", "w8a8-fp8", "w8a8-fp8-tensor"):
        model = M.build_model("tiny", enc, **DECODE_SHAPE).eval()
        model.load_state_dict(base.state_dict())
        if name != "bf16":
            Q.quantize_model(model, "fp8", fp8_scales="channel" if name == "w8a8-fp8" else "tensor")
        model.to("cuda", torch.bfloat16)
        for batch in (1, 16):
            out[f"{name}_batch{batch}_tok_per_s"] = decode_tok_s(model, batch)
        out[f"{name}_weight_mb"] = Q.model_bytes(model) / 1e6
        del model
        torch.cuda.empty_cache()
    return out


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="needs a CUDA GPU of compute capability >= 8.9 (torch._scaled_mm's e4m3)")
def test_bench_fp8():
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for section, run in (("matmul", matmuls), ("decode", lambda: decode(C.get_tokenizer("byte")))):
        result[section] = run()
        write_bench("fp8", result)
    print(json.dumps(result, indent=1))
    assert all(r["max_err_vs_ref_rel"] < 0.05 for r in result["matmul"])  # _scaled_mm computes the reference
