#!/usr/bin/env bash
# Learning from its own samples on the built-in world, one budget: every trained method starts from the same SFT
# checkpoint and samples 3,072 responses from its own policy while it trains (offline DPO samples none: its 2,000
# pairs come from the world's labellers); best-of-n samples N per evaluated prompt and trains nothing.
#   rs-ft          3 rounds x 256 prompts x 4 samples, best by the RM, 16 SFT steps (8 rows) per round, lr 1e-4
#   iterative DPO  3 rounds x 256 prompts x 4 samples, best vs worst by the RM, 32 DPO steps (16 pairs) per round
#   online DPO     96 steps x 16 prompts x 2 samples, labelled by the RM, the gold reward, or the policy itself
#   offline DPO    96 steps x 16 pairs of data/toy/prefs.jsonl
#   PPO            192 steps x 16 prompts x 1 sample, RM reward;   GRPO   96 steps x 8 prompts x 4 samples, RM
# Every DPO variant: sigmoid loss, beta 0.1, lr 5e-5, 96 steps of 16 pairs. Evaluated at temperature 1 (the
# policies' own distributions) on eval.jsonl (gold reward, accuracy) and redteam.jsonl (safety), KL to SFT along
# those samples (kl_ref; best-of-n: kl_bon = log N - (N-1)/N); online methods also at 1/3 and 2/3 of their steps
# (the gold-vs-KL figure). Seeds 0 1 2 (training and evaluation sampling). Writes OUT/table.md, OUT/table.json,
# OUT/labels.md, OUT/curve.md and OUT/gold_vs_kl.svg.
# Usage: bash scripts/self_world.sh [out_dir] [sft.pt] [rm.pt]   (trained here by demo steps 1-3 when absent)
# About 90 minutes on 2 busy CPU cores (3 seeds).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/self}
SFT=${2:-$OUT/sft.pt}
RM=${3:-$OUT/rm.pt}
SEEDS=${SEEDS:-0 1 2}
PY=${PY:-python}
D=data/toy
mkdir -p "$OUT"
[ -f $D/sft.jsonl ] || $PY data/toyworld.py --seed 0 --out $D
if [ ! -f "$SFT" ]; then
  [ -f "$OUT/base.pt" ] || $PY sft.py --format text --init tiny --data $D/pretrain.txt --out "$OUT/base.pt" --steps 800
  $PY sft.py --model "$OUT/base.pt" --data $D/sft.jsonl --out "$SFT" --steps 300 --lr 5e-4 --seq-len 384
fi
[ -f "$RM" ] || $PY reward.py --model "$SFT" --data $D/prefs.jsonl --out "$RM" --gold data/toyworld.py:gold_reward

GOLD=data/toyworld.py:gold_reward
EVAL=(--data $D/eval.jsonl --redteam $D/redteam.jsonl --scorer $GOLD --correct data/toyworld.py:is_correct
      --safety data/toyworld.py:is_safe --temperature 1 --no-speed)
DPO=(--loss sigmoid --beta 0.1 --lr 5e-5)

# legs NAME TOTAL CMD...: run CMD (a training command without --out/--stop-at/--resume) to TOTAL steps in three
# legs, keeping the checkpoint after each (NAME.1.pt, NAME.2.pt, NAME.pt): the figure's points and a resume test
legs() {
  local name=$1 total=$2; shift 2
  for k in 1 2 3; do
    local at=$((total * k / 3)) keep="$name.$k.pt"
    [ $k = 3 ] && keep="$name.pt"
    [ -f "$keep" ] && continue
    local resume=()
    [ $k -gt 1 ] && resume=(--resume "$name.run.pt")
    "$@" --out "$name.run.pt" --stop-at $at "${resume[@]}" --log "$name.log.jsonl"
    cp "$name.run.pt" "$keep"
  done
}

