#!/usr/bin/env bash
# Train across nodes with DeepSpeed's launcher (pdsh over passwordless ssh to every host in the hostfile):
#   launch/multi_node.sh HOSTFILE CONFIG [DS_CONFIG] [--set KEY=VALUE ...]
# HOSTFILE lines look like "node1 slots=8". Run on the first host; MASTER_ADDR defaults to it. Every host must
# see this repository and the venv at the same path (a shared file system), as DeepSpeed's launcher assumes.
set -euo pipefail
LAUNCHER=deepspeed
source "$(dirname "$0")/common.sh"
USAGE="launch/multi_node.sh HOSTFILE CONFIG [DS_CONFIG] [--set KEY=VALUE ...]"
launch_args "$USAGE" 3 "$@"
HOSTFILE=${POSITIONAL[0]:?usage: $USAGE}
CONFIG=${POSITIONAL[1]:?usage: $USAGE}
DS_CONFIG=${POSITIONAL[2]:-$(default_ds_config)}
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
# Ranks on the other hosts start in a fresh ssh shell, and DeepSpeed forwards only a few variables (PYTHON*, ...)
# itself: hand them the settings chosen here through its environment file, keeping a user's own .deepspeed_env.
ENV_FILE=$(mktemp "${TMPDIR:-/tmp}/debater-deepspeed-env.XXXXXX")
trap 'rm -f "$ENV_FILE"' EXIT
for own in ~/.deepspeed_env ./.deepspeed_env; do
  if [ -f "$own" ]; then cat "$own" >> "$ENV_FILE"; fi
done
for name in PATH PYTHONPATH DS_ACCELERATOR OMP_NUM_THREADS TOKENIZERS_PARALLELISM HF_HUB_OFFLINE HF_HOME; do
  if [ -n "${!name:-}" ]; then echo "$name=${!name}" >> "$ENV_FILE"; fi
done
PORT=${MASTER_PORT:-29500}
HOSTS=$(awk 'NF && $1 !~ /^#/ {print $1}' "$HOSTFILE" | paste -sd,)
stop_ranks() { PDSH_RCMD_TYPE=ssh pdsh -w "$HOSTS" "$(ranks_stop_command "$MASTER_ADDR" "$PORT")"; }
export DS_ENV_FILE=$ENV_FILE
run_stoppable stop_ranks deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
  --master_port "$PORT" --module debater train "$CONFIG" --deepspeed "$DS_CONFIG" "${TRAIN_ARGS[@]}"
