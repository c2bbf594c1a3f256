"""Runs a Python snippet in a fresh process with N fake CPU devices.

The plain test process keeps its single CPU device; tests that need a mesh
start a subprocess through `run_with_devices`, which returns the snippet's
last stdout line parsed as JSON.
"""

import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(num_devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  return env


def run_with_devices(code: str, num_devices: int = 8, timeout: int = 600):
  result = subprocess.run(
      [sys.executable, '-c', textwrap.dedent(code)], env=subprocess_env(num_devices),
      capture_output=True, text=True, timeout=timeout, cwd=REPO)
  if result.returncode != 0:
    raise AssertionError(f'Subprocess failed ({result.returncode}):\n{result.stderr[-6000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])
