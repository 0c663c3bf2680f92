#!/usr/bin/env bash
# lmlab quick start: `bash scripts/quickstart.sh demo` or `bash scripts/quickstart.sh test`.
#
#   demo  create .venv (if needed), install lmlab, train the built-in demo model
#   test  (re)use .venv, install the test extras (transformers, trl, datasets, lm-eval, torchao, trackers,
#         submitit, pytest), run the suite
#
# CPU machines get torch==2.13.0 (CPU build) pinned through constraints/cpu.txt on every pip call.
# GPU machines: install the CUDA build of torch into .venv first (see pytorch.org), then run with
# LMLAB_TORCH=skip so this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-demo}"
shift || true
PY="${PYTHON:-python3}"
VENV="${LMLAB_VENV:-.venv}"
CONSTRAINTS="constraints/cpu.txt"

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "lmlab needs Python >= 3.11")'
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS" "$@"; }
if [ "${LMLAB_TORCH:-}" != "skip" ] && ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  echo "==> installing torch (pinned: $(grep -v '^#' $CONSTRAINTS))"
  pip_install torch==2.13.0
fi

case "$mode" in
  demo)
    echo "==> installing lmlab"
    pip_install -e .
    echo "==> training the demo (configs/demo.yaml)"
    exec "$VENV/bin/lmlab" train configs/demo.yaml --out "${LMLAB_DEMO_OUT:-runs/demo-$(date +%Y%m%d-%H%M%S)}" "$@"
    ;;
  test)
    echo "==> installing lmlab with test extras"
    pip_install -e ".[dev,hf,data,align,peft,qlora,eval,unlearn,tensorboard,wandb,mlflow,float8,slurm]"
    echo "==> lint (ruff)"
    "$VENV/bin/ruff" check src tests benchmarks examples
    echo "==> running the test suite"
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    # pytest exits 5 when it collects no test: that is a failure here, not a pass.
    exec "$VENV/bin/python" -m pytest -q -n "${LMLAB_TEST_WORKERS:-2}" --durations=15 "$@"
    ;;
  *)
    echo "usage: bash scripts/quickstart.sh {demo|test} [args]" >&2
    exit 2
    ;;
esac
