#!/usr/bin/env bash
# Per-host bootstrap for multi-host TPU runs: run it on EVERY worker of the slice.
#
#   launch/run_on_host.sh --config=configs/mixer_l16_i21k.py --workdir=gs://BUCKET/run
#
# 1. Creates .venv in the repository on first use (each TPU VM host has its own
#    disk, so every host does this once).
# 2. Installs the package with the TPU extra, pinned by constraints.txt, so every
#    host runs the same jax/flax/optax as the tested CPU stack. Re-installs only
#    when setup.py, requirements.txt or constraints.txt change.
# 3. Runs `python -m mixer.main "$@"` with MIXER_DISTRIBUTED=1, which makes
#    mixer.main call jax.distributed.initialize(); on TPU VMs that finds the
#    coordinator and the other hosts by itself.
#
# Environment (optional): PYTHON (default python3) to create the venv;
# TFDS_DATA_DIR is passed through to TFDS like any other variable.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${REPO_ROOT}"

PYTHON="${PYTHON:-python3}"
VENV="${REPO_ROOT}/.venv"
STAMP="${VENV}/.installed-tpu"

if [[ ! -x "${VENV}/bin/python" ]]; then
  echo "[$(hostname)] creating ${VENV}"
  "${PYTHON}" -m venv "${VENV}"
fi

# A content hash of the install inputs: a changed pin triggers a re-install, an
# unchanged one skips pip (seconds instead of minutes on every launch).
install_hash="$(cat setup.py requirements.txt constraints.txt | sha256sum | cut -d' ' -f1)"
if [[ ! -f "${STAMP}" || "$(cat "${STAMP}")" != "${install_hash}" ]]; then
  echo "[$(hostname)] installing mixer[tpu] with constraints.txt"
  "${VENV}/bin/python" -m pip install --quiet --upgrade pip
  "${VENV}/bin/python" -m pip install --quiet -c constraints.txt -e '.[tpu]'
  echo "${install_hash}" > "${STAMP}"
fi

echo "[$(hostname)] python -m mixer.main $*"
export MIXER_DISTRIBUTED=1
exec "${VENV}/bin/python" -m mixer.main "$@"
