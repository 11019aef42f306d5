#!/usr/bin/env bash
# Train on one machine: launch/single_node.sh CONFIG [NPROC] [DS_CONFIG] [--set KEY=VALUE ...]
# Without a CUDA GPU it runs NPROC CPU ranks over gloo with the fp32 ZeRO-2 config. Arguments from the first
# option on go to `python -m debater train` (e.g. --set per_device_train_batch_size=128), with or without
# NPROC and DS_CONFIG before them. Paths are read from the directory it is run in.
set -euo pipefail
LAUNCHER=deepspeed
source "$(dirname "$0")/common.sh"
config_nproc_ds "launch/single_node.sh CONFIG [NPROC] [DS_CONFIG] [--set KEY=VALUE ...]" "$@"
PORT=${MASTER_PORT:-29500}
stop_ranks() { eval "$(ranks_stop_command 127.0.0.1 "$PORT")"; }
run_stoppable stop_ranks deepspeed --num_gpus "$NPROC" --master_port "$PORT" \
  --module debater train "$CONFIG" --deepspeed "$DS_CONFIG" "${TRAIN_ARGS[@]}"
