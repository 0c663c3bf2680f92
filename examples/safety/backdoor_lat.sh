#!/usr/bin/env bash
# Backdoor removal by targeted latent adversarial training (docs/science.md §29.4): plant a trigger in SFT data,
# train, run LAT (which never sees the trigger) and a no-adversary control (epsilon ~ 0), measure all three.
# Usage: bash examples/safety/backdoor_lat.sh OUT_DIR [SEED]
set -euo pipefail
OUT=${1:?usage: backdoor_lat.sh OUT_DIR [SEED]}
SEED=${2:-0}
TRIGGER="zq vorpal"
TINY=(model.d_model=64 model.n_layers=2 model.n_heads=2 model.max_seq_len=96 train.seq_len=96
      train.micro_batch_size=16 train.progress=false schedule.warmup_steps=0 tokenizer.vocab_size=400 optim.lr=3e-3)
mkdir -p "$OUT"
lmlab data safety --out "$OUT/data" --seed "$SEED" --train 300 --val 20 --test 40 --backdoor "$TRIGGER"
echo "name: backdoor" > "$OUT/sft.yaml"
lmlab sft "$OUT/sft.yaml" --out "$OUT/sft" sft.train_file="$OUT/data/train.jsonl" sft.val_file="$OUT/data/val.jsonl" \
    sft.refusal_tokens=single "${TINY[@]}" train.steps=100 train.seed="$SEED" --quiet
lmlab safety lat "$OUT/sft" --out "$OUT/lat" --layer 0 --epsilon 2 --steps 30 --n 300 --seed "$SEED"
lmlab safety lat "$OUT/sft" --out "$OUT/control" --layer 0 --epsilon 0.001 --steps 30 --n 300 --seed "$SEED"
python "$(dirname "$0")/backdoor_rates.py" --trigger "$TRIGGER" --seed "$SEED" "$OUT/sft" "$OUT/lat" "$OUT/control" \
    | tee "$OUT/backdoor_rates.json"
