#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice) life cycle for mnasnet_jax.
#
#   launch/tpu.sh create                 # make the TPU VM
#   launch/tpu.sh setup                  # copy this checkout to every worker and install it
#   launch/tpu.sh mount                  # mount BUCKET with gcsfuse at MOUNT on every worker
#   launch/tpu.sh run [--config.X=Y ...] # start the job on all workers (same command everywhere)
#   launch/tpu.sh logs [WORKER]          # follow a worker's log (default 0, the one that writes)
#   launch/tpu.sh stop                   # stop the job on all workers (it resumes when run again)
#   launch/tpu.sh delete                 # delete the TPU VM
#
# Settings come from the environment: TPU_NAME, ZONE, ACCELERATOR_TYPE (v4-8 is one host, v4-32 a
# pod slice of 4), RUNTIME_VERSION, CONFIG (default configs/search.py), WORKDIR and GCLOUD (the gcloud
# binary). WORKDIR is a directory at the same path on every worker: a Cloud Storage bucket mounted
# with gcsfuse, or a Filestore (NFS) share. Not a gs:// URL: the search appends every child to
# history.jsonl and syncs it to disk at once, which an object store cannot do. On Cloud TPU,
# jax.distributed finds the other workers by itself: no coordinator flags are needed.
# `mount` mounts the bucket BUCKET (a name, no gs://) at MOUNT (default /mnt/gcs) with the options
# Orbax needs: it writes each checkpoint in a temporary directory and renames it when complete,
# which gcsfuse refuses unless --rename-dir-limit allows it; --implicit-dirs shows directories that
# another worker made. Put WORKDIR under MOUNT.
set -euo pipefail

TPU_NAME=${TPU_NAME:?set TPU_NAME}
ZONE=${ZONE:?set ZONE, e.g. us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/search.py}
GCLOUD=${GCLOUD:-gcloud}
REMOTE_DIR=mnasnet_jax
LOG=mnasnet_jax.log
MOUNT=${MOUNT:-/mnt/gcs}
# Directory renames are allowed up to this many files: an Orbax step directory holds a few dozen.
GCSFUSE_OPTIONS="--implicit-dirs --rename-dir-limit=10000"

tpu() { "$GCLOUD" compute tpus tpu-vm "$@" --zone="$ZONE"; }
on_workers() { tpu ssh "$TPU_NAME" --worker="$1" --command="$2"; }

command=${1:-}
shift || true
case "$command" in
  create)
    tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" ;;
  setup)
    here=$(cd "$(dirname "$0")/.." && pwd)
    tpu scp --recurse "$here" "$TPU_NAME:~/$REMOTE_DIR" --worker=all
    on_workers all "cd ~/$REMOTE_DIR && pip install -r requirements.txt 'jax[tpu]==0.10.2' && pip install -e . --no-deps" ;;
  mount)
    BUCKET=${BUCKET:?set BUCKET to the Cloud Storage bucket to mount (its name, without gs://)}
    on_workers all "if ! command -v gcsfuse >/dev/null; then echo 'gcsfuse is not installed: see https://cloud.google.com/storage/docs/cloud-storage-fuse/install' >&2; exit 1; fi; sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT && if ! mountpoint -q $MOUNT; then gcsfuse $GCSFUSE_OPTIONS $BUCKET $MOUNT; fi" ;;
  run)
    WORKDIR=${WORKDIR:?set WORKDIR to a directory every worker shares (a gcsfuse mount or NFS)}
    case "$WORKDIR" in
      *://*) echo "WORKDIR=$WORKDIR: expected a mounted directory (gcsfuse or NFS), not a URL" >&2
             exit 2 ;;
    esac
    on_workers all "cd ~/$REMOTE_DIR && nohup python3 launch/main.py --config=$CONFIG --workdir=$WORKDIR $* > ~/$LOG 2>&1 &" ;;
  logs)
    on_workers "${1:-0}" "tail -n 100 -f ~/$LOG" ;;
  stop)
    on_workers all "pkill -f launch/main.py || true" ;;
  delete)
    tpu delete "$TPU_NAME" --quiet ;;
  *)
    echo "usage: $0 {create|setup|mount|run [--config.X=Y ...]|logs [WORKER]|stop|delete}" >&2
    exit 2 ;;
esac
