"""The launch scripts parse, and start the trainer the way the README says."""

import glob
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, 'launch', '*.sh')))


def test_there_are_launch_scripts():
  names = {os.path.basename(p) for p in SCRIPTS}
  assert {'tpu_pod.sh', 'run_on_host.sh', 'gpu_cluster.sh'} <= names


@pytest.mark.parametrize('path', SCRIPTS, ids=os.path.basename)
def test_script_is_valid_bash_with_strict_mode(path):
  subprocess.run(['bash', '-n', path], check=True)
  with open(path, encoding='utf-8') as f:
    assert 'set -euo pipefail' in f.read()


def test_every_host_runs_the_trainer_with_distributed_start_up():
  with open(os.path.join(REPO, 'launch', 'run_on_host.sh'), encoding='utf-8') as f:
    text = f.read()
  assert 'MIXER_DISTRIBUTED=1' in text and 'mixer.main' in text
  with open(os.path.join(REPO, 'launch', 'tpu_pod.sh'), encoding='utf-8') as f:
    assert '--worker=all' in f.read()
  with open(os.path.join(REPO, 'launch', 'gpu_cluster.sh'), encoding='utf-8') as f:
    text = f.read()
  for flag in ('--coordinator_address', '--num_processes', '--process_id'):
    assert flag in text
