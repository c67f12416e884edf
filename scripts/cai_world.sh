#!/usr/bin/env bash
# Constitutional AI on the built-in world: red-teaming, SL-CAI and RL-CAI from the demo's SFT model, beside plain
# safety SFT on the world's gold replies to the same prompts for the same steps; then one evaluation table,
# sampled (temperature 1, the policies' actual distributions) and greedy.
# Usage: bash scripts/cai_world.sh [out_dir]   (needs out_dir/base.pt and out_dir/sft.pt, e.g. copied from out/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out}
PY=${PY:-python}
D=data/toy
CAI=$OUT/cai
mkdir -p "$CAI"
GOLD=(--scorer data/toyworld.py:gold_reward --correct data/toyworld.py:is_correct --safety data/toyworld.py:is_safe)
step() { echo; echo "=== $* ==="; }

step "1. the baseline: plain safety SFT on the gold replies to the same prompts, the same steps as SL-CAI"
[ -f "$CAI/safety.pt" ] || $PY sft.py --model "$OUT/sft.pt" --data $D/safety.jsonl --out "$CAI/safety.pt" --steps 60 \
    --lr 2e-4 --seq-len 512 --eval-frac 0 --log "$CAI/safety.log.jsonl"

step "2. red-team (the base model fine-tuned on the seed attacks, few-shot), SL-CAI (4 rounds), RL-CAI (soft-label DPO)"
$PY cai.py --model "$OUT/sft.pt" --red-team-model "$OUT/base.pt" --attacker-steps 100 --out-dir "$CAI" \
    --judge data/toyworld.py:is_safe --revisions 4 --sl-steps 60 --rl-steps 100 --compare "$CAI/safety.pt"

MODELS="$OUT/sft.pt,$CAI/sl.pt,$CAI/rl.pt,$CAI/safety.pt"
step "3. harmlessness and helpfulness, sampled at temperature 1"
$PY evaluate.py --model "$MODELS" --data $D/eval.jsonl --redteam $D/redteam.jsonl "${GOLD[@]}" --temperature 1 \
    --no-speed --out "$CAI/results_t1.json" | tee "$CAI/results_t1.md"

step "4. the same, greedy"
$PY evaluate.py --model "$MODELS" --data $D/eval.jsonl --redteam $D/redteam.jsonl "${GOLD[@]}" --no-speed \
    --out "$CAI/results.json" | tee "$CAI/results.md"
