# Sourced by the launch scripts: pick CPU or GPU settings once, the same way everywhere.
has_gpu() { python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
if has_gpu; then
  default_ds_config() { echo ds_configs/zero2_bf16.json; }
  default_nproc() { python3 -c 'import torch; print(torch.cuda.device_count())'; }
else
  export DS_ACCELERATOR=cpu
  # one thread per rank: on a small machine oversubscribed ranks are ~10x slower
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  default_ds_config() { echo ds_configs/zero2_cpu.json; }
  default_nproc() { echo 2; }
fi

# Stopping early (docs/training-at-scale.md): a rank that gets SIGTERM or SIGUSR1 makes every rank stop after the
# same step with a checkpoint and exit STOPPED_EARLY. The deepspeed launcher's own handlers would kill the ranks
# instead (and it dies on SIGUSR1), so the scripts run it in the background and pass such a signal on to the ranks.
STOPPED_EARLY=75

# The command that sends SIGTERM to the ranks of the deepspeed launch rendezvousing at ADDR:PORT on this host:
# the children of its per-host launch.py (no other run on a host can share that address and port). The pattern
# is anchored at the python that runs launch.py: pdsh, ssh and the remote shells carry the same text in their
# command lines, and signalling their children would cut the launch's ssh sessions.
ranks_stop_command() {
  echo "pkill -TERM -P \"\$(pgrep -d, -f '^[^ ]*python[^ ]* -u -m deepspeed[.]launcher[.]launch .*--master_addr=$1 --master_port=$2( |\$)')\""
}

# run_stoppable FORWARD CMD...: run CMD, and on SIGTERM or SIGUSR1 to this script call the function FORWARD (which
# signals the ranks) instead of dying; returns CMD's exit status.
run_stoppable() {
  local forward=$1 pid status
  shift
  "$@" &
  pid=$!
  trap "echo 'launch: stop requested: passing SIGTERM to the ranks' >&2; $forward || true" TERM USR1
  while :; do
    status=0
    wait "$pid" || status=$?
    kill -0 "$pid" 2>/dev/null || return "$status"  # still running: a trapped signal interrupted the wait
  done
}
