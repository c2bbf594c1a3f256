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
# Environment: PORT (coordinator port, default 1234), VENV (default
# <repo>/.venv). Edit the #SBATCH lines for your cluster (partition, account).
#
#SBATCH --job-name=mixer
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --output=mixer-%j.out
set -euo pipefail

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "Submit with sbatch (see the header of $0); not inside a SLURM job." >&2
  exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "Pass mixer.main flags, e.g. --config=configs/mixer_b16_i1k.py --workdir=..." >&2
  exit 2
fi

# sbatch runs a copy of this script from a spool directory: locate the repo from
# the submission directory instead.
REPO_ROOT="${SLURM_SUBMIT_DIR:-$(pwd)}"
VENV="${VENV:-${REPO_ROOT}/.venv}"
PORT="${PORT:-1234}"
HEAD="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
export REPO_ROOT VENV PORT HEAD

# SLURM_PROCID differs per task, so it must be expanded inside each task (the
# single-quoted command), not here in the batch script.
srun --ntasks="${SLURM_NNODES}" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  bash -c 'cd "${REPO_ROOT}" && exec "${VENV}/bin/python" -m mixer.main \
    --coordinator_address="${HEAD}:${PORT}" \
    --num_processes="${SLURM_NNODES}" \
    --process_id="${SLURM_PROCID}" "$@"' mixer "$@"
