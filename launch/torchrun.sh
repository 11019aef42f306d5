#!/usr/bin/env bash
# Train with torchrun (no ssh needed; run once per node, e.g. from SLURM):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/torchrun.sh CONFIG [NPROC_PER_NODE] [DS_CONFIG] [--set KEY=VALUE ...]
# SIGTERM or SIGUSR1 (to torchrun or any rank) stops every rank after the same step with a checkpoint: exit 75.
set -euo pipefail
LAUNCHER=torchrun
source "$(dirname "$0")/common.sh"
config_nproc_ds "launch/torchrun.sh CONFIG [NPROC_PER_NODE] [DS_CONFIG] [--set KEY=VALUE ...]" "$@"
# torchrun exits 1 whatever its workers return: a rank that stopped early writes this file instead
export DEBATER_STOP_NOTE=$(mktemp "${TMPDIR:-/tmp}/debater-stop.XXXXXX")
rm -f "$DEBATER_STOP_NOTE"
trap 'rm -f "$DEBATER_STOP_NOTE"' EXIT
# this shell ignores the stop signals (SLURM sends them to every process of the step); torchrun passes them to its
# workers: SIGUSR1 is not in its default set (it would kill it), and the workers get SHUTDOWN_TIMEOUT_S seconds to
# finish their step and checkpoint before it kills them
trap '' TERM USR1
status=0
torchrun --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT_S:-300}" \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m debater train "$CONFIG" --deepspeed "$DS_CONFIG" "${TRAIN_ARGS[@]}" || status=$?
if [ "$status" -ne 0 ] && [ -f "$DEBATER_STOP_NOTE" ]; then
  echo "torchrun.sh: stopped early at step $(cat "$DEBATER_STOP_NOTE") with a checkpoint: exit $STOPPED_EARLY" >&2
  exit "$STOPPED_EARLY"
fi
exit "$status"
