"""
cuda_kernels.py: kernels.cu from Python, the CUDA weight-only int4 / int8 matmul that quantize.py's QuantLinear runs on
a GPU (not named kernels.py: transformers imports Hugging Face's `kernels` package by that name). Each kernel has a
PyTorch twin with the same signature (`gemv_ref`, `dequantize_ref`): what the tests hold the kernels to, computed in
fp32 from the packed bytes by a second, independent reading of quantize.py's layout.

    y = cuda_kernels.int_matmul(x, qweight, scales, zeros, bits=4, group_size=128)  # quantize.py's packed layout, CUDA
    python cuda_kernels.py                   # build kernels.cu and load it, or say why it cannot be
    python cuda_kernels.py --compile-only    # nvcc -c kernels.cu with PyTorch's flags, link, load: no GPU needed (CI)

The extension is built on first use by torch.utils.cpp_extension.load (about a minute, one line on stderr while it
compiles; cached under ~/.cache/post-training/, rebuilt when kernels.cu changes). Where it cannot be built or run
(no CUDA device, no nvcc), `load()` returns None, QuantLinear falls back quietly to dequantise-then-matmul, and
`why_not()` says why (as in mamba and llm.c: the fallback speaks only when asked).

What the kernels take (`check` says which rule an input breaks, in one line): bits 4 or 8; a group size that is a
multiple of 32 (int4) or 16 (int8), the codes of one 16-byte load, and that divides K; fp16 or bf16 activations for
gemv, 1 to 16 rows; every tensor contiguous, 16-byte aligned, on one CUDA device.
"""

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import torch
import torch.nn.functional as F

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.cu")
NAME = "post_training_kernels"
MAX_ROWS = 16  # gemv's activation rows (kernels.cu's MAX_M); more rows go through dequantize + a cuBLAS matmul
CODES = {4: 32, 8: 16}  # codes in one 16-byte load of each width: a group is a whole number of loads


# -----------------------------------------------------------------------------
# The twins: the kernels' results in fp32 from the packed bytes (this block can be copied alone)


def unpack_ref(qweight, bits):
    """qweight uint8 (N, K * bits / 8) -> codes uint8 (N, K): int4 byte k is column 2k (low nibble) and 2k + 1."""
    if bits == 8:
        return qweight
    return torch.stack([qweight & 0xF, qweight >> 4], -1).flatten(1)  # (N, K/2, 2) -> (N, K)


def dequantize_ref(qweight, scales, zeros, bits, group_size, dtype=torch.float32):
    """kernels.cu's dequantize: W (N, K) = (code - zero) * scale, group by group, in fp32 (exact: 9-bit codes times
    11-bit scales), then rounded once to dtype."""
    codes = unpack_ref(qweight, bits).float()
    s = scales.float().repeat_interleave(group_size, 1)  # (N, K / g) -> (N, K)
    z = zeros.float().repeat_interleave(group_size, 1)
    return ((codes - z) * s).to(dtype)


def gemv_ref(x, qweight, scales, zeros, bits, group_size):
    """kernels.cu's gemv: y (M, N) = x (M, K) W^T with fp32 products and sums, rounded once to x's dtype."""
    return (x.float() @ dequantize_ref(qweight, scales, zeros, bits, group_size).t()).to(x.dtype)


# -----------------------------------------------------------------------------
# What the kernels take


def layout_refusal(bits, group_size, in_features):
    """Why kernels.cu cannot take a layer of this layout, or None when it can."""
    if bits not in CODES:
        return f"bits must be 4 or 8, not {bits}"
    if group_size % CODES[bits] or in_features % group_size:
        return (f"the group size must be a multiple of {CODES[bits]} (int{bits}) that divides the inputs: "
                f"{group_size} with {in_features} inputs")
    return None


