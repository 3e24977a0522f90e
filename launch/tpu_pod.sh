#!/usr/bin/env bash
# Runs training on every worker of a Cloud TPU VM pod slice. JAX discovers the pod topology itself
# (jax.distributed.initialize() with no arguments, via --distributed).
#
#   TPU_NAME=my-v5e-64 ZONE=us-west4-a bash launch/tpu_pod.sh \
#       --config=configs/sd15_256.py --workdir=gs://bucket/runs/mv --config.train.init_from=gs://bucket/sd15
#
# The repository is cloned and installed on each worker first (REPO, BRANCH); the workdir should be on
# storage that every worker sees (a GCS bucket), since Orbax writes one checkpoint from all hosts.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO="${REPO:-$(git config --get remote.origin.url)}"
BRANCH="${BRANCH:-main}"
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  [ -d magicvideo_jax ] || git clone --branch $BRANCH $REPO magicvideo_jax
  cd magicvideo_jax && git fetch -q && git checkout -q $BRANCH && git pull -q
  python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2'
  .venv/bin/python -m magicvideo_jax.main --distributed $ARGS
"
