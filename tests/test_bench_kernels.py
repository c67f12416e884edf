"""Benchmark: kernels.cu on a CUDA GPU (JSON in out/bench/kernels.json). Skips where kernels.cu cannot run.

    python -m pytest tests/test_bench_kernels.py -q -s -m slow      (or: make bench; on a GPU machine)

  - matmul: y = x W^T for W of 4096 x 4096, 11008 x 4096 (up: 11008 outputs of 4096 inputs) and 4096 x 11008
    (down), x of 1, 4 and 16 rows in bf16: the bf16 matmul (cuBLAS), kernels.cu's gemv at int4 (groups of 128) and
    int8 (per channel). Each time is the median of CUDA-event timings over rotating copies of the weights, 256 MB
    of them at least, so no call finds its weights in the L2 cache (60 MB on an H200), each call one of 32
    captured in a CUDA graph (no launch gaps: a 4096 x 4096 int4 product reads 8 MB, ~2 us at 4.8 TB/s). GB/s
    counts the bytes the product must read and write (codes, scales, zeros, x, y); `hbm_fraction` is that over a
    device-to-device copy's rate measured in the same run (bytes read + written).
  - crossover: at 16, 32, 64, 128 and 512 rows, int_matmul's choice (gemv up to 16 rows, else dequantise + cuBLAS)
    against the gemv run on 16-row slices, and against bf16: where dequantise + cuBLAS starts to win.
  - decode: greedy tokens/s at batch 1 and 16 (16-token prompts, 128 new tokens) of a random Llama of ~0.8 B
    parameters in bf16, then RTN int4 g128 and int8 through the kernels, the same model, eager (each step's Python
    and launch time included for both; generate(compile=True) would replay the step as a CUDA graph, the kernels
    inside it as a torch custom op, at a compile per model this call's time limit does not hold).
Timings are measured, never asserted.
"""
import json

import pytest
import torch
import torch.nn.functional as F

import cuda_kernels
import model as M
import quantize as Q
from conftest import DECODE_SHAPE, cuda_ms, decode_tok_s, write_bench

pytestmark = pytest.mark.slow
SHAPES = {"square": (4096, 4096), "up": (11008, 4096), "down": (4096, 11008)}  # (N outputs, K inputs)


def graph_ms(fn, calls=32):
    """Time per call of fn(), captured `calls` times in one CUDA graph: a replay launches them back to back, so a
    few-microsecond kernel is timed without the Python and launch time around it (median of replays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (and allocate) off the default stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return cuda_ms(graph.replay, 20) / calls


def rotating(make, nbytes):
    """Enough copies of make()'s tensors for 256 MB, and a function returning the next copy at each call (so each
    call of a captured sequence reads weights that are not in the L2 cache)."""
    copies = [make() for _ in range(max(2, -(-(256 << 20) // nbytes)))]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]
    return nxt


def copy_gbs():
    """A device-to-device copy of 1 GB: bytes read + written per second, the HBM ceiling this run compares with."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / cuda_ms(lambda: b.copy_(a), 20) / 1e6


def packed_layer(N, K, bits, group):
    W = torch.randn(N, K, device="cuda") / K ** 0.5
    codes, scales, zeros = Q.quantize_rtn(W, bits, group)
    return Q.pack_bits(codes, bits), scales.half(), zeros


