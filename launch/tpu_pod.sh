#!/usr/bin/env bash
# Cloud TPU pod slice: create it, install this repository on every worker, train, delete it.
#
#   launch/tpu_pod.sh create
#   launch/tpu_pod.sh setup                       # copy the repo to all workers, make the venv
#   launch/tpu_pod.sh run --config.data.csv_path=/mnt/data/cc3m/train.csv   # extra flags -> main
#   launch/tpu_pod.sh ssh 'tail -n 50 ~/roclip.log'                          # any command, all workers
#   launch/tpu_pod.sh delete
#
# Environment (defaults in brackets):
#   TPU_NAME          name of the TPU VM                  [roclip]
#   ZONE              zone with quota for the type        [us-central2-b]
#   ACCELERATOR_TYPE  slice type, e.g. v4-32, v5p-64      [v4-32]
#   RUNTIME_VERSION   TPU VM image                        [tpu-ubuntu2204-base]
#   PROJECT           gcloud project                      [gcloud's default]
#   SPOT              1 to create a spot (preemptible) slice [0]
#   CONFIG            config file and variant             [configs/vitb32.py:defense=roclip,bf16]
#   WORKDIR           checkpoints + metrics on a filesystem all workers mount (Filestore/NFS, or a
#                     gcsfuse-mounted bucket), e.g. /mnt/shared/roclip/vitb32 (required for run)
#   REMOTE_DIR        where the repo lives on the workers  [~/roclip_jax]
# Every worker runs the same command; jax.distributed.initialize() finds the pod's other hosts by
# itself (roclip_jax.main calls it when TPU_WORKER_HOSTNAMES lists several), and each host reads its
# own slice of the data, which must be readable on every worker (GCS, or a disk attached to all).
# A preempted spot slice: delete, create, setup, run again with the same WORKDIR; it resumes.
set -euo pipefail

TPU_NAME=${TPU_NAME:-roclip}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/vitb32.py:defense=roclip,bf16}
REMOTE_DIR=${REMOTE_DIR:-'~/roclip_jax'}
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="$PROJECT"); fi
REPO=$(cd "$(dirname "$0")/.." && pwd)

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command="$1"
}

case "${1:-}" in
  create)
    SPOT_FLAG=()
    if [[ "${SPOT:-0}" == 1 ]]; then SPOT_FLAG=(--spot); fi
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${SPOT_FLAG[@]}"
    ;;
  setup)
    # The working tree as it is (tracked and untracked, without the venv, caches or workdirs).
    ARCHIVE=$(mktemp /tmp/roclip_jax.XXXXXX.tar.gz)
    tar -C "$REPO" --exclude=.venv --exclude=.cache --exclude=.git --exclude=workdirs -czf "$ARCHIVE" .
    gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME":/tmp/roclip_jax.tar.gz --zone="$ZONE" \
      "${PROJECT_FLAG[@]}" --worker=all
    rm -f "$ARCHIVE"
    JAX_VERSION=$(sed -n 's/^jax==//p' "$REPO/requirements.txt")  # libtpu matching the pinned jax.
    on_all_workers "set -e; mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/roclip_jax.tar.gz && \
      cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && \
      .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==$JAX_VERSION' && .venv/bin/pip install -q --no-deps -e ."
    ;;
  run)
    shift
    : "${WORKDIR:?set WORKDIR to a directory every worker mounts, e.g. /mnt/shared/roclip/run1}"
    # printf %q keeps the extra flags' quoting intact through ssh.
    EXTRA=$(printf ' %q' "$@")
    on_all_workers "cd $REMOTE_DIR && .venv/bin/python -m roclip_jax.main --config=$CONFIG \
      --workdir=$WORKDIR $EXTRA 2>&1 | tee ~/roclip.log"
    ;;
  ssh)
    shift
    on_all_workers "${1:?give a command to run on every worker}"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --quiet
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d'
    exit 2
    ;;
esac
