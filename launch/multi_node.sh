#!/usr/bin/env bash
# Train across nodes with DeepSpeed's launcher (passwordless ssh to every host in the hostfile):
#   launch/multi_node.sh HOSTFILE CONFIG [DS_CONFIG]
# HOSTFILE lines look like "node1 slots=8". Run on the first host; MASTER_ADDR defaults to it.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh
HOSTFILE=${1:?usage: launch/multi_node.sh HOSTFILE CONFIG [DS_CONFIG]}
CONFIG=${2:?usage: launch/multi_node.sh HOSTFILE CONFIG [DS_CONFIG]}
DS_CONFIG=${3:-$(default_ds_config)}
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  --module debater train "$CONFIG" --deepspeed "$DS_CONFIG"
