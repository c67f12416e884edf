#!/usr/bin/env bash
# Distillation on the built-in world (issue 15, part a). The teacher is the demo's sft.pt recipe (tiny, 821k params:
# 800 pre-training steps on pretrain.txt, 300 SFT steps); the student is tiny at half the width (d_model 64, d_ff 192:
# 214k params, 26% of the teacher), pre-trained the same 800 steps. From the student's base, the same STEPS of plain
# SFT (sft.py) and of distillation from the teacher (distill.py: forward KL, reverse KL, JSD(0.5); off-policy on the
# data's chats and on-policy with --lmbda 1), same data, batches, learning rate and schedule; then every model
# greedy on eval.jsonl (evaluate.py: gold reward, accuracy) and the fraction of the teacher - SFT-student gap that
# each KD student closes.
#   usage: bash scripts/distill_toy.sh OUT [STEPS]      (builds data/toy if missing; a stage whose output exists in
#          OUT is reused, so a second run only evaluates; TEACHER=out/demo/sft.pt takes make demo's teacher instead of
#          training one, ~10 of the ~35 minutes on 2 busy cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/distill}
STEPS=${2:-300}
PY=${PY:-python}
D=data/toy
# one thread per process: on a machine whose cores are busy, two torch threads per process oversubscribe them (a
# tiny training step measured 10x slower); on an idle machine OMP_NUM_THREADS=2 is faster
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
[ -f $D/sft.jsonl ] || $PY data/toyworld.py --seed 0 --out $D
T0=$(date +%s)
stage() {  # stage OUT_FILE COMMAND...: run the command unless OUT_FILE exists, and say how long it took
    local out=$1 t=$(date +%s)
    shift
    if [ -f "$out" ]; then echo "=== reusing $out"; return; fi
    echo "=== $out"
    "$@"
    echo "    $(( $(date +%s) - t )) s"
}

if [ -n "${TEACHER:-}" ]; then
    [ -f "$OUT/teacher.pt" ] || cp "$TEACHER" "$OUT/teacher.pt"
else
    stage "$OUT/base.pt" $PY sft.py --format text --init tiny --data $D/pretrain.txt --out "$OUT/base.pt" --steps 800
    stage "$OUT/teacher.pt" $PY sft.py --model "$OUT/base.pt" --data $D/sft.jsonl --out "$OUT/teacher.pt" \
        --steps 300 --lr 5e-4
fi
stage "$OUT/student_init.pt" $PY -c "import sys, torch, common as C, model as M
enc = C.get_tokenizer('byte'); torch.manual_seed(0); student = M.build_model('tiny', enc, d_model=64, d_ff=192)
C.save_checkpoint(sys.argv[1], student, enc, lineage=['init:tiny:d_model=64,d_ff=192'])" "$OUT/student_init.pt"
stage "$OUT/student_base.pt" $PY sft.py --format text --model "$OUT/student_init.pt" --data $D/pretrain.txt \
    --out "$OUT/student_base.pt" --steps 800

COMMON="--data $D/sft.jsonl --steps $STEPS --lr 5e-4 --eval-every 0"
KD="$PY distill.py --teacher $OUT/teacher.pt --model $OUT/student_base.pt $COMMON"
stage "$OUT/sft.pt" $PY sft.py --model "$OUT/student_base.pt" $COMMON --out "$OUT/sft.pt" --log "$OUT/sft.log.jsonl"
for loss in forward reverse jsd; do
    stage "$OUT/kd_$loss.pt" $KD --loss $loss --out "$OUT/kd_$loss.pt" --log "$OUT/kd_$loss.log.jsonl"
    stage "$OUT/gkd_$loss.pt" $KD --loss $loss --lmbda 1 --out "$OUT/gkd_$loss.pt" --log "$OUT/gkd_$loss.log.jsonl"
done

MODELS="$OUT/teacher.pt,$OUT/student_base.pt,$OUT/sft.pt"
for loss in forward reverse jsd; do MODELS="$MODELS,$OUT/kd_$loss.pt,$OUT/gkd_$loss.pt"; done
echo "=== evaluate"
$PY evaluate.py --model "$MODELS" --data $D/eval.jsonl --scorer data/toyworld.py:gold_reward \
    --correct data/toyworld.py:is_correct --no-speed --out "$OUT/eval.json" > "$OUT/eval.md"
$PY - "$OUT" "$STEPS" <<'EOF' | tee "$OUT/table.md"
import json, os, sys
out, steps = sys.argv[1], sys.argv[2]
rows = {os.path.basename(r["model"])[:-3]: r for r in json.load(open(os.path.join(out, "eval.json")))["results"]}
names = {"teacher": "teacher (821k params)", "student_base": "student base, no SFT (214k params)",
         "sft": f"student + SFT, {steps} steps"}
for loss in ("forward", "reverse", "jsd"):
    names[f"kd_{loss}"] = f"student + KD {loss}, off-policy"
    names[f"gkd_{loss}"] = f"student + KD {loss}, on-policy (--lmbda 1)"
teacher, sft = rows["teacher"], rows["sft"]
print("| model | gold_reward | accuracy | gap closed (gold) | gap closed (accuracy) |\n|---|---:|---:|---:|---:|")
for key, name in names.items():
    r = rows[key]
    gaps = ["" if key in ("teacher", "student_base", "sft") or teacher[m] == sft[m]
            else f"{(r[m] - sft[m]) / (teacher[m] - sft[m]):.0%}" for m in ("gold_reward", "accuracy")]
    print(f"| {name} | {r['gold_reward']:.3f} | {r['accuracy']:.3f} | {gaps[0]} | {gaps[1]} |")
EOF
echo "total: $(( $(date +%s) - T0 )) s"