def check(x, qweight, scales, zeros, bits, group_size, rows=MAX_ROWS):
    """ValueError naming the first rule kernels.cu's gemv / dequantize would refuse (x None: dequantize). The
    device comes last, so a CPU machine can test every other rule."""
    if bits not in CODES:
        raise ValueError(f"kernels: bits must be 4 or 8, not {bits}")
    if qweight.dim() != 2:
        raise ValueError(f"kernels: qweight must be 2-D (N, K * bits / 8), got {tuple(qweight.shape)}")
    N, K = qweight.shape[0], qweight.shape[1] * 8 // bits
    why = layout_refusal(bits, group_size, K)
    if why:
        raise ValueError(f"kernels: {why}")
    G = K // group_size
    expect = [("qweight", qweight, torch.uint8, (N, K * bits // 8)), ("scales", scales, torch.float16, (N, G)),
              ("zeros", zeros, torch.uint8, (N, G))]
    if x is not None:
        if x.dim() != 2 or not 1 <= x.shape[0] <= rows:
            raise ValueError(f"kernels: gemv takes x of 1 to {rows} rows (M, K), got {tuple(x.shape)}")
        if x.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"kernels: gemv takes fp16 or bf16 activations, got {x.dtype}")
        if x.shape[1] != K:
            raise ValueError(f"kernels: x has {x.shape[1]} columns, the packed weight {K} ({N} x {K} at {bits} bits)")
        expect.insert(0, ("x", x, x.dtype, tuple(x.shape)))
    for name, t, dtype, shape in expect:
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"kernels: {name} must be {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"kernels: {name} must be contiguous")
        if t.data_ptr() % 16:
            raise ValueError(f"kernels: {name} must be 16-byte aligned (its storage starts {t.data_ptr() % 16} bytes "
                             f"past a multiple of 16: a slice? .clone() it)")
    devices = {t.device for _, t, _, _ in expect}
    if len(devices) > 1 or next(iter(devices)).type != "cuda":
        raise ValueError(f"kernels: every tensor must be on one CUDA device, got {sorted(map(str, devices))}")


# -----------------------------------------------------------------------------
# Building and calling kernels.cu

_ext, _why = None, None


def build_directory():
    """Where the built extension is cached: one folder per torch and CUDA version (TORCH_EXTENSIONS_DIR overrides)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/post-training")
    return os.path.join(root, f"{NAME}-torch{torch.__version__}-cuda{torch.version.cuda}")


def load():
    """The extension, built the first time it is asked for; None where it cannot be (why_not() says why)."""
    global _ext, _why
    if _ext is None and _why is None:
        try:
            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device")
            from torch.utils import cpp_extension
            folder = build_directory()
            built = os.path.join(folder, NAME + ".so")
            if not os.path.exists(built) or os.path.getmtime(built) < os.path.getmtime(SOURCE):
                print("cuda_kernels.py: compiling kernels.cu (about a minute, once)", file=sys.stderr)
            os.makedirs(folder, exist_ok=True)
            _ext = cpp_extension.load(NAME, [SOURCE], extra_cuda_cflags=["-O3"], build_directory=folder)
        except Exception as e:  # any failure to build or load means the fallback; the reason is kept for why_not()
            _why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return _ext


def why_not():
    """Why the kernels do not run here, or None when they do."""
    load()
    return _why


def _extension():
    ext = load()
    if ext is None:
        raise RuntimeError(f"kernels.cu is not available: {_why}")
    return ext


def gemv(x, qweight, scales, zeros, bits, group_size):
    """kernels.cu's gemv: y (M, N) = x (M, K) W^T for 1 <= M <= 16 rows of fp16 / bf16 activations."""
    check(x, qweight, scales, zeros, bits, group_size)
    return _gemv(x, qweight, scales, zeros, bits, group_size)


def dequantize(qweight, scales, zeros, bits, group_size, dtype=torch.float32):
    """kernels.cu's dequantize: W (N, K) in dtype (fp16, bf16 or fp32)."""
    check(None, qweight, scales, zeros, bits, group_size)
    return _dequantize(qweight, scales, zeros, bits, group_size, dtype)


# The launches, unchecked here: kernels.cu's host functions check again what memory safety needs (in C++, at a
# fraction of the Python checks' cost, which would otherwise be most of a decode step's time)


def _gemv(x, qweight, scales, zeros, bits, group_size):
    y = torch.empty(x.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device)
    with torch.cuda.device(x.device):  # the launch goes to this device's current stream
        _extension().gemv(x, qweight, scales, zeros, y, bits, group_size, torch.cuda.current_stream().cuda_stream)
    return y


def _dequantize(qweight, scales, zeros, bits, group_size, dtype):
    w = torch.empty(qweight.shape[0], qweight.shape[1] * 8 // bits, dtype=dtype, device=qweight.device)
    with torch.cuda.device(qweight.device):
        _extension().dequantize(qweight, scales, zeros, w, bits, group_size, torch.cuda.current_stream().cuda_stream)
    return w


@torch.library.custom_op("post_training::int_matmul", mutates_args=())
def int_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
               group_size: int) -> torch.Tensor:
    """x (..., K) -> y (..., N) in x's dtype, W packed: the gemv at up to 16 rows (fp32 activations rounded to bf16
    for it, as torch's CPU kernels round them), else W dequantised to x's dtype and one cuBLAS matmul (where the
    rows cross over is what `make bench` measures: tests/test_bench_kernels.py). A torch custom op, so
    torch.compile keeps it whole in its graphs (generate(compile=True), CUDA graphs included)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] > MAX_ROWS:
        y = F.linear(x2, _dequantize(qweight, scales, zeros, bits, group_size, x.dtype))
    else:
        xk = x2 if x2.dtype in (torch.float16, torch.bfloat16) else x2.to(torch.bfloat16)
        if not xk.is_contiguous() or xk.data_ptr() % 16:
            xk = xk.clone(memory_format=torch.contiguous_format)  # a fresh allocation is aligned
        y = _gemv(xk, qweight, scales, zeros, bits, group_size).to(x.dtype)
    return y.view(*x.shape[:-1], qweight.shape[0])


@int_matmul.register_fake
def _(x, qweight, scales, zeros, bits, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


# -----------------------------------------------------------------------------
# The compile check: what CI runs where nvcc is installed, with or without a GPU or a CUDA build of PyTorch


def nvcc_command(obj, arch="90"):
    """nvcc -c kernels.cu with the flags torch.utils.cpp_extension.load builds it with (its PyTorch part included),
    and ptxas's resource report (-Xptxas -v)."""
    from torch.utils import cpp_extension
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    return (["nvcc", "-c", SOURCE, "-o", obj, "-O3", "-std=c++20", "-Xcompiler", "-fPIC", "-Xptxas", "-v",
             f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-DTORCH_EXTENSION_NAME={NAME}",
             "-DTORCH_API_INCLUDE_EXTENSION_H"] + cpp_extension.COMMON_NVCC_FLAGS + [f"-I{p}" for p in includes])


def link_and_load(obj):
    """The compiled object linked against the installed torch and the CUDA runtime, imported, and its host functions
    called with CPU tensors, which each must refuse in one line: the PyTorch bindings build, link and load, with no
    GPU and with the CPU build of torch (they use no part of PyTorch's CUDA libraries). -> the refusals."""
    from torch.utils import cpp_extension
    lib = os.path.join(os.path.dirname(obj), NAME + "_check.so")
    nvcc = os.path.realpath(shutil.which("nvcc") or "nvcc")  # (a wrapper script resolves to itself: then CUDA_HOME)
    cuda_home = os.environ.get("CUDA_HOME") or os.path.dirname(os.path.dirname(nvcc))
    cuda_lib = next((p for p in (os.path.join(cuda_home, "lib64"), "/usr/local/cuda/lib64")
                     if os.path.exists(os.path.join(p, "libcudart.so"))), os.path.join(cuda_home, "lib64"))
    torch_lib = cpp_extension.library_paths()[0]
    subprocess.run(["g++", "-shared", obj, "-o", lib, f"-L{torch_lib}", "-lc10", "-ltorch", "-ltorch_cpu",
                    "-ltorch_python", f"-L{cuda_lib}", "-lcudart", f"-Wl,-rpath,{torch_lib}", f"-Wl,-rpath,{cuda_lib}"],
                   check=True)
    spec = importlib.util.spec_from_file_location(NAME, lib)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    x, y = torch.zeros(2, 128, dtype=torch.bfloat16), torch.zeros(2, 8, dtype=torch.bfloat16)
    q, z = torch.zeros(8, 64, dtype=torch.uint8), torch.zeros(8, 4, dtype=torch.uint8)
    s = torch.ones(8, 4, dtype=torch.float16)
    calls = [("a CPU tensor", lambda: ext.gemv(x, q, s, z, y, 4, 32, 0), "x must be a CUDA tensor"),
             ("17 rows", lambda: ext.gemv(torch.zeros(17, 128, dtype=torch.bfloat16), q, s, z, y, 4, 32, 0),
              "gemv takes 1 to 16 rows"),
             ("fp32 activations", lambda: ext.gemv(x.float(), q, s, z, y, 4, 32, 0), "fp16 or bf16 activations"),
             ("dequantize to the CPU", lambda: ext.dequantize(q, s, z, torch.zeros(8, 128), 4, 32, 0),
              "w must be a CUDA tensor")]
    refusals = []
    for what, call, expect in calls:
        try:
            call()
            raise RuntimeError(f"kernels.cu's host functions took {what}")
        except RuntimeError as e:
            if expect not in str(e):
                raise
            refusals.append(str(e).splitlines()[0])
    return refusals


def resources(ptxas_report):
    """ptxas -v's report -> {kernel: {"registers", "spill_bytes", "smem_bytes"}}."""
    out, name = {}, None
    for line in ptxas_report.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:  # a mangled template name -> e.g. gemv<bf16, int4, 16 rows>
            kind = "gemv" if "gemv_kernel" in m.group(1) else "dequantize"
            dtype = "bf16" if "bfloat16" in m.group(1) else "fp32" if "kernelIfLi" in m.group(1) else "fp16"
            ints = re.findall(r"Li(\d+)E", m.group(1))
            name = f"{kind}<{dtype}, int{ints[0]}" + (f", {ints[1]} rows>" if len(ints) > 1 else ">")
            out[name] = {"registers": 0, "spill_bytes": 0, "smem_bytes": 0}
        elif name and "spill stores" in line:
            out[name]["spill_bytes"] = int(re.search(r"(\d+) bytes spill stores", line).group(1))
        elif name and "Used" in line:
            out[name]["registers"] = int(re.search(r"Used (\d+) registers", line).group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            out[name]["smem_bytes"] = int(smem.group(1)) if smem else 0
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compile-only", action="store_true", help="nvcc -c kernels.cu (no GPU, no CUDA PyTorch needed)")
    p.add_argument("--arch", default="90", help="compute capability to compile for with --compile-only (90: Hopper)")
    args = p.parse_args(argv)
    if args.compile_only:
        obj = os.path.join(build_directory(), "compile-check.o")
        os.makedirs(os.path.dirname(obj), exist_ok=True)
        proc = subprocess.run(nvcc_command(obj, args.arch), capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"kernels.cu does not compile:\n{proc.stdout}{proc.stderr}")
        table = resources(proc.stderr + proc.stdout)
        for name, r in table.items():
            print(f"{name:32s} {r['registers']:4d} registers {r['spill_bytes']:3d} B spilled "
                  f"{r['smem_bytes']:6d} B shared")
        print(f"kernels.cu compiles for sm_{args.arch}: {len(table)} kernels")
        for refusal in link_and_load(obj):
            print(f"  refused, as it must be: {refusal}")
        print("its PyTorch bindings link against this torch, load, and check their inputs")
        return
    ext = load()
    print(f"kernels.cu loaded from {build_directory()}" if ext else f"kernels.cu not available: {why_not()}")


if __name__ == "__main__":
    main()
