#!/usr/bin/env bash
# Device session 4: the GPU-only tests and a GPU end-to-end run (bf16 + compile, resume, fp16 + scaler).
export PYTHONPATH=$PWD/src LMLAB_CACHE=/tmp/lmc PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
O=/tmp/o; mkdir -p $O
timeout 200 python3 -m pytest -q -p no:cacheprovider -n 8 tests/unit/objectives tests/unit/models tests/unit/train tests/unit/distributed/test_dist_switches.py -rs > $O/gpu_tests.log 2>&1
echo "pytest exit $?" >> $O/gpu_tests.log
timeout 120 python3 -m lmlab train configs/demo.yaml --out /tmp/gdemo train.device=cuda train.precision=bf16 train.compile=true train.micro_batch_size=64 train.progress=false > $O/gpu_demo.log 2>&1; echo "exit $?" >> $O/gpu_demo.log
timeout 60 python3 -m lmlab train --resume /tmp/gdemo train.steps=650 --quiet >> $O/gpu_demo.log 2>&1; echo "resume exit $?" >> $O/gpu_demo.log
cp /tmp/gdemo/summary.json $O/gpu_demo_summary.json 2>/dev/null
timeout 60 python3 -m lmlab train configs/demo.yaml --out /tmp/gfp16 train.device=cuda train.precision=fp16 train.steps=60 train.eval_every=60 train.progress=false > $O/gpu_fp16.log 2>&1; echo "exit $?" >> $O/gpu_fp16.log
cd $O && tar czf $OUT/results.tgz . && tail -5 gpu_tests.log && grep -E "final validation|exit|resumed" gpu_demo.log gpu_fp16.log