for s in $SEEDS; do
  R=$OUT/seed$s
  mkdir -p "$R"
  echo "=== seed $s ==="
  [ -f "$R/dpo.pt" ] || $PY dpo.py --model "$SFT" --data $D/prefs.jsonl --out "$R/dpo.pt" --steps 96 --batch-size 16 \
      "${DPO[@]}" --kl-prompts 0 --seed "$s" --log "$R/dpo.log.jsonl"
  $PY online.py --mode rsft --model "$SFT" --reward-model "$RM" --n 4 --rounds 3 --prompts-per-round 256 \
      --steps 16 --batch-size 8 --lr 1e-4 --seed "$s" --out "$R/rsft.pt" --log "$R/rsft.log.jsonl"
  $PY online.py --mode iterative --model "$SFT" --reward-model "$RM" --n 4 --rounds 3 --prompts-per-round 256 \
      --steps 32 --batch-size 16 "${DPO[@]}" --seed "$s" --out "$R/iterative.pt" --log "$R/iterative.log.jsonl"
  for lab in rm gold self; do
    case $lab in
      rm) flags=(--reward-model "$RM") ;;
      gold) flags=(--reward $GOLD) ;;
      self) flags=(--judge self) ;;
    esac
    legs "$R/online-$lab" 96 $PY online.py --mode online --model "$SFT" "${flags[@]}" --steps 96 --batch-size 16 \
        "${DPO[@]}" --seed "$s"
  done
  legs "$R/ppo" 192 $PY ppo.py --model "$SFT" --reward-model "$RM" --steps 192 --batch-size 16 --seed "$s"
  legs "$R/grpo" 96 $PY ppo.py --model "$SFT" --reward-model "$RM" --advantage grpo --group-size 4 --batch-size 8 \
      --steps 96 --seed "$s"
  MODELS="$SFT,$R/dpo.pt,$R/rsft.pt,$R/iterative.pt"
  for m in online-rm online-gold online-self ppo grpo; do MODELS="$MODELS,$R/$m.1.pt,$R/$m.2.pt,$R/$m.pt"; done
  [ -f "$R/eval.json" ] || $PY evaluate.py --model "$MODELS" "${EVAL[@]}" --ref "$SFT" --seed "$s" \
      --out "$R/eval.json" > "$R/eval.md"
  for n in 4 16; do
    [ -f "$R/bon$n.json" ] || $PY evaluate.py --model "$SFT" "${EVAL[@]}" --best-of $n --best-by "$RM" --seed "$s" \
        --out "$R/bon$n.json" > "$R/bon$n.md"
  done
done

$PY - "$OUT" "$SFT" $SEEDS <<'EOF'
import json, math, statistics, sys
out, sft, seeds = sys.argv[1], sys.argv[2], sys.argv[3:]
METHODS = [("SFT (start)", "sft"), ("best-of-4, RM", "bon4"), ("best-of-16, RM", "bon16"), ("offline DPO", "dpo"),
           ("RS-FT, 3 rounds", "rsft"), ("iterative DPO, 3 rounds", "iterative"), ("online DPO, RM labels", "online-rm"),
           ("online DPO, gold labels", "online-gold"), ("online DPO, self-judged", "online-self"),
           ("PPO, RM", "ppo"), ("GRPO, RM", "grpo")]
SAMPLED = {"sft": 0, "bon4": 0, "bon16": 0, "dpo": 0}  # responses sampled while training; the rest: 3,072


def rows_of(seed):
    r = f"{out}/seed{seed}"
    got = {}
    for row in json.load(open(f"{r}/eval.json"))["results"]:
        name = "sft" if row["model"] == sft else row["model"][len(r) + 1:-3]
        got[name] = row
    for n in (4, 16):
        row = json.load(open(f"{r}/bon{n}.json"))["results"][0]
        got[f"bon{n}"] = {**row, "kl_ref": row["kl_bon"]}
    return got


per_seed = [rows_of(s) for s in seeds]
KEYS = ("gold_reward", "accuracy", "safety", "kl_ref")


