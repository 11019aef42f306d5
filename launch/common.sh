# Sourced by the launch scripts, after they set LAUNCHER (deepspeed or torchrun): find the tools, read the arguments and pick CPU or GPU settings, the same way
# everywhere. The scripts stay in the caller's directory, so relative paths (arguments and the config's own)
# are read from where they are run, as `python -m debater` reads them.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # `-m debater` is this checkout's, from any directory

# need_tool NAME: the project's .venv when NAME is not on PATH (made by `make setup`), else a one-line error
need_tool() {
  command -v "$1" >/dev/null && return
  if [ -x "$REPO/.venv/bin/$1" ]; then
    export PATH="$REPO/.venv/bin:$PATH"
  else
    echo "$(basename "$0"): '$1' not found on PATH: run 'make setup' in $REPO, then 'source $REPO/.venv/bin/activate' (or use 'make train')" >&2
    exit 2
  fi
}

# launch_args USAGE MAX ARG...: the leading arguments that are not options go to POSITIONAL (at most MAX);
# the rest, from the first --option on (e.g. --set KEY=VALUE), to TRAIN_ARGS for `python -m debater train`
launch_args() {
  local usage=$1 max=$2
  shift 2
  POSITIONAL=()
  while [ $# -gt 0 ] && [[ $1 != -* ]]; do POSITIONAL+=("$1"); shift; done
  TRAIN_ARGS=("$@")
  if [ ${#POSITIONAL[@]} -gt "$max" ]; then
    echo "$(basename "$0"): too many arguments before the options (${POSITIONAL[*]}); usage: $usage" >&2
    exit 2
  fi
}

# config_nproc_ds USAGE ARG...: CONFIG [NPROC] [DS_CONFIG] [options] into CONFIG, NPROC, DS_CONFIG, TRAIN_ARGS
config_nproc_ds() {
  local usage=$1
  shift
  launch_args "$usage" 3 "$@"
  CONFIG=${POSITIONAL[0]:?usage: $usage}
  NPROC=${POSITIONAL[1]:-$(default_nproc)}
  DS_CONFIG=${POSITIONAL[2]:-$(default_ds_config)}
  if ! [[ $NPROC =~ ^[1-9][0-9]*$ ]]; then  # a DeepSpeed config given in its place, say
    echo "$(basename "$0"): NPROC must be a number of ranks per node, got '$NPROC'; usage: $usage" >&2
    exit 2
  fi
}

# no NVIDIA driver, no GPU: that answer costs no torch import (seconds)
has_gpu() {
  command -v nvidia-smi >/dev/null && python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}
need_tool "$LAUNCHER"  # first: the .venv it may put on PATH has the python3 with torch
if has_gpu; then
  default_ds_config() { echo "$REPO/ds_configs/zero2_bf16.json"; }
  default_nproc() { python3 -c 'import torch; print(torch.cuda.device_count())'; }
else
  export DS_ACCELERATOR=cpu
  # one thread per rank: on a small machine oversubscribed ranks are ~10x slower
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  default_ds_config() { echo "$REPO/ds_configs/zero2_cpu.json"; }
  default_nproc() { echo 2; }
fi

# Stopping early (docs/training-at-scale.md): a rank that gets SIGTERM or SIGUSR1 makes every rank stop after the
# same step with a checkpoint and exit STOPPED_EARLY. The deepspeed launcher's own handlers would kill the ranks
# instead (and it dies on SIGUSR1), so the scripts run it in the background and pass such a signal on to the ranks.
STOPPED_EARLY=$(python3 -c 'from debater.core.exit_codes import STOPPED_EARLY; print(STOPPED_EARLY)')

# The command that sends SIGTERM to the ranks of the deepspeed launch rendezvousing at ADDR:PORT on this host:
# the children of its per-host launch.py (no other run on a host can share that address and port). The pattern
# is anchored at the python that runs launch.py: pdsh, ssh and the remote shells carry the same text in their
# command lines, and signalling their children would cut the launch's ssh sessions. Nothing to signal (the ranks
# have ended) is no error.
ranks_stop_command() {
  echo "launchers=\$(pgrep -d, -f '^[^ ]*python[^ ]* -u -m deepspeed[.]launcher[.]launch .*--master_addr=$1 --master_port=$2( |\$)'); [ -z \"\$launchers\" ] || pkill -TERM -P \"\$launchers\""
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
