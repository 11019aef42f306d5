#!/usr/bin/env bash
# Train on one machine: launch/single_node.sh CONFIG [NPROC] [DS_CONFIG] [--set KEY=VALUE ...]
# Without a CUDA GPU it runs NPROC CPU ranks over gloo with the fp32 ZeRO-2 config.
# Arguments after DS_CONFIG go to `python -m debater train` (e.g. --set per_device_train_batch_size=128).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh
CONFIG=${1:?usage: launch/single_node.sh CONFIG [NPROC] [DS_CONFIG] [--set KEY=VALUE ...]}
NPROC=${2:-$(default_nproc)}
DS_CONFIG=${3:-$(default_ds_config)}
PORT=${MASTER_PORT:-29500}
stop_ranks() { eval "$(ranks_stop_command 127.0.0.1 "$PORT")"; }
run_stoppable stop_ranks deepspeed --num_gpus "$NPROC" --master_port "$PORT" \
  --module debater train "$CONFIG" --deepspeed "$DS_CONFIG" "${@:4}"
