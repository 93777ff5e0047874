#!/usr/bin/env bash
# Drive a Cloud TPU VM (single host or pod slice) for csctr.
#
#   launch/tpu_vm.sh [--dry-run] create            # create the TPU VM
#   launch/tpu_vm.sh [--dry-run] setup             # copy the repo, install it on every worker
#   launch/tpu_vm.sh [--dry-run] run -- ARGS...    # python -m csctr.main ARGS on every worker
#   launch/tpu_vm.sh [--dry-run] ssh               # interactive shell on worker 0
#   launch/tpu_vm.sh [--dry-run] delete
#
# Settings come from the environment (defaults in brackets):
#   TPU_NAME [csctr-tpu]  ZONE [us-central2-b]  ACCELERATOR_TYPE [v4-8]
#   RUNTIME_VERSION [tpu-ubuntu2204-base]  PROJECT [gcloud's default]
#   WORKDIR (a gs:// path; required for run)  REPO_DIR [this checkout]
#
# Every worker runs the same command, with --distributed=true: jax.distributed
# finds the slice's other hosts by itself on Cloud TPU (no coordinator flags).
# --dry-run prints the commands instead of running them.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
CMD="${1:-}"; shift || true

TPU_NAME="${TPU_NAME:-csctr-tpu}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
REPO_DIR="${REPO_DIR:-$(cd "$(dirname "$0")/.." && pwd)}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="$PROJECT"); fi

run() {  # Print (dry run) or execute one command, quoted so it can be pasted.
  if (( DRY_RUN )); then printf '%q ' "$@"; echo; else "$@"; fi
}

ssh_all() {  # Run a shell command on every worker of the slice.
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
    --worker=all --command="$1"
}

# Installing is idempotent: pip install -e of an unchanged tree is a no-op,
# and jax[tpu] is only fetched when missing.
SETUP='set -e; cd ~/csctr; python3 -m pip install -q -U pip; '\
'python3 -c "import jax" 2>/dev/null || python3 -m pip install -q "jax[tpu]"; '\
'python3 -m pip install -q -e .'

case "$CMD" in
  create)
    run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
    ;;
  setup)
    run gcloud compute tpus tpu-vm scp --recurse "$REPO_DIR" "$TPU_NAME":~/csctr \
      --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all
    ssh_all "$SETUP"
    ;;
  run)
    [[ "${1:-}" == "--" ]] && shift
    : "${WORKDIR:?set WORKDIR to a gs:// path shared by all workers}"
    # --distributed=true: every worker joins one jax.distributed job (a
    # pod slice is multi-host; on one host it is a harmless no-op).
    ssh_all "cd ~/csctr && python3 -m csctr.main --distributed=true --workdir=$WORKDIR $(printf '%q ' "$@")"
    ;;
  ssh)
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=0
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --quiet
    ;;
  *)
    sed -n '2,17p' "$0"; exit 2
    ;;
esac
