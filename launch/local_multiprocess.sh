#!/usr/bin/env bash
# Run csctr as N processes on this machine: the multi-host code path on CPU.
#
#   launch/local_multiprocess.sh [--dry-run] N ARGS...
#   e.g. launch/local_multiprocess.sh 2 --config=configs/tiny.py --workdir=/tmp/mp
#
# Starts N copies of the normal entry point (python -m csctr.main ARGS), each
# with its own CPU devices, joined by jax.distributed with process 0 as the
# coordinator on 127.0.0.1. Global batch i is the same for any N: each
# process builds the blocks of it that its devices hold (csctr/data/pipeline.py);
# groups_per_batch and unique_images are global sizes, divisible over 'data'.
# Output lines are prefixed with [process index]; only process 0 logs INFO.
#
# Settings from the environment (defaults in brackets):
#   PORT [a free port]  PYTHON [python3]
#   DEVICES_PER_PROCESS [1]  CPU devices each process sees
#   TIMEOUT [3600]           seconds before a process is killed
#   INIT_TIMEOUT [60]        seconds to wait for all processes to connect
#
# Nothing hangs: a process that cannot reach the coordinator fails after
# INIT_TIMEOUT, and when any process fails the others are stopped, and the
# script exits with the failing process's status.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
N="${1:-}"
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then sed -n '2,22p' "$0"; exit 2; fi
shift

PYTHON="${PYTHON:-python3}"
TIMEOUT="${TIMEOUT:-3600}"
INIT_TIMEOUT="${INIT_TIMEOUT:-60}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-1}"
REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -z "${PORT:-}" ]]; then
  # Bound then released: another program could take it in between, which
  # fails the run at startup (never silently joins the wrong job).
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

command_for() {  # Sets cmd to the command line of process $1.
  cmd=(timeout --kill-after=10 "$TIMEOUT" "$PYTHON" -m csctr.main
       --coordinator_address="127.0.0.1:$PORT" --num_processes="$N"
       --process_id="$1" --initialization_timeout="$INIT_TIMEOUT" "${@:2}")
}

if (( DRY_RUN )); then
  for ((i = 0; i < N; i++)); do command_for "$i" "$@"; printf '%q ' "${cmd[@]}"; echo; done
  exit 0
fi

cd "$REPO_DIR"
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
pids=()
for ((i = 0; i < N; i++)); do
  command_for "$i" "$@"
  # A simple command in the background: $! is timeout's own pid, and timeout
  # passes a kill on to python.
  "${cmd[@]}" > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=("$!")
done

stop() {  # Stop process $1 (a timeout we started) and what it runs.
  # timeout leads its own process group, so the group id is its pid; the
  # group also reaches a python that timeout has not yet learnt to forward
  # signals to (a failure right at startup). Before setpgid, the pid alone.
  kill -- "-$1" 2>/dev/null || kill "$1" 2>/dev/null || true
}
trap 'for pid in "${pids[@]}"; do stop "$pid"; done; exit 130' INT TERM

# Poll rather than `wait -n`: bash may have reaped and forgotten a job that
# `wait -n` is then asked about. `wait PID` still knows its status.
status=0
remaining=("${pids[@]}")
while (( ${#remaining[@]} )); do
  still=()
  for pid in "${remaining[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
    rc=0; wait "$pid" || rc=$?
    if (( rc != 0 && status == 0 )); then
      status=$rc
      echo "local_multiprocess: process with pid $pid exited with $rc;" \
        "stopping the others" >&2
      for other in "${remaining[@]}"; do
        if [[ "$other" != "$pid" ]] && kill -0 "$other" 2>/dev/null; then stop "$other"; fi
      done
    fi
  done
  remaining=("${still[@]+"${still[@]}"}")
  if (( ${#remaining[@]} )); then sleep 0.2; fi
done
exit "$status"
