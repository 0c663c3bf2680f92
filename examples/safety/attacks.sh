#!/usr/bin/env bash
# GCG vs random suffixes on a tiny safety-tuned model, then the perplexity filter and retokenization against them
# (docs/science.md §29.1-29.3). Usage: bash examples/safety/attacks.sh OUT_DIR [SEED]
set -euo pipefail
OUT=${1:?usage: attacks.sh OUT_DIR [SEED]}
SEED=${2:-0}
TINY=(model.d_model=64 model.n_layers=2 model.n_heads=2 model.max_seq_len=96 train.seq_len=96
      train.micro_batch_size=16 train.progress=false schedule.warmup_steps=0 tokenizer.vocab_size=400 optim.lr=3e-3)
mkdir -p "$OUT"
lmlab data safety --out "$OUT/data" --seed "$SEED" --train 600 --val 20 --test 200
echo "name: attacks" > "$OUT/sft.yaml"
lmlab sft "$OUT/sft.yaml" --out "$OUT/sft" sft.train_file="$OUT/data/train.jsonl" sft.val_file="$OUT/data/val.jsonl" \
    sft.refusal_tokens=single "${TINY[@]}" train.steps=150 train.seed="$SEED" --quiet
lmlab safety gcg "$OUT/sft" --out "$OUT" --data "$OUT/data/test.jsonl" --n 10 --steps 10 --batch 32 --top-k 32 \
    --suffix-len 8 --target "[respond] Sure" --seed "$SEED"
lmlab safety filter "$OUT/sft" --attacks "$OUT/attacks.json" --out "$OUT" --data "$OUT/data/test.jsonl"
lmlab safety retokenize "$OUT/sft" --attacks "$OUT/attacks.json" --out "$OUT" --data "$OUT/data/test.jsonl" \
    --p 0,0.1,0.3 --seed "$SEED"
