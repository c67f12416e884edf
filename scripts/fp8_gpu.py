"""FP8 on a GPU (compute capability >= 8.9: Ada, Hopper): quantize.fp8_matmul (torch._scaled_mm, the inputs quantised
to e4m3 at each call) against a bf16 matmul, and a random Llama's greedy decode bf16 vs --method fp8. One JSON
object on stdout: the device, each matmul's time (median of CUDA-event timings), _scaled_mm's error against the
reference, and the decode tokens/s.

    python -m pytest -q tests/test_fp8.py -k "scaled_mm or cuda" && python scripts/fp8_gpu.py   # ~1 minute on an H100
"""
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import model as M  # noqa: E402
import quantize as Q  # noqa: E402


def cuda_ms(fn, reps=50):
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


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
    shape = dict(n_layer=16, d_model=2048, n_head=16, n_kv_head=8, d_ff=8192, max_seq_len=1024)  # ~0.8B parameters
    torch.manual_seed(0)
    base = M.build_model("tiny", enc, **shape).eval()
    for name in ("bf16", "w8a8-fp8", "w8a8-fp8-tensor"):
        model = M.build_model("tiny", enc, **shape).eval()
        model.load_state_dict(base.state_dict())
        if name != "bf16":
            Q.quantize_model(model, "fp8", fp8_scales="channel" if name == "w8a8-fp8" else "tensor")
        model.to("cuda", torch.bfloat16)
        for batch in (1, 16):
            prompts = [[1 + i % 200] * 16 for i in range(batch)]
            with torch.no_grad():
                M.generate(model, prompts, 8, temperature=0)
                torch.cuda.synchronize()
                t = time.perf_counter()
                tokens, _, mask = M.generate(model, prompts, 128, temperature=0, stop_ids=())
                torch.cuda.synchronize()
            out[f"{name}_batch{batch}_tok_per_s"] = round(mask.sum().item() / (time.perf_counter() - t), 1)
        out[f"{name}_weight_mb"] = round(Q.model_bytes(model) / 1e6, 1)
        del model
        torch.cuda.empty_cache()
    return out


def main():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        print(json.dumps({"skipped": "needs a CUDA GPU of compute capability >= 8.9"}))
        return
    enc = C.get_tokenizer("byte")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "matmul": matmuls(),
              "decode": decode(enc)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
