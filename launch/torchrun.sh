#!/usr/bin/env bash
# Train with torchrun (no ssh needed; run once per node, e.g. from SLURM):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/torchrun.sh CONFIG [NPROC_PER_NODE] [DS_CONFIG] [--set KEY=VALUE ...]
set -euo pipefail
LAUNCHER=torchrun
source "$(dirname "$0")/common.sh"
config_nproc_ds "launch/torchrun.sh CONFIG [NPROC_PER_NODE] [DS_CONFIG] [--set KEY=VALUE ...]" "$@"
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m debater train "$CONFIG" --deepspeed "$DS_CONFIG" "${TRAIN_ARGS[@]}"
