#!/usr/bin/env bash
# A Cloud TPU pod slice for regft_jax: create (or queue) it, copy this repo to every worker, install,
# run the same command on all workers (jax.distributed finds the pod from the TPU metadata:
# --config.distributed=True), follow the log, stop, delete.
#
#   launch/tpu_pod.sh [--dry-run] --name NAME --zone ZONE [--project P] COMMAND [ARGS]
#
#   create  --type v4-32 [--version V] [--spot]   a TPU VM slice now
#   queue   --type v4-32 [--version V] [--spot]   a queued resource (the slice when capacity frees up)
#   status                                        the queued resource's state
#   copy                                          this checkout (no .git, .venv) -> ~/regft_jax on every worker
#   install                                       ~/regft_jax/.venv with regft_jax and jax[tpu] on every worker
#   run CONFIG [--config.key=value ...]           python -m regft_jax.main on every worker, in the background
#                                                 (log: ~/regft_jax/run.log, pid: ~/regft_jax/run.pid)
#   logs [--worker W]                             follow the log of worker W (default 0; all: every worker)
#   stop                                          SIGTERM the run on every worker (it checkpoints and exits)
#   delete [--queued]                             delete the slice (--queued: the queued resource and its slice)
#
# --dry-run prints the exact commands (quoted as a shell reads them) instead of running them.
# NAME, ZONE, PROJECT may also come from TPU_NAME, TPU_ZONE, TPU_PROJECT; JAX_SPEC overrides the jax
# requirement that `install` adds (default 'jax[tpu]==0.10.2').
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$HERE/quote.sh"

usage() { sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

DRY_RUN=0 NAME=${TPU_NAME:-} ZONE=${TPU_ZONE:-} PROJECT=${TPU_PROJECT:-}
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dry-run) DRY_RUN=1; shift ;;
    --name) NAME=${2:?--name needs a value}; shift 2 ;;
    --zone) ZONE=${2:?--zone needs a value}; shift 2 ;;
    --project) PROJECT=${2:?--project needs a value}; shift 2 ;;
    --help) usage ;;
    *) die "unknown option $1 (options come before the command)" ;;
  esac
done
[[ $# -ge 1 ]] || usage
CMD=$1; shift
[[ -n $NAME ]] || die "--name (or TPU_NAME) is required"
[[ -n $ZONE ]] || die "--zone (or TPU_ZONE) is required"
WHERE=(--zone="$ZONE")
[[ -z $PROJECT ]] || WHERE+=(--project="$PROJECT")
REMOTE=regft_jax  # the checkout on every worker, relative to the home directory

on_workers() {  # on_workers WORKER SCRIPT: run SCRIPT with bash on worker WORKER (0, 1, ... or all)
  run_or_print gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}

slice_options() {  # create/queue options -> TYPE, VERSION, SPOT
  TYPE="" VERSION="" SPOT=()
  while [[ $# -gt 0 ]]; do
    case $1 in
      --type) TYPE=${2:?--type needs a value}; shift 2 ;;
      --version) VERSION=${2:?--version needs a value}; shift 2 ;;
      --spot) SPOT=(--spot); shift ;;
      *) die "$CMD: unknown option $1" ;;
    esac
  done
  [[ -n $TYPE ]] || die "$CMD: --type is required (an accelerator type, e.g. v4-32, v5litepod-64, v5p-128)"
  if [[ -z $VERSION ]]; then  # the runtime image each generation boots by default
    case $TYPE in
      v4-*) VERSION=tpu-ubuntu2204-base ;;
      v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
      v5p-*) VERSION=v2-alpha-tpuv5 ;;
      v6e-*) VERSION=v2-alpha-tpuv6e ;;
      *) die "$CMD: no default runtime version for --type $TYPE; pass --version" ;;
    esac
  fi
}

case $CMD in
  create)
    slice_options "$@"
    run_or_print gcloud compute tpus tpu-vm create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" \
      --version="$VERSION" ${SPOT[@]+"${SPOT[@]}"} ;;
  queue)
    slice_options "$@"
    run_or_print gcloud compute tpus queued-resources create "$NAME" "${WHERE[@]}" --node-id="$NAME" \
      --accelerator-type="$TYPE" --runtime-version="$VERSION" ${SPOT[@]+"${SPOT[@]}"} ;;
  status)
    run_or_print gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}" --format='value(state.state)' ;;
  copy)
    REPO=$(cd "$HERE/.." && pwd)
    ARCHIVE=${TMPDIR:-/tmp}/regft_jax-$NAME.tgz
    run_or_print tar -czf "$ARCHIVE" --exclude=./.git --exclude=./.venv --exclude=__pycache__ -C "$REPO" .
    run_or_print gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:$REMOTE.tgz" "${WHERE[@]}" --worker=all
    on_workers all "mkdir -p $REMOTE && tar -xzf $REMOTE.tgz -C $REMOTE && rm $REMOTE.tgz" ;;
  install)
    on_workers all "cd $REMOTE && python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip && \
pip install -q -e . $(quote "${JAX_SPEC:-jax[tpu]==0.10.2}")" ;;
  run)
    [[ $# -ge 1 && $1 != --* ]] || die "run: expected CONFIG [--config.key=value ...]"
    CONFIG=$1; shift
    MAIN=$(quote_all python -m regft_jax.main --config="$CONFIG" --config.distributed=True "$@")
    on_workers all "cd $REMOTE && . .venv/bin/activate && { nohup $MAIN > run.log 2>&1 < /dev/null & \
echo \$! > run.pid; }" ;;
  logs)
    WORKER=0
    if [[ $# -gt 0 ]]; then [[ $1 == --worker && $# -eq 2 ]] || die "logs: expected [--worker W]"; WORKER=$2; fi
    on_workers "$WORKER" "tail -n 200 -F $REMOTE/run.log" ;;
  stop)
    on_workers all "if [ -f $REMOTE/run.pid ]; then kill \$(cat $REMOTE/run.pid) 2>/dev/null || true; fi" ;;
  delete)
    if [[ ${1:-} == --queued ]]; then
      run_or_print gcloud compute tpus queued-resources delete "$NAME" "${WHERE[@]}" --force --quiet
    else
      [[ $# -eq 0 ]] || die "delete: unknown option $1"
      run_or_print gcloud compute tpus tpu-vm delete "$NAME" "${WHERE[@]}" --quiet
    fi ;;
  *) die "unknown command '$CMD' (create, queue, status, copy, install, run, logs, stop, delete)" ;;
esac
