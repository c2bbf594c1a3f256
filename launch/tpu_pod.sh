#!/usr/bin/env bash
# Create a Cloud TPU VM pod slice, copy this repository to all its workers, run
# training on ALL workers, and delete the slice. Run it from your workstation
# (gcloud installed and authenticated, a project set).
#
#   export TPU_NAME=mixer ZONE=europe-west4-a ACCELERATOR=v3-128
#   launch/tpu_pod.sh create
#   launch/tpu_pod.sh run --config=configs/mixer_l16_i21k.py \
#       --workdir=gs://$BUCKET/mixer/l16_i21k --config.data_dir=gs://$BUCKET/tensorflow_datasets
#   launch/tpu_pod.sh ssh 'tail -n 50 ~/mixer/nohup.out'   # any command, all workers
#   launch/tpu_pod.sh delete
#
#   launch/tpu_pod.sh --dry-run run --config=...   # print the gcloud commands, run none
#
# Subcommands:
#   create   gcloud compute tpus tpu-vm create (ACCELERATOR, TPU_VERSION, SPOT).
#   copy     ship the working tree to ~/$REMOTE_DIR on every worker.
#   run      copy, then launch/run_on_host.sh <mixer.main flags> on every worker
#            (--worker=all). NO_COPY=1 skips the copy.
#   ssh      any shell command on every worker.
#   delete   delete the slice.
# Every host of a slice must run the same command: JAX's multi-host start-up
# waits for all of them, so a command started on worker 0 alone hangs ("TPU
# backend initialization is taking more than 60 s", jax-ml/jax#22436). Every
# multi-host step here uses --worker=all. The training runs in the foreground of
# each ssh session; RUN_DETACHED=1 starts it under nohup and returns.
#
# Preemption: a worker's trainer exits with status 75 (EX_TEMPFAIL) after it has
# saved a checkpoint at a preemption notice. `run` then says so and, with
# MAX_RESTARTS=N, runs the same command again (up to N times), which resumes from
# that checkpoint; otherwise it exits 75 and rerunning the same `run` resumes. A
# spot slice that was taken away must be created again first (`create`).
#
# Options (before the subcommand): --dry-run (also DRY_RUN=1) prints the exact
# commands (tar, gcloud scp/ssh/create/delete) and runs none; -h, --help.
# Environment:
#   TPU_NAME      slice name (required, except for --help).
#   ZONE          e.g. europe-west4-a for v3 (required, except for --help).
#   ACCELERATOR   e.g. v3-8, v3-32, v3-128, v4-64 (create only; default v3-128).
#   TPU_VERSION   TPU VM runtime image (create only; default tpu-ubuntu2204-base).
#   SPOT=1        create a spot (preemptible) slice; mixer resumes from checkpoints.
#   REMOTE_DIR    where the repository lives on each worker (default mixer, in ~).
#   RUN_DETACHED=1  start training under nohup (log: ~/$REMOTE_DIR/nohup.out) and return.
#   MAX_RESTARTS  reruns of `run` after a preemption exit (75); default 0.
#   NO_COPY=1     `run` without copying the working tree first.
#   TFDS_DATA_DIR passed on to every worker when set.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "${REPO_ROOT}/launch/common.sh"

EX_TEMPFAIL=75  # The trainer's "preempted, checkpoint saved, rerun to resume".

usage() {
  print_header "${BASH_SOURCE[0]}"
  exit "${1:-0}"
}

