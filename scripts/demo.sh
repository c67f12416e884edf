#!/usr/bin/env bash
# The whole chain on the built-in world, CPU: base -> SFT -> RM -> DPO, PPO -> one evaluation table.
# Usage: bash scripts/demo.sh [out_dir]   (make demo builds data/toy first)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out}
PY=${PY:-python}
D=data/toy
mkdir -p "$OUT"
step() { echo; echo "=== $* ==="; }

step "1. pre-train a tiny base model on the world's raw text"
$PY sft.py --format text --init tiny --data $D/pretrain.txt --out "$OUT/base.pt" --steps 600 --log "$OUT/base.log.jsonl"

step "2. SFT on chats (ChatML, assistant-only loss); and the no-template ablation"
$PY sft.py --model "$OUT/base.pt" --data $D/sft.jsonl --out "$OUT/sft.pt" --steps 300 --log "$OUT/sft.log.jsonl"
$PY sft.py --model "$OUT/base.pt" --data $D/sft.jsonl --out "$OUT/sft_plain.pt" --steps 300 --template plain

step "3. reward model (Bradley-Terry) on the noisy preference labels"
$PY reward.py --model "$OUT/sft.pt" --data $D/prefs.jsonl --out "$OUT/rm.pt" --log "$OUT/rm.log.jsonl"

step "4. DPO from SFT"
$PY dpo.py --model "$OUT/sft.pt" --data $D/prefs.jsonl --out "$OUT/dpo.pt" --log "$OUT/dpo.log.jsonl"

step "5. PPO from SFT against the learned reward model"
$PY ppo.py --model "$OUT/sft.pt" --reward-model "$OUT/rm.pt" --data $D/prompts.jsonl --out "$OUT/ppo.pt" \
    --eval-data $D/eval.jsonl --log "$OUT/ppo.log.jsonl"

step "6. evaluate every checkpoint"
$PY evaluate.py --model "$OUT/base.pt,$OUT/sft.pt,$OUT/dpo.pt,$OUT/ppo.pt" --data $D/eval.jsonl \
    --redteam $D/redteam.jsonl --mc $D/mc.jsonl --scorer data/toyworld.py:gold_reward \
    --correct data/toyworld.py:is_correct --safety data/toyworld.py:is_safe --reward-model "$OUT/rm.pt" \
    --ref "$OUT/sft.pt" --out "$OUT/results.json" | tee "$OUT/results.md"
