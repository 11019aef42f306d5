#!/usr/bin/env bash
# Train with torchrun (no ssh needed; run once per node, e.g. from SLURM):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/torchrun.sh CONFIG [NPROC_PER_NODE] [DS_CONFIG]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh
CONFIG=${1:?usage: launch/torchrun.sh CONFIG [NPROC_PER_NODE] [DS_CONFIG]}
NPROC=${2:-$(default_nproc)}
DS_CONFIG=${3:-$(default_ds_config)}
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m debater train "$CONFIG" --deepspeed "$DS_CONFIG"