def stat(name, key):
    xs = [r[name][key] for r in per_seed]
    return statistics.mean(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


table = []
for label, name in METHODS:
    entry = {"method": label, "name": name, "sampled": SAMPLED.get(name, 3072)}
    for key in KEYS:
        entry[key], entry[key + "_se"] = stat(name, key)
    table.append(entry)
json.dump({"seeds": seeds, "table": table}, open(f"{out}/table.json", "w"), indent=1)
lines = [f"| method | responses sampled in training | gold reward | accuracy | safety | KL to SFT (nats) |",
         "|---|---:|---:|---:|---:|---:|"]
for t in table:
    cells = [f"{t[k]:.3f} ± {t[k + '_se']:.3f}" for k in KEYS]
    lines.append(f"| {t['method']} | {t['sampled']:,} | " + " | ".join(cells) + " |")
open(f"{out}/table.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))

# labeller agreement with the gold ordering on the policy's own pairs, per round (online: per third of the run)
def agreement(records):
    a, c = sum(r.get("label_agree", 0) for r in records), sum(r.get("label_counted", 0) for r in records)
    return a / c if c else float("nan")


lab_lines = ["| labeller (run) | round / third 1 | 2 | 3 |", "|---|---:|---:|---:|"]
for label, name, per in (("reward model (iterative DPO)", "iterative", None), ("reward model (RS-FT)", "rsft", None),
                         ("reward model (online DPO)", "online-rm", 32), ("the policy itself (online DPO)",
                                                                         "online-self", 32)):
    cells = []
    for k in range(3):
        xs = []
        for s in seeds:
            recs = [json.loads(l) for l in open(f"{out}/seed{s}/{name}.log.jsonl")]
            if per is None:
                recs = [r for r in recs if r.get("round") == k + 1]
            else:
                recs = [r for r in recs if "label_counted" in r and k * per < r["step"] <= (k + 1) * per]
            xs.append(agreement(recs))
        se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
        cells.append(f"{statistics.mean(xs):.3f} ± {se:.3f}")
    lab_lines.append(f"| {label} | " + " | ".join(cells) + " |")
open(f"{out}/labels.md", "w").write("\n".join(lab_lines) + "\n")
print("\n".join(lab_lines))

# gold reward against KL for the online methods, at 1/3, 2/3 and all of their steps (means over seeds)
curve = {}
for label, name in METHODS:
    if name.startswith(("online", "ppo", "grpo")):
        pts = [(0.0, stat("sft", "gold_reward")[0])]
        for suffix in (".1", ".2", ""):
            pts.append((statistics.mean(r[name + suffix]["kl_ref"] for r in per_seed),
                        statistics.mean(r[name + suffix]["gold_reward"] for r in per_seed)))
        curve[label] = pts
c_lines = ["| method | start | 1/3 | 2/3 | end |", "|---|---|---|---|---|"]
for label, pts in curve.items():
    c_lines.append(f"| {label} | " + " | ".join(f"KL {k:.2f}, gold {g:.3f}" for k, g in pts) + " |")
open(f"{out}/curve.md", "w").write("\n".join(c_lines) + "\n")
print("\n".join(c_lines))
W, H, P = 640, 400, 50
kmax = max(k for pts in curve.values() for k, _ in pts) * 1.05 or 1
gs = [g for pts in curve.values() for _, g in pts]
gmin, gmax = min(gs) - 0.02, max(gs) + 0.02
X = lambda k: P + (W - 2 * P) * k / kmax
Y = lambda g: H - P - (H - 2 * P) * (g - gmin) / (gmax - gmin)
colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<line x1="{P}" y1="{H - P}" x2="{W - P}" y2="{H - P}" stroke="black"/>',
       f'<line x1="{P}" y1="{P}" x2="{P}" y2="{H - P}" stroke="black"/>',
       f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">KL to SFT (nats per response)</text>',
       f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" text-anchor="middle">gold reward (T = 1)</text>']
for i in range(5):
    k, g = kmax * i / 4, gmin + (gmax - gmin) * i / 4
    svg += [f'<text x="{X(k)}" y="{H - P + 16}" text-anchor="middle">{k:.1f}</text>',
            f'<text x="{P - 6}" y="{Y(g) + 4}" text-anchor="end">{g:.2f}</text>']
for (label, pts), colour, row in zip(curve.items(), colours, range(len(curve))):
    path = " ".join(f"{X(k):.1f},{Y(g):.1f}" for k, g in pts)
    svg += [f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>']
    svg += [f'<circle cx="{X(k):.1f}" cy="{Y(g):.1f}" r="3" fill="{colour}"/>' for k, g in pts]
    svg += [f'<text x="{W - P - 180}" y="{P + 16 * row}" fill="{colour}">{label}</text>']
open(f"{out}/gold_vs_kl.svg", "w").write("\n".join(svg + ["</svg>"]) + "\n")
print(f"wrote {out}/table.md, labels.md, curve.md, gold_vs_kl.svg")
EOF
