#!/usr/bin/env bash
# make real-qat: quantisation-aware training of SmolLM2-135M-Instruct after SFT, on two CPU cores. Starts from the
# GPTQ checkpoints of scripts/quantize_real.sh (QUANT: W4 g128, W3 g128; W4A8 g128 made here, with its RTN baseline),
# trains each STEPS steps toward the float model's distributions (self-distillation, forward KL) on DATA, and
# evaluates fp, PTQ (RTN, GPTQ) and QAT: perplexity on the pydoc text and the world's accuracy.
#   usage: scripts/qat_real.sh OUT FP QUANT [STEPS] [LIMIT] [LR] [DATA]
#   e.g.   scripts/qat_real.sh out/qat60 out/real/sft.pt out/quant-sft 60 96 2e-4 text      (make real-qat)
# DATA: text (the pydoc text after the part measured, every token scored: what torchao trains on), chat (the world's
# chats, the assistant's tokens) or both (each setting trained twice).
# An output already in OUT is kept, not made again: rerun the same command after an interruption.
set -euo pipefail
OUT=${1:-out/qat60}
FP=${2:-out/real/sft.pt}
QUANT=${3:-out/quant-sft}
STEPS=${4:-60}
LIMIT=${5:-96}
LR=${6:-2e-4}
DATA=${7:-text}
case $DATA in text|chat|both) ;; *) echo "DATA: text, chat or both, not $DATA"; exit 2;; esac
PY=${PY:-python}
D=data/toy
mkdir -p "$OUT"
for f in "$FP" "$QUANT/pydoc.txt" "$QUANT/calib.txt" "$QUANT/rtn-w4g128.pt" "$QUANT/gptq-w4g128.pt" \
         "$QUANT/rtn-w3g128.pt" "$QUANT/gptq-w3g128.pt"; do
  [ -e "$f" ] || { echo "$f: missing (run scripts/real_model.sh, then scripts/quantize_real.sh $QUANT $FP)"; exit 2; }
done
ptq() {  # name, then quantize.py flags: the W4A8 baselines
  [ -f "$OUT/$1.pt" ] && return
  local name=$1; shift
  $PY quantize.py --model "$FP" --data "$QUANT/calib.txt" --calib-samples 32 --calib-len 512 --eval-samples 0 \
      --out "$OUT/$name.pt" "$@"
}
ptq rtn-w4a8g128 --method rtn --bits 4 --group-size 128 --act-bits 8
ptq gptq-w4a8g128 --method gptq --bits 4 --group-size 128 --act-bits 8
MODELS=$OUT/rtn-w4a8g128.pt,$OUT/gptq-w4a8g128.pt  # and every QAT model train() makes or keeps
train() {  # name, start, then qat.py flags
  local name=$1 start=$2; shift 2
  MODELS=$MODELS,$OUT/$name.pt
  if [ -f "$OUT/$name.pt" ]; then echo "$name: kept from an earlier run"; return; fi
  local t0; t0=$(date +%s)
  $PY qat.py --model "$start" --teacher "$FP" --data $D/sft.jsonl --out "$OUT/$name.pt" --steps "$STEPS" \
      --batch-size 4 --seq-len 256 --lr "$LR" --warmup 5 --eval-every 0 --log "$OUT/$name.jsonl" "$@"
  echo "$name ($STEPS steps): $(( $(date +%s) - t0 )) s" | tee -a "$OUT/times.txt"
}
TEXT="--data $QUANT/calib.txt --format text"
for setting in w4g128 w3g128 w4a8g128; do
  case $setting in
    w4g128) start=$QUANT/gptq-w4g128.pt; flags="--bits 4 --group-size 128";;
    w3g128) start=$QUANT/gptq-w3g128.pt; flags="--bits 3 --group-size 128";;
    w4a8g128) start=$OUT/gptq-w4a8g128.pt; flags="--bits 4 --group-size 128 --act-bits 8";;
  esac
  # shellcheck disable=SC2086
  [ "$DATA" = text ] || train "qat-$setting" "$start" $flags
  # shellcheck disable=SC2086
  [ "$DATA" = chat ] || train "qat-$setting-text" "$start" $flags $TEXT
done
# the fp and the W4 / W3 PTQ rows are quantize_real.sh's ($QUANT/eval.json: the same prompts, the same settings)
[ -f "$OUT/eval.json" ] || $PY evaluate.py --model "$MODELS" --text "$QUANT/pydoc.txt" --seq-len 512 --batch-size 8 \
    --no-speed --dequantize --data $D/eval.jsonl --scorer data/toyworld.py:gold_reward \
    --correct data/toyworld.py:is_correct --limit "$LIMIT" --out "$OUT/eval.json"
# the table, and the share of PTQ's loss QAT recovers: (PTQ - QAT) / (PTQ - fp), for perplexity and accuracy
$PY - "$FP" "$QUANT/eval.json" "$OUT/eval.json" <<'PYEOF'
import json, os, sys
rows = {os.path.basename(r["model"]).removesuffix(".pt"): r for f in sys.argv[2:] for r in json.load(open(f))["results"]}
fp = rows[os.path.basename(sys.argv[1]).removesuffix(".pt")]
print("| setting | model | ppl | accuracy | gold_reward | recovered (ppl) vs RTN / GPTQ | recovered (acc) vs RTN / GPTQ |")
print("|---|---|---:|---:|---:|---:|---:|")
print(f"| float | {sys.argv[1]} | {fp['ppl']:.2f} | {fp['accuracy']:.3f} | {fp['gold_reward']:.3f} | | |")
for setting in ("w4g128", "w3g128", "w4a8g128"):
    for kind in ("rtn", "gptq", "qat", "qat-text"):
        name = f"qat-{setting}-text" if kind == "qat-text" else f"{kind}-{setting}"
        if name not in rows:
            continue
        r = rows[name]
        share = ""
        if kind.startswith("qat"):
            def rec(key, sign):
                out = []
                for base in ("rtn", "gptq"):
                    gap = sign * (rows[f"{base}-{setting}"][key] - fp[key])
                    out.append(f"{sign * (rows[f'{base}-{setting}'][key] - r[key]) / gap:.0%}" if gap > 0 else "n/a")
                return " / ".join(out)
            share = f"{rec('ppl', 1)} | {rec('accuracy', -1)}"
        else:
            share = " | "
        print(f"| {setting} | {kind} | {r['ppl']:.2f} | {r['accuracy']:.3f} | {r['gold_reward']:.3f} | {share} |")
PYEOF
