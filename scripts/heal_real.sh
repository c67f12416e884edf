#!/usr/bin/env bash
# Healing a structurally pruned SmolLM2-135M-Instruct on the world (issue 15 b): the LoRA-SFT model of make
# real-model (FP, world accuracy ~0.5) pruned by Minitron to half its width (calibrated on its own chats), then healed
# STEPS steps on the world's chats two ways at the same lr, batch and data: distillation from FP (distill.py, forward
# KL at the assistant's tokens) and plain SFT (sft.py, cross-entropy on the same tokens). Each evaluated by its
# perplexity on the pydoc text and the world's accuracy and gold reward on LIMIT eval prompts.
#   usage: scripts/heal_real.sh OUT FP [STEPS] [LIMIT] [LR]
#   e.g.   scripts/heal_real.sh out/heal out/real/sft.pt 24 96 3e-4
# An output already in OUT is kept, not made again: rerun the same command after an interruption.
set -euo pipefail
OUT=${1:-out/heal}
FP=${2:-out/real/sft.pt}
STEPS=${3:-24}
LIMIT=${4:-96}
LR=${5:-3e-4}
PY=${PY:-python}
D=data/toy
mkdir -p "$OUT"
[ -e "$FP" ] || { echo "$FP: missing (run scripts/real_model.sh first)"; exit 2; }
. "$(dirname "$0")/real_common.sh"
pydoc_text "$OUT"
timed width $PY prune.py --model "$FP" --method minitron --structure width --target 0.5 --data $D/sft.jsonl \
    --format chat --calib-samples 32 --calib-len 512 --eval-samples 0 --out "$OUT/width.pt"
HEALING="--data $D/sft.jsonl --steps $STEPS --batch-size 4 --seq-len 256 --lr $LR --warmup 3 --eval-every 0"
# shellcheck disable=SC2086
timed width+kd $PY distill.py --teacher "$FP" --model "$OUT/width.pt" --out "$OUT/width+kd.pt" --loss forward \
    $HEALING --log "$OUT/width+kd.jsonl"
# shellcheck disable=SC2086
timed width+sft $PY sft.py --model "$OUT/width.pt" --out "$OUT/width+sft.pt" $HEALING --log "$OUT/width+sft.jsonl"
[ -f "$OUT/eval.json" ] || $PY evaluate.py --model "$FP,$OUT/width.pt,$OUT/width+kd.pt,$OUT/width+sft.pt" \
    --text "$OUT/pydoc.txt" --seq-len 512 --batch-size 8 --no-speed --data $D/eval.jsonl \
    --scorer data/toyworld.py:gold_reward --correct data/toyworld.py:is_correct --limit "$LIMIT" --out "$OUT/eval.json"
