#!/usr/bin/env bash
# One device session: mixture study sweep on the GPU, GPU benchmark suite, CPU benchmarks on 2 pinned cores.
export PYTHONPATH=$PWD/src LMLAB_CACHE=/tmp/lmc PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
O=/tmp/o; mkdir -p $O
lscpu | grep -E "Model name|Flags" | grep -o "Model name.*\|amx_bf16\|avx512_bf16" | sort -u > $O/cpu.txt
# CPU: throughput (issue 2 item 12) on cores 0,1; suite CPU rows (HF Trainer, memory, 2 gloo ranks) on cores 2,3
(taskset -c 0,1 timeout 500 python3 benchmarks/throughput.py --sizes 7m,25m --dtypes fp32,bf16 --threads 2 --batch 8 --steps 3 --reps 3 --json $O/throughput_cpu.json > $O/throughput_cpu.md 2>&1) &
(taskset -c 2,3 timeout 500 python3 benchmarks/suite.py --cpu-only --cpu-sizes 7m --cpu-dtypes fp32 --threads 2 --nproc 2 --dist-threads 1 --steps 3 --reps 3 --json $O/suite_cpu.json --markdown $O/suite_cpu.md > $O/suite_cpu.log 2>&1) &
# GPU chain on cores 4-15
taskset -c 4-15 timeout 80 python3 -m lmlab train configs/mixture/base.yaml --out /tmp/warm train.steps=21 train.device=cpu data.num_workers=8 --quiet > $O/warm.log 2>&1
taskset -c 4-15 timeout 130 python3 -m lmlab sweep configs/mixture/mixture_sweep.yaml --out /tmp/sw/mixture --jobs 6 > $O/mixture.log 2>&1
tar czf $OUT/mixture.tgz --exclude=checkpoints --exclude='*.png' -C /tmp/sw mixture
taskset -c 4-15 timeout 150 python3 benchmarks/suite.py --gpu-only --gpu-sizes 124m --json $O/suite_gpu124.json --markdown $O/suite_gpu124.md > $O/suite_gpu124.log 2>&1
taskset -c 4-15 timeout 150 python3 benchmarks/suite.py --gpu-only --gpu-sizes 350m --json $O/suite_gpu350.json --markdown $O/suite_gpu350.md > $O/suite_gpu350.log 2>&1
wait
cd $O && tar czf $OUT/results.tgz . && ls -la $O $OUT && tail -30 suite_gpu124.md suite_gpu350.md throughput_cpu.md 2>/dev/null | cut -c1-300
