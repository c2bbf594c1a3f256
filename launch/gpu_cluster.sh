#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, each driving all of
# its node's GPUs; the processes find each other through an explicit coordinator.
#
#   sbatch --nodes=4 launch/gpu_cluster.sh --config=configs/mixer_b16_i1k.py \
#     --workdir=/shared/workdirs/b16_i1k --config.data_dir=/shared/tensorflow_datasets
#
# Every node runs
#   python -m mixer.main --coordinator_address=$HEAD:$PORT \
#     --num_processes=$SLURM_NNODES --process_id=$SLURM_PROCID "$@"
# with HEAD the first node of the allocation (process 0 hosts the coordinator).
# The repository must be on a filesystem every node sees, with its .venv built
# once beforehand on one node:
#   python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[gpu]'
#
# Preemption: when SLURM preempts or times out the job it sends SIGTERM; the
# trainer saves a checkpoint and exits with status 75 (EX_TEMPFAIL). This script
# then requeues the job (`scontrol requeue`, allowed by `#SBATCH --requeue`) up
# to MAX_RESTARTS times; the requeued job resumes from that checkpoint. After
# that it exits 75: `sbatch` the same command again to resume.
#
# Options (before the mixer.main flags): --dry-run prints the srun command (and
# the requeue it would do) and runs none; -h, --help. Both work outside a job
# too; --dry-run then needs SLURM_JOB_NODELIST and SLURM_NNODES set by hand.
# Environment: PORT (coordinator port, default 1234), VENV (default
# <repo>/.venv), MAX_RESTARTS (requeues after a preemption, default 3). Edit the
# #SBATCH lines for your cluster (partition, account).
#
#SBATCH --job-name=mixer
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --output=mixer-%j.out
set -euo pipefail

EX_TEMPFAIL=75  # The trainer's "preempted, checkpoint saved, rerun to resume".

# sbatch runs a copy of this script from a spool directory: locate the repo from
# the submission directory instead.
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  REPO_ROOT="${SLURM_SUBMIT_DIR:-$(pwd)}"
else
  REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fi
if [[ ! -f "${REPO_ROOT}/launch/common.sh" ]]; then
  echo "error: ${REPO_ROOT} is not the mixer repository: submit from the repository root" \
    "(cd mixer && sbatch launch/gpu_cluster.sh ...)." >&2
  exit 2
fi
# shellcheck source=launch/common.sh
source "${REPO_ROOT}/launch/common.sh"

DRY_RUN="${DRY_RUN:-0}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) print_header "${BASH_SOURCE[0]}" | sed '/^SBATCH/,$d'; exit 0 ;;
    *) break ;;
  esac
done

if [[ -z "${SLURM_JOB_ID:-}" && "${DRY_RUN}" != 1 ]]; then
  die "not inside a SLURM job: submit with sbatch (sbatch --nodes=4 launch/gpu_cluster.sh --config=... --workdir=...), or add --dry-run to see the commands."
fi
if [[ $# -eq 0 ]]; then
  die "pass mixer.main flags, e.g. launch/gpu_cluster.sh --config=configs/mixer_b16_i1k.py --workdir=/shared/workdirs/b16_i1k"
fi
[[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "SLURM_JOB_NODELIST is not set (SLURM sets it inside a job; set it by hand for --dry-run, e.g. SLURM_JOB_NODELIST=node[1-2])."
[[ -n "${SLURM_NNODES:-}" ]] || die "SLURM_NNODES is not set (SLURM sets it inside a job; set it by hand for --dry-run)."

VENV="${VENV:-${REPO_ROOT}/.venv}"
PORT="${PORT:-1234}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
[[ "${MAX_RESTARTS}" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS must be a number, got '${MAX_RESTARTS}'."
if [[ ! -x "${VENV}/bin/python" ]]; then
  die "no Python venv at ${VENV}: build it once on one node: cd ${REPO_ROOT} && python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[gpu]' (or set VENV)."
fi
# sed reads the whole list (head would close the pipe early: SIGPIPE, exit 141 under pipefail).
HEAD="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | sed -n 1p)"

# The tasks inherit the environment (srun's default --export=ALL); `env` puts these four
# into it, which also makes the --dry-run line complete. SLURM_PROCID differs per task,
# so it must be expanded inside each task (the single-quoted command), not here.
status=0
step env REPO_ROOT="${REPO_ROOT}" VENV="${VENV}" PORT="${PORT}" HEAD="${HEAD}" \
  srun --ntasks="${SLURM_NNODES}" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  bash -c 'cd "${REPO_ROOT}" && exec "${VENV}/bin/python" -m mixer.main \
    --coordinator_address="${HEAD}:${PORT}" \
    --num_processes="${SLURM_NNODES}" \
    --process_id="${SLURM_PROCID}" "$@"' mixer "$@" || status=$?

if [[ "${DRY_RUN}" == 1 ]]; then
  echo "# on exit status ${EX_TEMPFAIL} (preempted, checkpoint saved), up to MAX_RESTARTS=${MAX_RESTARTS} times:"
  shell_quote scontrol requeue "${SLURM_JOB_ID:-\$SLURM_JOB_ID}"
  exit 0
fi
if [[ "${status}" == "${EX_TEMPFAIL}" ]]; then
  # SLURM_RESTART_COUNT: how often this job was requeued so far.
  if (( ${SLURM_RESTART_COUNT:-0} < MAX_RESTARTS )); then
    echo "Preempted: a checkpoint was saved (exit ${EX_TEMPFAIL}); requeueing job" \
      "${SLURM_JOB_ID} to resume (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 )) of ${MAX_RESTARTS})." >&2
    scontrol requeue "${SLURM_JOB_ID}"
    exit 0
  fi
  echo "Preempted: a checkpoint was saved (exit ${EX_TEMPFAIL}), and the job was requeued" \
    "${MAX_RESTARTS} times already. Submit the same sbatch command again to resume." >&2
fi
exit "${status}"
