#!/usr/bin/env bash
# One TPU VM worker's side of `launch/tpu_vm.sh run`: train, log, keep the log.
#
#   launch/tpu_worker.sh WORKDIR ARGS...
#
# Runs $PYTHON -m csctr.main --distributed=true --workdir=WORKDIR ARGS with
# its output in $LOG_DIR/run-<time>.log (latest.log links to it, pid holds
# this script's pid, which leads the run's process group), and copies the
# log to WORKDIR/logs/<hostname>.log every $SYNC_EVERY seconds and once more
# at the end (gcloud storage cp for gs://, cp otherwise), so a run's logs
# live beside its checkpoints. Exits with the trainer's status.
#
# Settings from the environment (defaults in brackets):
#   PYTHON [~/csctr-venv/bin/python]  LOG_DIR [~/csctr-logs]  SYNC_EVERY [60]
set -uo pipefail

if (( $# < 1 )); then sed -n '2,15p' "$0"; exit 2; fi
WORKDIR="$1"; shift
PYTHON="${PYTHON:-$HOME/csctr-venv/bin/python}"
LOG_DIR="${LOG_DIR:-$HOME/csctr-logs}"
SYNC_EVERY="${SYNC_EVERY:-60}"
HOST="$(hostname)"

mkdir -p "$LOG_DIR"
log="$LOG_DIR/run-$(date -u +%Y%m%dT%H%M%SZ)-$$.log"
: > "$log"
ln -sfn "$log" "$LOG_DIR/latest.log"
echo "$$" > "$LOG_DIR/pid"

copy_log() {
  case "$WORKDIR" in
    gs://*) gcloud storage cp --quiet "$log" "$WORKDIR/logs/$HOST.log" ;;
    *) mkdir -p "$WORKDIR/logs" && cp "$log" "$WORKDIR/logs/$HOST.log" ;;
  esac
}

( while sleep "$SYNC_EVERY"; do copy_log; done ) &
syncer=$!
"$PYTHON" -m csctr.main --distributed=true --workdir="$WORKDIR" "$@" >> "$log" 2>&1
status=$?
kill "$syncer" 2>/dev/null
wait "$syncer" 2>/dev/null
echo "tpu_worker: csctr.main exited with status $status" >> "$log"
copy_log
exit "$status"
