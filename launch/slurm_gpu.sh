#!/usr/bin/env bash
# Submit csctr to a SLURM GPU cluster: one process per GPU, jax.distributed.
#
#   launch/slurm_gpu.sh [--dry-run] -- ARGS...   # ARGS go to python -m csctr.main
#
# Settings from the environment (defaults in brackets):
#   NODES [1]  GPUS_PER_NODE [8]  PARTITION [gpu]  TIME [24:00:00]
#   JOB_NAME [csctr]  WORKDIR (shared filesystem or gs:// path; required)
#   LOG_DIR (SLURM's output when WORKDIR is a URL) [./slurm-logs]
#   VENV (activated on each node, optional)
#
# jax.distributed.initialize() reads SLURM's variables (SLURM_JOB_NODELIST,
# SLURM_PROCID, SLURM_NTASKS...) by itself, so every task runs the plain entry
# point with --distributed=true. It also picks each task's GPU itself: local
# device SLURM_LOCALID of the node. So GPUs are allocated per node
# (--gpus-per-node) and not bound per task: with --gpus-per-task=1 every task
# would see one GPU, numbered 0, and the tasks with SLURM_LOCALID > 0 would ask
# for a device that does not exist. SLURM's own output goes to
# $WORKDIR/slurm-<job>.out, or to $LOG_DIR [./slurm-logs] when WORKDIR is a
# URL (gs://). --dry-run prints the sbatch script instead of submitting it.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
[[ "${1:-}" == "--" ]] && shift
: "${WORKDIR:?set WORKDIR to a directory every node can write}"

NODES="${NODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
PARTITION="${PARTITION:-gpu}"
TIME="${TIME:-24:00:00}"
JOB_NAME="${JOB_NAME:-csctr}"
REPO_DIR="${REPO_DIR:-$(cd "$(dirname "$0")/.." && pwd)}"
if [[ "$WORKDIR" == *://* ]]; then LOG_DIR="${LOG_DIR:-$PWD/slurm-logs}"; else LOG_DIR="$WORKDIR"; fi
ACTIVATE=""
if [[ -n "${VENV:-}" ]]; then ACTIVATE="source $VENV/bin/activate"; fi

script=$(cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=$JOB_NAME
#SBATCH --partition=$PARTITION
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$GPUS_PER_NODE
#SBATCH --gpus-per-node=$GPUS_PER_NODE
#SBATCH --cpus-per-task=8
#SBATCH --time=$TIME
#SBATCH --output=$LOG_DIR/slurm-%j.out
set -euo pipefail
$ACTIVATE
cd $REPO_DIR
srun python -m csctr.main --distributed=true --workdir=$(printf '%q' "$WORKDIR") $(printf '%q ' "$@")
SBATCH
)

if (( DRY_RUN )); then
  echo "$script"
else
  mkdir -p "$LOG_DIR"
  echo "$script" | sbatch
fi
