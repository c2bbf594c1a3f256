"""`mixer.compile_check`: the train step compiled ahead of time, memory per device."""

import importlib.util

import pytest

from mixer import compile_check
from tests import multidevice

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


def test_topology_names():
  with pytest.raises(ValueError, match='power-of-two number of cores'):
    compile_check.topology_devices('v3-12')
  with pytest.raises(ValueError, match='Unknown topology'):
    compile_check.topology_devices('tpu128')


def test_tpu_slice_compiles_with_libtpu_or_says_how_to_get_it():
  """With libtpu (the `tpu` extra) a v3-8 really compiles; without it the error says so."""
  if importlib.util.find_spec('libtpu') is None:
    with pytest.raises(RuntimeError, match=r"needs libtpu: pip install .*\[tpu\]"):
      compile_check.topology_devices('v3-8')
    return
  devices, generation = compile_check.topology_devices('v3-8')
  assert len(devices) == 8 and generation == 'v3'
  assert devices[0].device_kind == 'TPU v3'
