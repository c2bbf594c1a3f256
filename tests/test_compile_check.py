"""`mixer.compile_check`: the train step compiled ahead of time, memory per device.

The TPU tests compile for real TPU slices with libtpu (the `tpu` extra, which
`make install` installs); the rest of the suite stays on the CPU backend
(tests/conftest.py sets JAX_PLATFORMS=cpu).
"""

import glob
import os
import re
import subprocess
import sys

import pytest

from mixer import compile_check, config_lib
from tests import multidevice

REPO = multidevice.REPO
PRETRAINING_CONFIGS = sorted(glob.glob(os.path.join(REPO, 'configs', 'mixer_*.py')))

_LOCAL = r'''
import json, jax
from mixer import compile_check, config_lib
config = config_lib.base_config()
config.model.update(patch_size=4, hidden_dim=64, num_blocks=2, tokens_mlp_dim=32,
                    channels_mlp_dim=256)
config.update(image_size=32, batch_size=64)
results = {}
for name, mesh in {'data8': {'data': 8}, 'fsdp8': {'data': 1, 'fsdp': 8}}.items():
  config.mesh.update({'data': 1, 'fsdp': 1, 'model': 1})
  config.mesh.update(mesh)
  results[name] = compile_check.check(config, jax.devices(), hbm_gib=1.0)
print(json.dumps(results))
'''


def test_compiles_for_the_devices_and_fsdp_shrinks_the_per_device_state():
  results = multidevice.run_with_devices(_LOCAL, num_devices=8)
  data, fsdp = results['data8'], results['fsdp8']
  assert data['mesh'] == {'data': 8, 'fsdp': 1, 'model': 1}
  assert data['fits'] and fsdp['fits']
  assert data['params'] == fsdp['params'] > 0
  # Params + Adam moments split 8 ways: the arguments shrink by several times.
  assert fsdp['argument_gib'] < data['argument_gib'] / 3
  # Data parallelism all-reduces the float32 gradients: a ring sends 2 * 7/8 of their bytes
  # per device. FSDP updates 1/8 of the params per device: fewer HBM bytes per step.
  assert data['interconnect_gb_per_device'] == pytest.approx(
      2 * 7 / 8 * 4 * data['params'] / 1e9, rel=0.02)
  assert fsdp['hbm_traffic_gb_per_device'] < data['hbm_traffic_gb_per_device']


def test_topology_names():
  with pytest.raises(ValueError, match='power-of-two number of cores'):
    compile_check.topology_devices('v3-12')
  with pytest.raises(ValueError, match='Unknown topology'):
    compile_check.topology_devices('tpu128')


def test_v3_8_compile_plans_memory_below_the_hbm():
  """A Mixer-S/16 train step compiled for a v3-8 by libtpu, with its memory plan."""
  devices, generation = compile_check.topology_devices('v3-8')
  assert len(devices) == 8 and generation == 'v3'
  assert devices[0].device_kind == 'TPU v3'
  config = config_lib.base_config()
  config.model.name = 'Mixer-S_16'
  config.update(image_size=224, batch_size=64, model_dtype='bfloat16')
  result = compile_check.check(config, devices, compile_check.HBM_GIB[generation])
  assert result['devices'] == 8 and result['mesh'] == {'data': 8, 'fsdp': 1, 'model': 1}
  # 18.5M float32 params + 2 Adam moments, replicated: about 0.2 GiB of arguments per core;
  # activations of 8 images a core at 224 px are the temporaries.
  assert 0.1 < result['argument_gib'] < 1.0, result
  assert result['temp_gib'] > 0.01, result
  assert result['total_gib_per_device'] < 16 and result['fits'], result


def test_without_a_tpu_commands_stay_on_the_cpu_and_print_no_libtpu_warnings():
  """With libtpu installed and JAX_PLATFORMS unset, the CLIs' start-up is quiet and on CPU."""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  # What every `python -m mixer.X` does first. jax_platforms must be set, not only the
  # output quiet: libtpu also stays quiet when another process holds /tmp/libtpu_lockfile.
  code = ('import mixer, jax; print(jax.config.jax_platforms, jax.default_backend())')
  result = subprocess.run([sys.executable, '-c', code], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=True)
  assert result.stdout.split() == ['cpu', 'cpu']
  for libtpu_warning in ('TPU_ACCELERATOR_TYPE', 'TPU_WORKER_HOSTNAMES', 'libtpu'):
    assert libtpu_warning not in result.stderr, result.stderr


def _docstring_slice(path: str) -> str:
  """The TPU slice a config's docstring launches it on (`ACCELERATOR=v3-128`)."""
  module = config_lib.load_config_module(path)
  slices = set(re.findall(r'ACCELERATOR=(v\d+-\d+)', module.__doc__ or ''))
  assert len(slices) == 1, f'{path}: its docstring should name one slice, found {slices}'
  return slices.pop()


@pytest.mark.slow
@pytest.mark.parametrize('path', PRETRAINING_CONFIGS, ids=os.path.basename)
def test_pretraining_config_fits_the_slice_its_docstring_names(path):
  topology = _docstring_slice(path)
  devices, generation = compile_check.topology_devices(topology)
  config = config_lib.load_config_module(path).get_config()
  result = compile_check.check(config, devices, compile_check.HBM_GIB[generation])
  print(os.path.basename(path), topology, result)  # The plan, in pytest's -rA/-s output.
  assert result['argument_gib'] > 0 and result['temp_gib'] > 0, result
  assert result['total_gib_per_device'] < compile_check.HBM_GIB[generation], result
