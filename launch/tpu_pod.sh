#!/usr/bin/env bash
# Run regft_jax on every host of a Cloud TPU pod slice (each host runs the same command;
# jax.distributed.initialize() discovers the topology from the TPU metadata).
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/llama.py --config.model.path=/models/Llama-2-7b-hf
#
# Assumes the repo is checked out at ~/regft_jax on every host (e.g. via `gcloud ... scp`).
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG [--config.key=value ...]" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3
shift 3
EXTRA=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e; cd ~/regft_jax
  [[ -d .venv ]] || (python3 -m venv .venv && . .venv/bin/activate && pip install -q -e . 'jax[tpu]==0.10.2')
  . .venv/bin/activate
  python -m regft_jax.main --config=$CONFIG --config.distributed=True $EXTRA"
