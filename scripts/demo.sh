#!/usr/bin/env bash
# The whole chain on the built-in world, CPU: base -> SFT -> RM -> DPO, PPO -> one evaluation table; then CAI.
# Usage: bash scripts/demo.sh [out_dir]   (make demo builds data/toy first)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out}
PY=${PY:-python}
D=data/toy
mkdir -p "$OUT"
step() { echo; echo "=== $* ==="; }

step "1. pre-train a tiny base model on the world's raw text"
$PY sft.py --format text --init tiny --data $D/pretrain.txt --out "$OUT/base.pt" --steps 800 --log "$OUT/base.log.jsonl"

step "2. SFT on chats (ChatML, assistant-only loss); and the no-template ablation"
$PY sft.py --model "$OUT/base.pt" --data $D/sft.jsonl --out "$OUT/sft.pt" --steps 300 --lr 5e-4 --seq-len 384 \
    --log "$OUT/sft.log.jsonl"
$PY sft.py --model "$OUT/base.pt" --data $D/sft.jsonl --out "$OUT/sft_plain.pt" --steps 300 --lr 5e-4 --seq-len 384 \
    --template plain

step "3. reward model (Bradley-Terry) on the noisy preference labels"
$PY reward.py --model "$OUT/sft.pt" --data $D/prefs.jsonl --out "$OUT/rm.pt" --gold data/toyworld.py:gold_reward \
    --log "$OUT/rm.log.jsonl"

step "4. DPO from SFT"
$PY dpo.py --model "$OUT/sft.pt" --data $D/prefs.jsonl --out "$OUT/dpo.pt" --log "$OUT/dpo.log.jsonl"

step "5. PPO from SFT against the learned reward model"
$PY ppo.py --model "$OUT/sft.pt" --reward-model "$OUT/rm.pt" --data $D/prompts.jsonl --out "$OUT/ppo.pt" \
    --eval-data $D/eval.jsonl,$D/redteam.jsonl --log "$OUT/ppo.log.jsonl"

step "6. evaluate every checkpoint (greedy; win rate vs SFT judged by the reward model, both orders)"
$PY evaluate.py --model "$OUT/base.pt,$OUT/sft.pt,$OUT/dpo.pt,$OUT/ppo.pt" --data $D/eval.jsonl \
    --redteam $D/redteam.jsonl --mc $D/mc.jsonl --scorer data/toyworld.py:gold_reward \
    --correct data/toyworld.py:is_correct --safety data/toyworld.py:is_safe \
    --baseline "$OUT/sft.pt" --reward-model "$OUT/rm.pt" --ref "$OUT/sft.pt" --out "$OUT/results.json" \
    | tee "$OUT/results.md"

step "7. the no-template ablation: base and plain-SFT prompted as 'User: ...\\nAssistant: '"
$PY evaluate.py --model "$OUT/base.pt,$OUT/sft_plain.pt" --no-chat-template --data $D/eval.jsonl \
    --redteam $D/redteam.jsonl --scorer data/toyworld.py:gold_reward --correct data/toyworld.py:is_correct \
    --safety data/toyworld.py:is_safe --no-speed --out "$OUT/results_plain.json" | tee "$OUT/results_plain.md"

step "8. perplexity on the world's raw text (first 64 windows)"
$PY evaluate.py --model "$OUT/base.pt,$OUT/sft.pt,$OUT/dpo.pt,$OUT/ppo.pt" --text $D/pretrain.txt --limit 64 \
    --no-speed --out "$OUT/results_ppl.json" | tee "$OUT/results_ppl.md"

step "9. sampled (temperature 1), the policies' actual distributions"
$PY evaluate.py --model "$OUT/sft.pt,$OUT/dpo.pt,$OUT/ppo.pt" --data $D/eval.jsonl --redteam $D/redteam.jsonl \
    --scorer data/toyworld.py:gold_reward --correct data/toyworld.py:is_correct --safety data/toyworld.py:is_safe \
    --temperature 1 --no-speed --out "$OUT/results_t1.json" | tee "$OUT/results_t1.md"

step "10. Constitutional AI: red-teaming, SL-CAI, RL-CAI and plain safety SFT (scripts/cai_world.sh, out/cai/)"
PY=$PY bash scripts/cai_world.sh "$OUT"
