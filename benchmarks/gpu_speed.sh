#!/usr/bin/env bash
# Every GPU measurement and GPU-only test of issue 16 ("speed to quality"), in one run of <= ~10 minutes on one
# H100/H200. Results land in ${OUT:-gpu-results}/ (JSON + markdown + pytest log); copy the tables into RESULTS.md.
#
#   bash benchmarks/gpu_speed.sh            # on the GPU machine, from the repository root, .venv installed
#
# Budget (one H100, measured per step where known): GPU tests ~1 min; suite 124m+350m with compile=full and the
# fused loss vs HF Trainer ~4 min (compilation included); float8 vs bf16 at 350m ~1.5 min; decode ~2 min.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
run() { local name="$1"; shift; echo "==> $name: $*"; timeout "${STEP_TIMEOUT:-240}" "$@" >"$OUT/$name.log" 2>&1; echo "    exit $?"; tail -n 25 "$OUT/$name.log"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# 1. GPU-only tests: CUDA-graph decode == eager static decode, float8 loss ~ bf16, everything marked gpu.
run tests "$PY" -m pytest -q tests/unit/models/test_static_cache.py tests/unit/test_float8.py
run tests_gpu "$PY" -m pytest -q -m gpu tests/unit
# 2. MFU: whole step compiled (embedding, blocks, head, fused loss) vs HF Trainer, bf16, sequence 1024.
run suite_full "$PY" benchmarks/suite.py --gpu-only --gpu-sizes 124m,350m --gpu-batch 16 --gpu-impls lmlab,hf_trainer \
  --gpu-compile full --gpu-loss-impl fused --gpu-steps 10 --gpu-reps 2 --json "$OUT/suite_full.json" --markdown "$OUT/suite_full.md"
# 3. The previous configuration (per-block compile, standard loss) in the same session, for the ratio.
run suite_blocks "$PY" benchmarks/suite.py --gpu-only --gpu-sizes 124m,350m --gpu-batch 16 --gpu-impls lmlab \
  --gpu-compile blocks --gpu-loss-impl standard --gpu-steps 10 --gpu-reps 2 --json "$OUT/suite_blocks.json" --markdown "$OUT/suite_blocks.md"
# 4. float8 (torchao) at 350m, whole step compiled.
run suite_float8 "$PY" benchmarks/suite.py --gpu-only --gpu-sizes 350m --gpu-batch 16 --gpu-impls lmlab \
  --gpu-compile full --gpu-loss-impl fused --gpu-float8 --gpu-steps 10 --gpu-reps 2 --json "$OUT/suite_float8.json" --markdown "$OUT/suite_float8.md"
# 5. Decode: dynamic, static, static + CUDA graphs (+ compiled blocks) vs transformers' generate (dynamic, static).
run decode "$PY" benchmarks/decode.py --device cuda --sizes 124m --batches 1,8 --reps 3 --json "$OUT/decode.json"
# 6. Architecture variants (issue 14): MoE vs dense and vs HF's Mixtral block; sliding / S2 / packed documents as
#    dense-mask SDPA and as FlexAttention block masks vs dense SDPA; top-k vs dense decode at long caches.
run architectures "$PY" benchmarks/architectures.py --device cuda --d-model 1024 --hidden 2816 --layers 8 --batch 8 \
  --seq 1024 --attn-seqs 2048,8192 --cache-lengths 16384,65536 --decode-batch 8 --json "$OUT/architectures.json"
echo "==> done: $OUT"
