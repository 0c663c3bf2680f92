#!/usr/bin/env bash
# Device session 3: mixture study (two budgets), GPU suite at batch 8 and 16 after the sync-free step.
export PYTHONPATH=$PWD/src LMLAB_CACHE=/tmp/lmc PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
O=/tmp/o; mkdir -p $O
timeout 80 python3 -m lmlab train configs/mixture/base.yaml --out /tmp/warm train.steps=21 train.device=cpu data.num_workers=8 --quiet > $O/warm.log 2>&1
timeout 150 python3 -m lmlab sweep configs/mixture/mixture_sweep.yaml --out /tmp/sw/mixture --jobs 8 > $O/mixture.log 2>&1
tar czf $OUT/mixture.tgz --exclude=checkpoints --exclude='*.png' -C /tmp/sw mixture
for s in 124m 350m; do for b in 8 16; do
  timeout 100 python3 benchmarks/suite.py --gpu-only --gpu-sizes $s --gpu-batch $b --gpu-impls lmlab,hf_trainer --json $O/gpu_${s}_b$b.json --markdown $O/gpu_${s}_b$b.md > $O/gpu_${s}_b$b.log 2>&1
done; done
cd $O && tar czf $OUT/results.tgz . && ls $OUT && cat gpu_*.md | grep -E "^\| (124m|350m)"
