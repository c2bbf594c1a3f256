"""The launch scripts: --help without settings, --dry-run output, Python >= 3.11 on TPU hosts.

Commands the scripts would run (gcloud, srun, python3, uv) are replaced by stand-ins on
PATH that log their calls, so nothing reaches a cloud or a cluster, and a dry run is
checked to call none of them.
"""

import json
import os
import shlex
import stat
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
SCRIPTS = ('tpu_pod.sh', 'run_on_host.sh', 'gpu_cluster.sh')
# Arguments with a space, commas, a quote and a shell metacharacter: they must reach
# mixer.main unchanged through every layer of quoting.
TRICKY_ARGS = ['--config=configs/mixer_jft.py:variant=B_16,tfrecords=gs://b/jft',
               '--workdir=gs://my bucket/run 1', "--config.note=it's;$HOME", '--config.seed=0']


def _stand_in(bin_dir, name, body):
  path = os.path.join(bin_dir, name)
  with open(path, 'w', encoding='utf-8') as f:
    f.write('#!/bin/bash\n' + textwrap.dedent(body))
  os.chmod(path, 0o755)
  return path


@pytest.fixture
def sandbox(tmp_path):
  """A PATH whose gcloud/srun/scontrol stand-ins log their calls; a fresh HOME."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  log = tmp_path / 'calls.log'
  for name in ('gcloud', 'srun'):
    _stand_in(bin_dir, name, f'echo "{name} $*" >> {log}\nexit 99\n')
  _stand_in(bin_dir, 'scontrol', 'echo node-a1; echo node-a2\n')
  home = tmp_path / 'home'
  home.mkdir()
  env = {'PATH': f'{bin_dir}:/usr/bin:/bin', 'HOME': str(home)}
  return tmp_path, bin_dir, log, env


def _run(script, args, env, **kwargs):
  return subprocess.run(['bash', os.path.join(LAUNCH, script), *args], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=60, **kwargs)


@pytest.mark.parametrize('script', SCRIPTS)
def test_script_is_valid_bash_with_strict_mode_and_executable(script):
  path = os.path.join(LAUNCH, script)
  subprocess.run(['bash', '-n', path], check=True)
  with open(path, encoding='utf-8') as f:
    assert 'set -euo pipefail' in f.read()
  assert os.stat(path).st_mode & stat.S_IXUSR, f'{script} is not executable'
  mode = subprocess.run(['git', 'ls-files', '-s', path], cwd=REPO, capture_output=True,
                        text=True, check=True).stdout.split()[:1]
  assert mode in ([], ['100755']), f'{script} has mode {mode} in git'


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_works_with_no_environment(script):
  result = _run(script, ['--help'], {'PATH': '/usr/bin:/bin'})
  assert result.returncode == 0, result.stderr
  assert '--dry-run' in result.stdout and '75' in result.stdout


def test_tpu_pod_names_the_missing_settings(sandbox):
  _, _, log, env = sandbox
  result = _run('tpu_pod.sh', ['--dry-run', 'run', '--config=configs/digits.py'], env)
  assert result.returncode == 2
  assert result.stderr.startswith('error: set TPU_NAME')
  assert 'ZONE' in result.stderr and not log.exists()


def _only_line(lines, *words):
  found = [line for line in lines if all(w in line for w in words)]
  assert len(found) == 1, (words, lines)
  return shlex.split(found[0])


def test_tpu_pod_dry_run_prints_each_step_once_on_all_workers(sandbox):
  tmp_path, _, log, env = sandbox
  env.update(TPU_NAME='mixer', ZONE='europe-west4-a', TFDS_DATA_DIR='gs://b/tfds dir')
  result = _run('tpu_pod.sh', ['--dry-run', 'run', *TRICKY_ARGS], env)
  assert result.returncode == 0, result.stderr
  assert not log.exists(), 'a dry run called gcloud'
  lines = result.stdout.strip().splitlines()
  gcloud = [shlex.split(line) for line in lines if line.startswith('gcloud ')]
  # The code is copied once (scp, then unpacked), then the trainer starts: every
  # step that touches the workers runs on all of them.
  assert [g[:5] for g in gcloud] == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'],
                                     ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'],
                                     ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']]
  for words in gcloud:
    assert '--worker=all' in words and '--zone=europe-west4-a' in words
  assert sum(line.startswith('tar -czf') for line in lines) == 1
  # What each worker's shell gets: run it in a stand-in worker home whose
  # run_on_host.sh reports the arguments that reached it.
  remote = next(w for w in gcloud[2] if w.startswith('--command='))[len('--command='):]
  worker_home = tmp_path / 'worker'
  (worker_home / 'mixer' / 'launch').mkdir(parents=True)
  (worker_home / 'mixer' / 'launch' / 'run_on_host.sh').write_text(
      f'{sys.executable} -c "import json, os, sys; print(json.dumps('
      '[sys.argv[1:], os.environ[\'TFDS_DATA_DIR\']]))" "$@"\n')
  worker = subprocess.run(['bash', '-c', remote], env={'HOME': str(worker_home)},
                          capture_output=True, text=True, timeout=60, check=True)
  assert json.loads(worker.stdout) == [TRICKY_ARGS, 'gs://b/tfds dir']
  assert (worker_home / 'mixer' / '.exit_status').read_text().strip() == '0'


def test_tpu_pod_run_without_copy_and_detached(sandbox):
  _, _, _, env = sandbox
  env.update(TPU_NAME='mixer', ZONE='z', NO_COPY='1', RUN_DETACHED='1')
  result = _run('tpu_pod.sh', ['--dry-run', 'run', '--config=configs/digits.py'], env)
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1 and '--worker=all' in lines[0] and 'nohup bash' in lines[0]


def test_tpu_pod_create_and_delete_dry_run(sandbox):
  _, _, log, env = sandbox
  env.update(TPU_NAME='mixer', ZONE='z', SPOT='1', ACCELERATOR='v3-32')
  create = _run('tpu_pod.sh', ['--dry-run', 'create'], env).stdout.split()
  assert create[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create']
  assert {'--accelerator-type=v3-32', '--version=tpu-ubuntu2204-base', '--spot'} <= set(create)
  delete = _run('tpu_pod.sh', ['--dry-run', 'delete'], env).stdout.split()
  assert delete[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'mixer']
  assert not log.exists()


def _preempting_gcloud(bin_dir, log, worker_status):
  """gcloud whose slice-wide ssh fails and whose worker 0 reports `worker_status`."""
  _stand_in(bin_dir, 'gcloud', f'''
      echo "gcloud $*" >> {log}
      case "$*" in
        *--worker=0*) echo {worker_status} ;;
        *--worker=all*) exit 1 ;;
      esac
      ''')


def test_tpu_pod_reruns_after_a_preemption_then_exits_75(sandbox):
  _, bin_dir, log, env = sandbox
  _preempting_gcloud(bin_dir, log, worker_status=75)
  env.update(TPU_NAME='mixer', ZONE='z', NO_COPY='1', MAX_RESTARTS='2')
  result = _run('tpu_pod.sh', ['run', '--config=configs/digits.py'], env)
  assert result.returncode == 75, result.stderr
  runs = [line for line in log.read_text().splitlines() if '--worker=all' in line]
  assert len(runs) == 3  # The first run and 2 restarts.
  assert 'Rerun the same' in result.stderr and 'rerunning to resume (2 of 2)' in result.stderr


def test_tpu_pod_reports_other_failures_without_rerunning(sandbox):
  _, bin_dir, log, env = sandbox
  _preempting_gcloud(bin_dir, log, worker_status=1)
  env.update(TPU_NAME='mixer', ZONE='z', NO_COPY='1', MAX_RESTARTS='2')
  result = _run('tpu_pod.sh', ['run', '--config=configs/digits.py'], env)
  assert result.returncode == 1
  assert result.stderr.startswith('error: training failed')
  assert sum('--worker=all' in line for line in log.read_text().splitlines()) == 1


def test_gpu_cluster_dry_run_prints_srun_with_the_flags_intact(sandbox):
  tmp_path, _, log, env = sandbox
  venv = tmp_path / 'venv'
  (venv / 'bin').mkdir(parents=True)
  (venv / 'bin' / 'python').write_text('')
  (venv / 'bin' / 'python').chmod(0o755)
  outside = _run('gpu_cluster.sh', TRICKY_ARGS, env)
  assert outside.returncode == 2 and outside.stderr.startswith('error: not inside a SLURM job')
  env.update(SLURM_JOB_NODELIST='node-a[1-2]', SLURM_NNODES='2', VENV=str(venv))
  result = _run('gpu_cluster.sh', ['--dry-run', *TRICKY_ARGS], env)
  assert result.returncode == 0, result.stderr
  assert not log.exists()
  srun_line = result.stdout.split('\n# on exit status 75')[0]
  words = shlex.split(srun_line)
  assert words[:6] == ['env', f'REPO_ROOT={REPO}', f'VENV={venv}', 'PORT=1234',
                       'HEAD=node-a1', 'srun']
  assert '--ntasks=2' in words and words[-len(TRICKY_ARGS) - 1:] == ['mixer', *TRICKY_ARGS]
  assert 'scontrol requeue' in result.stdout


def test_gpu_cluster_requires_the_venv(sandbox):
  tmp_path, _, _, env = sandbox
  env.update(SLURM_JOB_NODELIST='n1', SLURM_NNODES='1', VENV=str(tmp_path / 'none'))
  result = _run('gpu_cluster.sh', ['--dry-run', '--config=configs/digits.py'], env)
  assert result.returncode == 2 and result.stderr.startswith('error: no Python venv at')


# --- run_on_host.sh: a Python >= 3.11 on a TPU VM image whose python3 is 3.10 ---

def _fake_tpu_image(bin_dir, log, venv_version='3.11.9', trainer_status=0):
  """python3 3.10 with pip (as on tpu-ubuntu2204-base); uv and its venv as stand-ins.

  `pip install --target DIR uv==V` makes DIR/bin/uv; `uv venv ... DIR` makes a
  DIR/bin/python reporting `venv_version` whose `-m mixer.main` prints its arguments
  and MIXER_DISTRIBUTED as JSON and exits `trainer_status`.
  """
  templates = bin_dir.parent / 'templates'
  templates.mkdir(exist_ok=True)
  _stand_in(templates, 'venv_python', f'''
      echo "venv-python $*" >> {log}
      case "$1" in
        -c) echo {venv_version} ;;
        -m) if [ "$2" = mixer.main ]; then
              shift 2
              {sys.executable} -c \\
                'import json, os, sys; print(json.dumps({{"args": sys.argv[1:],
                 "distributed": os.environ["MIXER_DISTRIBUTED"]}}))' "$@"
              exit {trainer_status}
            fi ;;
      esac
      ''')
  _stand_in(templates, 'uv', f'''
      echo "uv $*" >> {log}
      venv="${{@: -1}}"
      mkdir -p "$venv/bin"
      cp {templates}/venv_python "$venv/bin/python"
      ''')
  _stand_in(bin_dir, 'python3', f'''
      echo "python3 $*" >> {log}
      case "$*" in
        -c*) echo 3.10.12 ;;
        "-m pip --version") echo "pip 22.0.2 (python 3.10)" ;;
        "-m pip install"*)
          target="${{@: -2:1}}"
          mkdir -p "$target/bin"
          cp {templates}/uv "$target/bin/uv" ;;
        *) exit 1 ;;
      esac
      ''')


def test_run_on_host_refuses_an_old_python_and_names_the_fix(sandbox):
  tmp_path, bin_dir, log, env = sandbox
  _fake_tpu_image(bin_dir, log)
  env.update(PYTHON='python3', VENV=str(tmp_path / 'venv'))
  for args in (['--dry-run', *TRICKY_ARGS], TRICKY_ARGS):
    result = _run('run_on_host.sh', args, env)
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith('error: PYTHON=python3 is Python 3.10.12')
    assert 'Unset PYTHON' in error and '3.11' in error
  assert not (tmp_path / 'venv').exists()


def test_run_on_host_dry_run_provides_python_3_11_with_uv(sandbox):
  tmp_path, bin_dir, log, env = sandbox
  _fake_tpu_image(bin_dir, log)
  venv = str(tmp_path / 'venv')
  env['VENV'] = venv
  result = _run('run_on_host.sh', ['--dry-run', *TRICKY_ARGS], env)
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line) for line in result.stdout.strip().splitlines()]
  uv_dir = os.path.join(env['HOME'], '.cache', 'mixer', 'uv-0.13.9')
  assert commands[0] == ['python3', '-m', 'pip', 'install', '--quiet', '--target', uv_dir,
                         'uv==0.13.9']
  assert commands[1] == [f'{uv_dir}/bin/uv', 'venv', '--seed', '--python', '3.11', venv]
  assert commands[3] == [f'{venv}/bin/python', '-m', 'pip', 'install', '--quiet', '-c',
                         'constraints.txt', '-e', '.[tpu]']
  assert commands[4] == ['MIXER_DISTRIBUTED=1', f'{venv}/bin/python', '-m', 'mixer.main',
                         *TRICKY_ARGS]
  # Only read-only version checks ran: no install, no venv.
  calls = log.read_text().splitlines()
  assert all(c.startswith(('python3 -c', 'python3 -m pip --version')) for c in calls), calls
  assert not os.path.exists(venv)


def test_run_on_host_builds_the_venv_once_and_passes_the_trainer_status(sandbox):
  tmp_path, bin_dir, log, env = sandbox
  _fake_tpu_image(bin_dir, log, trainer_status=75)
  venv = tmp_path / 'venv'
  env['VENV'] = str(venv)
  first = _run('run_on_host.sh', TRICKY_ARGS, env)
  assert first.returncode == 75, first.stderr  # The trainer's "preempted" reaches the caller.
  assert json.loads(first.stdout) == {'args': TRICKY_ARGS, 'distributed': '1'}
  calls = log.read_text()
  assert 'uv venv --seed --python 3.11' in calls
  assert "pip install --quiet -c constraints.txt -e .[tpu]" in calls
  assert (venv / '.installed-tpu').is_file()
  log.write_text('')
  second = _run('run_on_host.sh', TRICKY_ARGS, env)  # Same inputs: no uv, no pip.
  assert second.returncode == 75
  assert 'uv ' not in log.read_text() and 'pip install' not in log.read_text()


def test_run_on_host_replaces_a_venv_of_an_old_python(sandbox):
  tmp_path, bin_dir, log, env = sandbox
  _fake_tpu_image(bin_dir, log)
  venv = tmp_path / 'venv'
  (venv / 'bin').mkdir(parents=True)
  _stand_in(venv / 'bin', 'python', 'echo 3.10.12\n')  # Made by python3 -m venv on 3.10.
  env['VENV'] = str(venv)
  result = _run('run_on_host.sh', ['--config=configs/digits.py'], env)
  assert result.returncode == 0, result.stderr
  assert 'has Python 3.10.12' in result.stderr and 'replacing it' in result.stderr
  assert json.loads(result.stdout)['args'] == ['--config=configs/digits.py']


def test_run_on_host_needs_flags(sandbox):
  _, _, _, env = sandbox
  result = _run('run_on_host.sh', [], env)
  assert result.returncode == 2 and result.stderr.startswith('error: pass mixer.main flags')