require_settings() {
  local missing=()
  [[ -n "${TPU_NAME:-}" ]] || missing+=("TPU_NAME (the TPU VM name, e.g. TPU_NAME=mixer)")
  [[ -n "${ZONE:-}" ]] || missing+=("ZONE (e.g. ZONE=europe-west4-a for v3)")
  if [[ ${#missing[@]} -gt 0 ]]; then
    local joined
    joined="$(printf '%s and ' "${missing[@]}")"
    die "set ${joined% and }: export them or put them before the command (see launch/tpu_pod.sh --help)."
  fi
  ACCELERATOR="${ACCELERATOR:-v3-128}"
  TPU_VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
  REMOTE_DIR="${REMOTE_DIR:-mixer}"
  MAX_RESTARTS="${MAX_RESTARTS:-0}"
  [[ "${MAX_RESTARTS}" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS must be a number, got '${MAX_RESTARTS}'."
}

on_all_workers() {
  # One command, on every host of the slice, in parallel.
  step gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command="$1"
}

create() {
  local spot=()
  if [[ "${SPOT:-0}" == 1 ]]; then spot=(--spot); fi
  step gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" \
    --accelerator-type="${ACCELERATOR}" --version="${TPU_VERSION}" ${spot[@]+"${spot[@]}"}
}

copy() {
  # Ship the working tree as one tarball: no .venv, .git or workdirs (each host
  # builds its own venv), and one file is much faster than `scp --recurse` of
  # many small ones. Released weights (mixer_models/, up to 876 MB a file) are
  # left out: fetch them on the hosts, next to GCS (see finetune_*.py).
  local tmpdir tarball
  if [[ "${DRY_RUN:-0}" == 1 ]]; then tmpdir="${TMPDIR:-/tmp}/mixer-launch"; else tmpdir="$(mktemp -d)"; fi
  tarball="${tmpdir}/mixer.tar.gz"
  step tar -czf "${tarball}" -C "${REPO_ROOT}" \
    --exclude=./.venv --exclude=./.git --exclude=./workdirs \
    --exclude='*.egg-info' --exclude='__pycache__' --exclude=./.pytest_cache \
    --exclude=./mixer_models .
  step gcloud compute tpus tpu-vm scp "${tarball}" "${TPU_NAME}:~/mixer.tar.gz" \
    --zone="${ZONE}" --worker=all
  # Unpack over the previous copy but keep each host's .venv (and its stamp).
  on_all_workers "mkdir -p ~/${REMOTE_DIR} && tar -xzf ~/mixer.tar.gz -C ~/${REMOTE_DIR}"
  if [[ "${DRY_RUN:-0}" != 1 ]]; then rm -rf "${tmpdir}"; fi
}

run() {
  if [[ $# -eq 0 ]]; then
    die "run needs mixer.main flags, e.g. launch/tpu_pod.sh run --config=configs/mixer_l16_i21k.py --workdir=gs://BUCKET/run"
  fi
  if [[ "${NO_COPY:-0}" != 1 ]]; then copy; fi
  local trainer cmd
  trainer="bash launch/run_on_host.sh $(shell_quote "$@")"  # Quoted for the remote shell.
  if [[ "${RUN_DETACHED:-0}" == 1 ]]; then
    cmd="cd ~/${REMOTE_DIR} && nohup ${trainer} > nohup.out 2>&1 &"
  else
    # Each worker keeps the trainer's exit status (for the preemption check below) and
    # says when it was preempted.
    cmd="cd ~/${REMOTE_DIR} && { ${trainer}; status=\$?; echo \$status > .exit_status;"
    cmd+=" if [ \$status = ${EX_TEMPFAIL} ]; then echo \"[\$(hostname)] preempted:"
    cmd+=" checkpoint saved (exit ${EX_TEMPFAIL})\"; fi; exit \$status; }"
  fi
  if [[ -n "${TFDS_DATA_DIR:-}" ]]; then
    # Passed on to every host, where TFDS reads it (--config.data_dir wins).
    cmd="export TFDS_DATA_DIR=$(shell_quote "${TFDS_DATA_DIR}"); ${cmd}"
  fi
  if [[ "${DRY_RUN:-0}" == 1 || "${RUN_DETACHED:-0}" == 1 ]]; then
    on_all_workers "${cmd}"
    return
  fi
  local attempt status worker_status
  for ((attempt = 0; ; attempt++)); do
    status=0
    on_all_workers "${cmd}" || status=$?
    if [[ "${status}" == 0 ]]; then return 0; fi
    # gcloud's own status does not say which worker failed how: read worker 0's.
    worker_status="$(gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=0 \
      --command="cat ~/${REMOTE_DIR}/.exit_status" 2> /dev/null || true)"
    if [[ "${worker_status}" != "${EX_TEMPFAIL}" ]]; then
      echo "error: training failed (gcloud exit status ${status}, worker 0: ${worker_status:-unknown})." \
        "If the slice was preempted (gcloud compute tpus tpu-vm describe ${TPU_NAME} --zone=${ZONE})," \
        "create it again and rerun the same command: training resumes from the last checkpoint." >&2
      exit "${status}"
    fi
    if (( attempt >= MAX_RESTARTS )); then
      echo "Preempted: a checkpoint was saved (exit ${EX_TEMPFAIL}). Rerun the same" \
        "launch/tpu_pod.sh run command to resume (or set MAX_RESTARTS=N to rerun automatically)." >&2
      exit "${EX_TEMPFAIL}"
    fi
    echo "Preempted: a checkpoint was saved (exit ${EX_TEMPFAIL}); rerunning to resume" \
      "($((attempt + 1)) of ${MAX_RESTARTS})." >&2
  done
}

delete() {
  step gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" --quiet
}

DRY_RUN="${DRY_RUN:-0}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help | help) usage 0 ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then usage 2; fi
subcommand="$1"
shift
case "${subcommand}" in
  create | copy | run | ssh | delete) require_settings ;;
  *) echo "error: unknown subcommand '${subcommand}'" >&2; usage 2 ;;
esac
case "${subcommand}" in
  create) create ;;
  copy) copy ;;
  run) run "$@" ;;
  ssh)
    [[ $# -gt 0 ]] || die "ssh needs a command, e.g. launch/tpu_pod.sh ssh 'tail -n 50 ~/mixer/nohup.out'"
    on_all_workers "$*" ;;
  delete) delete ;;
esac
