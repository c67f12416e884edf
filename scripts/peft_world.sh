#!/usr/bin/env bash
# PEFT on the built-in world: the same SFT (300 steps, batch 16, seq-len 384, packed) from the same base, full
# fine-tuning against LoRA r=8, DoRA r=8, prefix p=16 (P-tuning v2), prefix-mlp p=16 (Li & Liang) and prompt p=16;
# each evaluated greedy on eval.jsonl (gold reward, accuracy). Writes OUT/table.md and OUT/table.json.
# Usage: bash scripts/peft_world.sh [out_dir] [base.pt]   (base: make demo's out/demo/base.pt, else trained here as demo
# step 1 does). About 20 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/peft}
BASE=${2:-$OUT/base.pt}
PY=${PY:-python}
D=data/toy
STEPS=${STEPS:-300}
mkdir -p "$OUT"
[ -f $D/sft.jsonl ] || $PY data/toyworld.py --seed 0 --out $D
if [ ! -f "$BASE" ]; then
  $PY sft.py --format text --init tiny --data $D/pretrain.txt --out "$BASE" --steps 800 --log "$OUT/base.log.jsonl"
fi
# name | flags (learning rates: the usual ratios, adapters ~4x full fine-tuning, prefixes and prompts ~20x)
RUNS=(
  "full|--lr 5e-4"
  "lora-r8|--lora-rank 8 --lr 2e-3"
  "dora-r8|--peft dora --lora-rank 8 --lr 2e-3"
  "prefix-p16|--peft prefix --peft-len 16 --lr 1e-2"
  "prefix-mlp-p16|--peft prefix-mlp --peft-len 16 --lr 1e-3"
  "prompt-p16|--peft prompt --peft-len 16 --lr 1e-2"
)
MODELS=()
for run in "${RUNS[@]}"; do
  name=${run%%|*}; flags=${run#*|}
  if [ ! -f "$OUT/$name.pt" ]; then
    # shellcheck disable=SC2086
    $PY sft.py --model "$BASE" --data $D/sft.jsonl --out "$OUT/$name.pt" --steps "$STEPS" --seq-len 384 $flags \
        --log "$OUT/$name.log.jsonl"
  fi
  MODELS+=("$OUT/$name.pt")
done
$PY evaluate.py --model "$(IFS=,; echo "${MODELS[*]}")" --data $D/eval.jsonl --scorer data/toyworld.py:gold_reward \
    --correct data/toyworld.py:is_correct --no-speed --out "$OUT/results.json" > "$OUT/results.md"
$PY - "$OUT" "$BASE" "${RUNS[@]}" <<'EOF'
import json, shlex, statistics, sys
import common as C
out, base, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
results = json.load(open(f"{out}/results.json"))
rows = {r["model"]: r for r in results["results"]}
table = []
for run in runs:
    name, flags = run.split("|")
    args = dict(zip(*[iter(shlex.split(flags))] * 2))
    rank = int(args.get("--lora-rank", 0))
    model = C.apply_peft(C.load_model(base)[0], args.get("--peft", "lora" if rank else ""), rank,
                         peft_len=int(args.get("--peft-len", 0)))
    log = [json.loads(line) for line in open(f"{out}/{name}.log.jsonl")]
    r = rows.get(f"{out}/{name}.pt", {})
    table.append({"run": name, "flags": flags, "trainable_params": model.num_params(trainable=True),
                  "peak_rss_mb": log[-1].get("peak_rss_mb"), "s_per_step": statistics.median(x["step_s"] for x in log[1:]),
                  "final_loss": log[-1]["loss"], "gold": r.get("gold_reward"), "accuracy": r.get("accuracy")})
json.dump(table, open(f"{out}/table.json", "w"), indent=1)
lines = ["| run | flags | trainable params | peak RSS MB | s/step | final loss | gold | accuracy |", "|---" * 8 + "|"]
for t in table:
    fmt = lambda v, f: "n/a" if v is None else format(v, f)
    lines.append(f"| {t['run']} | `{t['flags']}` | {t['trainable_params']:,} | {fmt(t['peak_rss_mb'], '.0f')} | "
                 f"{t['s_per_step']:.3f} | {t['final_loss']:.3f} | {fmt(t['gold'], '.3f')} | {fmt(t['accuracy'], '.3f')} |")
open(f"{out}/table.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
