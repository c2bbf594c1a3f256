#!/usr/bin/env bash
# Create a Cloud TPU VM pod slice, copy this repository to all its workers, run
# training on ALL workers, and delete the slice. Run it from your workstation
# (gcloud installed and authenticated, a project set).
#
#   export TPU_NAME=mixer ZONE=europe-west4-a ACCELERATOR=v3-128
#   launch/tpu_pod.sh create
#   launch/tpu_pod.sh copy
#   launch/tpu_pod.sh run --config=configs/mixer_l16_i21k.py \
#       --workdir=gs://$BUCKET/mixer/l16_i21k --config.data_dir=gs://$BUCKET/tensorflow_datasets
#   launch/tpu_pod.sh ssh 'tail -n 50 ~/mixer/nohup.out'   # any command, all workers
#   launch/tpu_pod.sh delete
#
# `run` = `copy` + launch/run_on_host.sh on every worker (`--worker=all`). Every
# host of a slice must run the same command: JAX's multi-host start-up waits for
# all of them, so a command started on worker 0 alone hangs ("TPU backend
# initialization is taking more than 60 s", jax-ml/jax#22436). Never drop
# --worker=all. The training process runs in the foreground of each ssh session;
# wrap the command in tmux or nohup (RUN_DETACHED=1) for long runs.
#
# Environment:
#   TPU_NAME      slice name (required).
#   ZONE          e.g. europe-west4-a for v3 (required).
#   ACCELERATOR   e.g. v3-8, v3-32, v3-128, v4-64 (create only; default v3-128).
#   TPU_VERSION   TPU VM runtime image (create only; default tpu-ubuntu2204-base).
#   SPOT=1        create a spot (preemptible) slice; mixer resumes from checkpoints.
#   REMOTE_DIR    where the repository lives on each worker (default mixer, in ~).
#   RUN_DETACHED=1  start training under nohup (log: ~/$REMOTE_DIR/nohup.out) and return.
#   TFDS_DATA_DIR passed on to every worker when set.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE, e.g. europe-west4-a}"
ACCELERATOR="${ACCELERATOR:-v3-128}"
TPU_VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
REMOTE_DIR="${REMOTE_DIR:-mixer}"

usage() {
  sed -n '2,29p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

on_all_workers() {
  # One command, on every host of the slice, in parallel.
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command="$1"
}

create() {
  local spot=()
  if [[ "${SPOT:-0}" == 1 ]]; then spot=(--spot); fi
  gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" \
    --accelerator-type="${ACCELERATOR}" --version="${TPU_VERSION}" ${spot[@]+"${spot[@]}"}
}

copy() {
  # Ship the working tree as one tarball: no .venv, .git or workdirs (each host
  # builds its own venv), and one file is much faster than `scp --recurse` of
  # many small ones. Released weights (mixer_models/, up to 876 MB a file) are
  # left out: fetch them on the hosts, next to GCS (see finetune_*.py).
  local tmpdir tarball
  tmpdir="$(mktemp -d)"
  tarball="${tmpdir}/mixer.tar.gz"
  tar -czf "${tarball}" -C "${REPO_ROOT}" \
    --exclude=./.venv --exclude=./.git --exclude=./workdirs \
    --exclude='*.egg-info' --exclude='__pycache__' --exclude=./.pytest_cache \
    --exclude=./mixer_models .
  gcloud compute tpus tpu-vm scp "${tarball}" "${TPU_NAME}:~/mixer.tar.gz" \
    --zone="${ZONE}" --worker=all
  # Unpack over the previous copy but keep each host's .venv (and its stamp).
  on_all_workers "mkdir -p ~/${REMOTE_DIR} && tar -xzf ~/mixer.tar.gz -C ~/${REMOTE_DIR}"
  rm -rf "${tmpdir}"
}

run() {
  if [[ $# -eq 0 ]]; then
    echo "run needs mixer.main flags, e.g. --config=configs/mixer_l16_i21k.py --workdir=gs://..." >&2
    exit 2
  fi
  copy
  local args
  args="$(printf ' %q' "$@")"  # Quoted for the remote shell.
  local cmd="cd ~/${REMOTE_DIR} && bash launch/run_on_host.sh${args}"
  if [[ "${RUN_DETACHED:-0}" == 1 ]]; then
    cmd="cd ~/${REMOTE_DIR} && nohup bash launch/run_on_host.sh${args} > nohup.out 2>&1 &"
  fi
  if [[ -n "${TFDS_DATA_DIR:-}" ]]; then
    # Passed on to every host, where TFDS reads it (--config.data_dir wins).
    cmd="export TFDS_DATA_DIR=$(printf '%q' "${TFDS_DATA_DIR}"); ${cmd}"
  fi
  on_all_workers "${cmd}"
}

delete() {
  gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" --quiet
}

case "${1:-help}" in
  create) create ;;
  copy) copy ;;
  run) shift; run "$@" ;;
  ssh) shift; on_all_workers "$*" ;;
  delete) delete ;;
  help | -h | --help) usage 0 ;;
  *) echo "unknown subcommand: $1" >&2; usage 2 ;;
esac
