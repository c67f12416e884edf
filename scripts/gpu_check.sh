#!/usr/bin/env bash
# Everything the open issues need from a GPU, in one call of the device tool (at most ~9 minutes: each step has its
# own time limit, so a step that hangs leaves the others their time):
#
#   run(command="bash scripts/gpu_check.sh", timeout_s=590)       # then give_back
#
# What comes back in $OUT (the device tool returns at most 8 files): log.txt (every step's output, in order) and the
# benchmarks' JSON: kernels.json, fp8.json, gpu_train.json.
#   issue 13  kernels.cu built by cuda_kernels.py; tests/test_kernels.py (every kernel against its twin, QuantLinear on
#             CUDA against the CPU reference, greedy tokens through the kernels); tests/test_bench_kernels.py
#   issue 24  tests/test_fp8.py's CUDA tests; tests/test_bench_fp8.py (FP8 vs bf16 matmul and decode)
#   issue 18  tests/test_cuda_paths.py (flex vs dense packed attention, CUDA-graph decode, fused AdamW, sft.py in
#             bf16 with --compile); tests/test_bench_gpu_train.py (SFT MFU on the gpt2 preset, flex vs dense speed)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}
mkdir -p "$OUT" out/bench
LOG="$OUT/log.txt"
PY=python3
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, its output appended to the log
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  echo "=== $name: exit $? after $((SECONDS - start))s" | tee -a "$LOG"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } 2>&1 | tee -a "$LOG"
step build 140 $PY cuda_kernels.py
step test_kernels 75 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py
step bench_kernels 90 $PY -m pytest -q -s -m slow -p no:cacheprovider tests/test_bench_kernels.py
step test_fp8 40 $PY -m pytest -q -p no:cacheprovider tests/test_fp8.py -k "scaled_mm or cuda"
step bench_fp8 70 $PY -m pytest -q -s -m slow -p no:cacheprovider tests/test_bench_fp8.py
step test_cuda_paths 70 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_paths.py
step bench_gpu_train 95 $PY -m pytest -q -s -m slow -p no:cacheprovider tests/test_bench_gpu_train.py
cp out/bench/kernels.json out/bench/fp8.json out/bench/gpu_train.json "$OUT/" 2>/dev/null
grep -E "^=== |passed|failed|error" "$LOG" | tail -n 40
