#!/usr/bin/env bash
# Everything the open issues need from a GPU, in one call of the device tool (at most ~8.5 minutes: each step's limit below):
#
#   run(command="bash scripts/gpu_check.sh", timeout_s=560)     # then give_back; the figures come back in $OUT
#
#   1. kernels.cu (issue 13): built by kernels.py, its tests (every kernel against its twin, QuantLinear on CUDA
#      against the CPU reference, greedy tokens through the kernels), then its benchmark -> $OUT/kernels.json
#   2. FP8 (issue 24): _scaled_mm against its reference, then FP8 vs bf16 matmul and decode -> $OUT/fp8.json
# Then, if device time is left, the suite's CUDA paths (issue 18) in a second call:
#   run(command="python3 -m pytest -q tests/test_model.py tests/test_quantize.py tests/test_sft.py -k 'cuda or compile'")
# Each step has its own time limit, so one that hangs leaves the rest their time; every log lands in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}
mkdir -p "$OUT" out/bench
PY=python3
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, its output to the screen and $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "=== $name (at most ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tail -n 400 > "$OUT/$name.txt"
  echo "=== $name: exit ${PIPESTATUS[0]}"
  tail -n 25 "$OUT/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv > "$OUT/gpu.txt"; cat "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
step build 150 $PY kernels.py
step test_kernels 90 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py
step bench_kernels 120 $PY -m pytest -q -s -m slow -p no:cacheprovider tests/test_bench_kernels.py
cp out/bench/kernels.json "$OUT/" 2>/dev/null
step test_fp8 45 $PY -m pytest -q -p no:cacheprovider tests/test_fp8.py -k "scaled_mm or cuda"
step fp8 90 sh -c "$PY scripts/fp8_gpu.py > $OUT/fp8.json"
echo "=== done"