def matmuls(ceiling):
    rows = []
    for name, (N, K) in SHAPES.items():
        bf16 = rotating(lambda: torch.randn(N, K, device="cuda", dtype=torch.bfloat16), N * K * 2)
        ints = {bits: rotating(lambda: packed_layer(N, K, bits, group), N * K * bits // 8)
                for bits, group in ((4, 128), (8, K))}
        for m in (1, 4, 16):
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
            t_bf16 = graph_ms(lambda: F.linear(x, bf16()))
            row = {"shape": name, "N": N, "K": K, "rows": m, "bf16_ms": t_bf16,
                   "bf16_gbs": (N * K * 2 + 2 * m * (K + N)) / t_bf16 / 1e6}
            for bits, group in ((4, 128), (8, K)):
                nxt = ints[bits]
                t = graph_ms(lambda: cuda_kernels.int_matmul(x, *nxt(), bits, group))
                nbytes = N * K * bits // 8 + 3 * N * (K // group) + 2 * m * (K + N)
                row.update({f"int{bits}_ms": t, f"int{bits}_gbs": nbytes / t / 1e6,
                            f"int{bits}_hbm_fraction": nbytes / t / 1e6 / ceiling,
                            f"int{bits}_speedup_vs_bf16": t_bf16 / t})
            rows.append(row)
    return rows


def crossover():
    N, K = SHAPES["up"]
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    q = packed_layer(N, K, 4, 128)
    out = []
    for m in (16, 32, 64, 128, 512):
        x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
        out.append({"rows": m, "bf16_ms": graph_ms(lambda: F.linear(x, W)),
                    "dequantize_cublas_ms": graph_ms(lambda: F.linear(x, cuda_kernels.dequantize(*q, 4, 128,
                                                                                          torch.bfloat16))),
                    "gemv_16_row_slices_ms": graph_ms(lambda: [cuda_kernels.int_matmul(x[i:i + 16], *q, 4, 128)
                                                               for i in range(0, m, 16)])})
    return out


def decode(enc):
    torch.manual_seed(0)
    base = M.build_model("tiny", enc, **DECODE_SHAPE).eval()
    out = {}
    for name, bits, group in (("bf16", 0, 0), ("int4_g128", 4, 128), ("int8", 8, 0)):
        model = M.build_model("tiny", enc, **DECODE_SHAPE).eval()
        model.load_state_dict(base.state_dict())
        if bits:
            Q.quantize_model(model, "rtn", bits, group)
        model.to("cuda", torch.bfloat16)
        for batch in (1, 16):
            out[f"{name}_batch{batch}_tok_s"] = decode_tok_s(model, batch)
        out[f"{name}_weight_mb"] = Q.model_bytes(model) / 2 ** 20
        del model
        torch.cuda.empty_cache()
    for key in [k for k in out if k.startswith("bf16_batch")]:
        for name in ("int4_g128", "int8"):
            out[key.replace("bf16", name).replace("_tok_s", "_speedup")] = out[key.replace("bf16", name)] / out[key]
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_kernels(enc):
    if cuda_kernels.load() is None:
        pytest.skip(f"kernels.cu cannot run here: {cuda_kernels.why_not()}")
    ceiling = copy_gbs()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_gbs": ceiling}
    sections = {"matmul": lambda: matmuls(ceiling), "crossover": crossover, "decode": lambda: decode(enc)}
    for section, run in sections.items():
        result[section] = run()
        write_bench("kernels", result)
    print(f"\n{result['device']}, copy {ceiling:.0f} GB/s")
    for r in result["matmul"]:
        ints = [f"int{b} {r[f'int{b}_ms'] * 1e3:7.1f} us {r[f'int{b}_gbs']:6.0f} GB/s "
                f"({r[f'int{b}_hbm_fraction']:.0%} HBM) x{r[f'int{b}_speedup_vs_bf16']:.2f}" for b in (4, 8)]
        print(f"{r['shape']:6s} rows {r['rows']:2d}: bf16 {r['bf16_ms'] * 1e3:7.1f} us {r['bf16_gbs']:6.0f} GB/s | "
              + " | ".join(ints))
    for r in result["crossover"]:
        print(f"crossover rows {r['rows']:3d}: bf16 {r['bf16_ms']:.3f} ms, dequantise+cuBLAS "
              f"{r['dequantize_cublas_ms']:.3f}, gemv x16 slices {r['gemv_16_row_slices_ms']:.3f}")
    print(json.dumps(result["decode"], indent=1))
    assert all(r["int4_ms"] > 0 and r["int8_ms"] > 0 for r in result["matmul"])
