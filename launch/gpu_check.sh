#!/usr/bin/env bash
# `make gpu-check`. With a CUDA GPU: install what the wheelhouse parcels carried (README, "GPU check") into a
# folder of this machine's python3, convert the model once, and run the check there. Without one: the smoke
# run, in .venv. Arguments go to `python -m benchmarks gpu_check` (--out, --steps, --budget-s, --smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  SITE=${GPU_CHECK_SITE:-/tmp/gpu-check-site}
  python3 -m debater.wheelhouse unpack --site "$SITE"
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
  python3 -m debater convert-model --gguf wheelhouse/unpacked/model/*.gguf
  exec python3 -m benchmarks gpu_check "$@"
fi
make -s setup
exec .venv/bin/python -m benchmarks gpu_check "$@"
