#!/usr/bin/env bash
# Per-host bootstrap for TPU VM runs: run it on EVERY worker of the slice
# (`launch/tpu_pod.sh run` does).
#
#   launch/run_on_host.sh [--dry-run] --config=configs/mixer_l16_i21k.py --workdir=gs://BUCKET/run
#
# 1. A Python >= 3.11 venv (jax 0.10.2 and setup.py need 3.11; the TPU VM image
#    tpu-ubuntu2204-base has Python 3.10 and no venv module). The venv is made by
#    uv (pinned, installed from PyPI with the image's pip into
#    ~/.cache/mixer/uv-<version>, no sudo): `uv venv --python 3.11` uses a Python
#    3.11 of the machine if there is one, otherwise it installs a standalone
#    CPython 3.11 into ~/.local/share/uv/python. Set PYTHON=/path/to/python3.X
#    (3.11 or newer, with its venv module) to make the venv with that interpreter
#    instead; an older one is an error. A venv of an older Python (left by an
#    earlier version of this script) is replaced. Each TPU VM host has its own
#    disk, so every host does this once.
# 2. Installs the package with the TPU extra, pinned by constraints.txt, so every
#    host runs the same jax/flax/optax as the tested CPU stack. Re-installs only
#    when setup.py, requirements.txt or constraints.txt change.
# 3. Runs `python -m mixer.main "$@"` with MIXER_DISTRIBUTED=1, which makes
#    mixer.main call jax.distributed.initialize(); on TPU VMs that finds the
#    coordinator and the other hosts by itself. The exit status is the trainer's:
#    75 (EX_TEMPFAIL) means "preempted, checkpoint saved": rerun the same command
#    to resume from it.
#
# Options (before the mixer.main flags):
#   --dry-run   print the commands (uv, venv, pip, the trainer) and run none.
#   -h, --help  this help.
# Environment (optional): PYTHON (see 1), VENV (default <repo>/.venv);
# TFDS_DATA_DIR is passed through to TFDS like any other variable.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "${REPO_ROOT}/launch/common.sh"

usage() {
  print_header "${BASH_SOURCE[0]}"
  exit "${1:-0}"
}

DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage 0 ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then
  die "pass mixer.main flags, e.g. launch/run_on_host.sh --config=configs/mixer_l16_i21k.py --workdir=gs://BUCKET/run"
fi

cd "${REPO_ROOT}"
VENV="${VENV:-${REPO_ROOT}/.venv}"
STAMP="${VENV}/.installed-tpu"
# The Python the stack is verified on (README "Dependency stack"), and the uv that provides it.
VENV_PYTHON=3.11
UV_VERSION=0.13.9
UV_DIR="${HOME}/.cache/mixer/uv-${UV_VERSION}"
PIP_VERSION=26.3  # The Makefile's.
HOST="$(hostname)"

python_version() {  # "3.10.12", or nothing if $1 does not run.
  "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || true
}

at_least_3_11() {
  local major minor
  IFS=. read -r major minor _ <<< "$1"
  [[ -n "${major}" && -n "${minor}" ]] && (( major > 3 || (major == 3 && minor >= 11) ))
}

create_venv() {
  if [[ -n "${PYTHON:-}" ]]; then
    local version
    version="$(python_version "${PYTHON}")"
    if [[ -z "${version}" ]]; then
      die "PYTHON=${PYTHON} does not run. Set PYTHON to a Python 3.11 or newer, or unset it to let this script install CPython ${VENV_PYTHON} with uv."
    fi
    if ! at_least_3_11 "${version}"; then
      die "PYTHON=${PYTHON} is Python ${version}, but mixer needs Python 3.11 or newer (jax 0.10.2). Unset PYTHON to let this script install CPython ${VENV_PYTHON} with uv, or set PYTHON to a python3.11 or newer."
    fi
    step "${PYTHON}" -m venv "${VENV}"
    return
  fi
  if [[ ! -x "${UV_DIR}/bin/uv" ]]; then
    if ! command -v python3 > /dev/null; then
      die "no python3 on PATH to install uv with. Install one (sudo apt-get install -y python3-pip) or set PYTHON to a Python 3.11 or newer."
    fi
    if ! python3 -m pip --version > /dev/null 2>&1; then
      die "python3 has no pip to install uv with. Run: sudo apt-get install -y python3-pip (or set PYTHON to a Python 3.11 or newer)."
    fi
    # --target: uv's wheel is one static binary; a private folder needs no sudo, does not
    # touch the image's packages and is exempt from PEP 668's externally-managed check.
    step python3 -m pip install --quiet --target "${UV_DIR}" "uv==${UV_VERSION}"
  fi
  # --seed puts pip into the venv for the install step below.
  step "${UV_DIR}/bin/uv" venv --seed --python "${VENV_PYTHON}" "${VENV}"
}

need_venv=0
if [[ -x "${VENV}/bin/python" ]]; then
  existing="$(python_version "${VENV}/bin/python")"
  if ! at_least_3_11 "${existing}"; then
    echo "[${HOST}] ${VENV} has Python ${existing:-that does not run}; mixer needs 3.11 or newer: replacing it" >&2
    step rm -rf "${VENV}"
    need_venv=1
  fi
else
  need_venv=1
fi
if [[ "${need_venv}" == 1 ]]; then
  echo "[${HOST}] creating ${VENV}" >&2
  create_venv
  if [[ "${DRY_RUN}" != 1 ]] && ! at_least_3_11 "$(python_version "${VENV}/bin/python")"; then
    die "the new ${VENV} does not run Python 3.11 or newer. Remove it (rm -rf ${VENV}) and set PYTHON to a python3.11 or newer."
  fi
fi

# A content hash of the install inputs: a changed pin triggers a re-install, an
# unchanged one skips pip (seconds instead of minutes on every launch).
install_hash="$(cat setup.py requirements.txt constraints.txt | sha256sum | cut -d' ' -f1)"
if [[ "${need_venv}" == 1 || ! -f "${STAMP}" || "$(cat "${STAMP}")" != "${install_hash}" ]]; then
  echo "[${HOST}] installing mixer[tpu] with constraints.txt" >&2
  step "${VENV}/bin/python" -m pip install --quiet --upgrade "pip==${PIP_VERSION}"
  step "${VENV}/bin/python" -m pip install --quiet -c constraints.txt -e '.[tpu]'
  if [[ "${DRY_RUN}" != 1 ]]; then echo "${install_hash}" > "${STAMP}"; fi
fi

if [[ "${DRY_RUN}" == 1 ]]; then
  shell_quote MIXER_DISTRIBUTED=1 "${VENV}/bin/python" -m mixer.main "$@"
  exit 0
fi
echo "[${HOST}] python -m mixer.main $(shell_quote "$@")" >&2
export MIXER_DISTRIBUTED=1
exec "${VENV}/bin/python" -m mixer.main "$@"
