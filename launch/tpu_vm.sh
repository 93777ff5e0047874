#!/usr/bin/env bash
# Drive a Cloud TPU VM (single host or pod slice) for csctr.
#
#   launch/tpu_vm.sh [--dry-run] create            # create the TPU VM
#   launch/tpu_vm.sh [--dry-run] setup             # sync the repo, then install it on every worker
#   launch/tpu_vm.sh [--dry-run] sync              # mirror this checkout to ~/csctr on every worker
#   launch/tpu_vm.sh [--dry-run] run -- ARGS...    # python -m csctr.main ARGS on every worker, detached
#   launch/tpu_vm.sh [--dry-run] logs              # follow worker $WORKER's log [0]
#   launch/tpu_vm.sh [--dry-run] stop              # stop the run on every worker
#   launch/tpu_vm.sh [--dry-run] ssh               # interactive shell on worker 0
#   launch/tpu_vm.sh [--dry-run] delete
#
# Settings come from the environment (defaults in brackets):
#   TPU_NAME [csctr-tpu]  ZONE [us-central2-b]  ACCELERATOR_TYPE [v4-8]
#   RUNTIME_VERSION [tpu-ubuntu2204-base]  PROJECT [gcloud's default]
#   PYTHON_VERSION [3.11]  (the runtime's own Python 3.10 resolves flax 0.10,
#   which lacks the NNX APIs csctr uses, so setup makes a uv venv with its own
#   Python in ~/csctr-venv)
#   WORKDIR (a gs:// path; required for run)  REPO_DIR [this checkout]
#
# sync mirrors the checkout (git's tracked and untracked-but-not-ignored
# files) as one archive, unpacked into a fresh directory that replaces
# ~/csctr: running it twice gives the same tree, and files deleted here
# disappear there. run starts launch/tpu_worker.sh on every worker, detached
# from the ssh session (nohup setsid), with --distributed=true: jax.distributed
# finds the slice's other hosts by itself. Each worker logs to
# ~/csctr-logs/latest.log and copies its log to $WORKDIR/logs/ every minute
# and at the end. --dry-run prints the commands instead of running them.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
CMD="${1:-}"; shift || true

TPU_NAME="${TPU_NAME:-csctr-tpu}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
WORKER="${WORKER:-0}"
REPO_DIR="${REPO_DIR:-$(cd "$(dirname "$0")/.." && pwd)}"
ARCHIVE="${ARCHIVE:-${TMPDIR:-/tmp}/csctr-src-$TPU_NAME.tar.gz}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="$PROJECT"); fi

run() {  # Print (dry run) or execute one command, quoted so it can be pasted.
  if (( DRY_RUN )); then printf '%q ' "$@"; echo; else "$@"; fi
}

ssh_on() {  # Run a shell command on worker $1 (a number or "all").
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
    --worker="$1" --command="$2"
}

# The archive of the checkout: the files git tracks or would track (not
# ignored), as they are on disk now (a deleted tracked file is left out).
pack() {
  local list='git ls-files -z --cached --others --exclude-standard'
  local keep='for f; do if [ -f "$f" ]; then printf "%s\0" "$f"; fi; done'
  if (( DRY_RUN )); then
    echo "cd $(printf '%q' "$REPO_DIR") && $list | xargs -0 sh -c '$keep' _" \
      "| tar --null -T - -czf $(printf '%q' "$ARCHIVE")"
  else
    (cd "$REPO_DIR" && $list | xargs -0 sh -c "$keep" _ \
      | tar --null -T - -czf "$ARCHIVE")
  fi
}

# Unpack into a fresh directory, then swap it in: idempotent, never nested.
UNPACK='set -e; rm -rf ~/csctr.new; mkdir ~/csctr.new; '\
'tar -xzf ~/csctr-src.tar.gz -C ~/csctr.new; rm -rf ~/csctr; mv ~/csctr.new ~/csctr'

# uv brings its own Python >= 3.11; every step is a no-op when already done.
SETUP='set -e; export PATH="$HOME/.local/bin:$PATH"; '\
'command -v uv >/dev/null || python3 -m pip install -q --user uv; '\
"[ -x ~/csctr-venv/bin/python ] || uv venv --python $PYTHON_VERSION ~/csctr-venv; "\
'uv pip install -q --python ~/csctr-venv/bin/python -e "$HOME/csctr[gcp]" "jax[tpu]"'

sync_repo() {
  pack
  run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME":csctr-src.tar.gz \
    --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all
  ssh_on all "$UNPACK"
}

case "$CMD" in
  create)
    run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
    ;;
  sync)
    sync_repo
    ;;
  setup)
    sync_repo
    ssh_on all "$SETUP"
    ;;
  run)
    [[ "${1:-}" == "--" ]] && shift
    : "${WORKDIR:?set WORKDIR to a gs:// path shared by all workers}"
    ssh_on all "cd ~/csctr && nohup setsid launch/tpu_worker.sh $(printf '%q ' "$WORKDIR" "$@")"\
"> /dev/null 2>&1 < /dev/null & echo started on \$(hostname)"
    ;;
  logs)
    ssh_on "$WORKER" "tail -n 200 -F ~/csctr-logs/latest.log"
    ;;
  stop)
    # tpu_worker.sh leads its own process group (setsid) and records its pid.
    ssh_on all 'pid=$(cat ~/csctr-logs/pid 2>/dev/null) && kill -TERM -- "-$pid" || true'
    ;;
  ssh)
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=0
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --quiet
    ;;
  *)
    sed -n '2,29p' "$0"; exit 2
    ;;
esac
