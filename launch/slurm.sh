#!/usr/bin/env bash
# Submit launch/slurm.sbatch: regft_jax on NODES nodes x GPUS GPUs (one task per node).
#
#   launch/slurm.sh [--dry-run] [--nodes N] [--gpus-per-node G] [--partition P] [--account A]
#                   [--time T] [--venv DIR] [--sbatch-arg ARG ...] CONFIG [--config.key=value ...]
#
# --dry-run prints the exact sbatch command (quoted as a shell reads them) instead of submitting it;
# `bash launch/slurm.sbatch --dry-run CONFIG ...` shows what each job then runs.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$HERE/quote.sh"
die() { echo "slurm.sh: $*" >&2; exit 2; }

DRY_RUN=0 NODES=1 GPUS=8 OPTS=() VENV=""
while [[ $# -gt 0 && $1 == --* && $1 != --config* ]]; do
  case $1 in
    --dry-run) DRY_RUN=1; shift ;;
    --nodes) NODES=${2:?--nodes needs a value}; shift 2 ;;
    --gpus-per-node) GPUS=${2:?--gpus-per-node needs a value}; shift 2 ;;
    --partition|--account|--time) OPTS+=("$1=${2:?$1 needs a value}"); shift 2 ;;
    --venv) VENV=${2:?--venv needs a value}; shift 2 ;;
    --sbatch-arg) OPTS+=("${2:?--sbatch-arg needs a value}"); shift 2 ;;
    *) die "unknown option $1" ;;
  esac
done
[[ $# -ge 1 && $1 != --* ]] || die "expected CONFIG [--config.key=value ...] after the options"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes $NODES: expected a positive integer"
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node $GPUS: expected a positive integer"
[[ -z $VENV ]] || OPTS+=(--export="ALL,VENV=$VENV")
cd "$HERE/.."  # submit from the repository (the job's working directory)
run_or_print sbatch --nodes="$NODES" --gpus-per-node="$GPUS" ${OPTS[@]+"${OPTS[@]}"} launch/slurm.sbatch "$@"
