#!/usr/bin/env bash
# POROver on the safety world (docs/science.md §29.5), one command: a refusal-rich teacher SFT run ->
# overgenerate (judged) -> student SFT on the kept replies -> preference pairs -> DPO -> lmlab eval safety.
# Usage: bash examples/safety/porover.sh OUT_DIR [STEPS]   (CPU-sized defaults; raise STEPS on a GPU)
set -euo pipefail
OUT=${1:?usage: porover.sh OUT_DIR [STEPS]}
STEPS=${2:-200}
TINY=(model.d_model=64 model.n_layers=2 model.n_heads=2 model.max_seq_len=96 train.seq_len=96
      train.micro_batch_size=16 train.progress=false schedule.warmup_steps=0 tokenizer.vocab_size=400 optim.lr=3e-3)
mkdir -p "$OUT"
lmlab data safety --out "$OUT/data" --train 1000 --val 100 --test 200
echo "name: porover" > "$OUT/sft.yaml"
lmlab sft "$OUT/sft.yaml" --out "$OUT/teacher" sft.train_file="$OUT/data/train.jsonl" \
    sft.val_file="$OUT/data/val.jsonl" sft.refusal_tokens=single "${TINY[@]}" train.steps="$STEPS" --quiet
lmlab safety overgenerate "$OUT/teacher" --out "$OUT/og" --n 400 --samples 4 --temperature 1.0
lmlab sft "$OUT/sft.yaml" --out "$OUT/student" sft.train_file="$OUT/og/sft.jsonl" sft.refusal_tokens=single \
    tokenizer.path="$OUT/teacher/tokenizer.json" "${TINY[@]}" train.steps="$STEPS" --quiet
lmlab safety pairs "$OUT/og/samples.jsonl" --out "$OUT/og/pairs.jsonl" --refusal-tokens single
cat > "$OUT/align.yaml" <<YAML
init_from: $OUT/student
optim: {lr: 0.0005}
schedule: {name: constant}
train: {steps: 100, micro_batch_size: 8, eval_every: 100, ckpt_every: 100, progress: false}
align: {train_file: $OUT/og/pairs.jsonl, loss: dpo, beta: 0.1, max_prompt_len: 48, max_len: 96}
YAML
lmlab align "$OUT/align.yaml" --out "$OUT/po" --quiet
for run in teacher student po; do
    lmlab eval safety "$OUT/$run" --data "$OUT/data/test.jsonl" --out "$OUT/eval_$run"
done
