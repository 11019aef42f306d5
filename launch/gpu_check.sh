#!/usr/bin/env bash
# `make gpu-check`. With a CUDA GPU: install what the wheelhouse carried (docs/gpu-check.md) into a folder of
# this machine's python3, within the set-up's limit (benchmarks/gpu_budget.py), and run the check there with
# that folder first on the path. Without one: the smoke run, in .venv. The budget's clock starts here, so the
# set-up is inside the measured total. Arguments go to `python -m benchmarks gpu_check` (--out, --steps, --smoke,
# --gguf, --training-deadline-s).
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_CHECK_STARTED=$(date +%s.%N)
export GPU_CHECK_STARTED
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
    echo "gpu-check: nvidia-smi sees a GPU but $(command -v python3) has no CUDA torch: put the python3 that has" \
         "it first on PATH" >&2; exit 1; }
  SITE=${GPU_CHECK_SITE:-/tmp/gpu-check-site}
  timeout -k 5 "$(python3 -m benchmarks.gpu_budget setup)" python3 -m debater.wheelhouse unpack --site "$SITE"
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
  exec python3 -m benchmarks gpu_check "$@"
fi
make -s setup
exec .venv/bin/python -m benchmarks gpu_check "$@"
