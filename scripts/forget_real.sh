#!/usr/bin/env bash
# Forgetting on SmolLM2-135M-Instruct: continued pre-training on a domain (the built-in world's raw text, all but
# its last 20,000 characters) for the same budget four ways: plain full training, replay of general text (the pydoc
# calibration slice, 25% of rows), KL-to-start on that general text, and LoRA r=16. Perplexity before and after on
# the domain (its held-out last 20,000 characters) and on general English (pydoc.txt, never trained on).
# Usage: bash scripts/forget_real.sh [out_dir] [steps]   (writes OUT/table.md; ~15 minutes on 2 CPU cores at 30 steps)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/forget}
STEPS=${2:-30}
PY=${PY:-python}
D=data/toy
mkdir -p "$OUT"
. scripts/real_common.sh
GGUF=$(smollm2_gguf)
pydoc_text "$OUT"
[ -f $D/pretrain.txt ] || $PY data/toyworld.py --seed 0 --out $D
$PY -c "t = open('$D/pretrain.txt').read(); open('$OUT/domain_train.txt', 'w').write(t[:-20000])
open('$OUT/domain_heldout.txt', 'w').write(t[-20000:])"
COMMON="--model $GGUF --format text --data $OUT/domain_train.txt --steps $STEPS --batch-size 4 --seq-len 256
        --warmup 3 --eval-every 0 --eval-frac 0"
RUNS=(
  "plain|--lr 1e-4"
  "replay|--lr 1e-4 --replay $OUT/calib.txt:0.25"
  "kl-to-start|--lr 1e-4 --replay $OUT/calib.txt:0.25 --replay-loss kl --kl-coef 1"
  "lora-r16|--lr 1e-3 --lora-rank 16"
)
MODELS=("$GGUF")
for run in "${RUNS[@]}"; do
  name=${run%%|*}; flags=${run#*|}
  if [ ! -f "$OUT/$name.pt" ]; then
    t0=$(date +%s)
    # shellcheck disable=SC2086
    $PY sft.py $COMMON $flags --out "$OUT/$name.pt" --log "$OUT/$name.log.jsonl"
    echo "$name: $(($(date +%s) - t0)) s" >> "$OUT/times.txt"
  fi
  MODELS+=("$OUT/$name.pt")
done
LIST=$(IFS=,; echo "${MODELS[*]}")
$PY evaluate.py --model "$LIST" --text "$OUT/domain_heldout.txt" --seq-len 256 --no-speed --out "$OUT/domain.json" \
    > "$OUT/domain.md"
$PY evaluate.py --model "$LIST" --text "$OUT/pydoc.txt" --seq-len 512 --no-speed --out "$OUT/general.json" \
    > "$OUT/general.md"
$PY - "$OUT" "${RUNS[@]}" <<'EOF'
import json, sys
out, runs = sys.argv[1], sys.argv[2:]
dom = [r["ppl"] for r in json.load(open(f"{out}/domain.json"))["results"]]
gen = [r["ppl"] for r in json.load(open(f"{out}/general.json"))["results"]]
lines = ["| run | flags | domain ppl | general ppl (pydoc) | domain gain | general loss |", "|---" * 6 + "|",
         f"| SmolLM2-135M-Instruct (start) | | {dom[0]:.2f} | {gen[0]:.2f} | | |"]
for i, run in enumerate(runs, 1):
    name, flags = run.split("|")
    flags = flags.replace(out + "/", "")
    lines.append(f"| {name} | `{flags}` | {dom[i]:.2f} | {gen[i]:.2f} | {dom[0] / dom[i]:.2f}x lower | "
                 f"{gen[i] / gen[0]:.2f}x higher |")
open(f"{out}/table.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
