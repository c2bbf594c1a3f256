"""Sharded training equals single-device training, and the params really are split."""

import jax
import ml_collections
import numpy as np
import pytest

from mixer import sharding
from tests import multidevice

_EQUIVALENCE = r'''
import json
import jax, jax.numpy as jnp, numpy as np
import ml_collections
import optax
from mixer import config_lib, sharding, trainer_setup

config = config_lib.base_config()
config.model.update(patch_size=4, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16,
                    channels_mlp_dim=64)
config.update(image_size=16, num_classes=10, batch_size=32, lr=3e-3, weight_decay=0.1,
              warmup_steps=1, total_steps=10, grad_accum_steps=GRAD_ACCUM)
rng = np.random.default_rng(0)
# The same batch each step, so the loss must fall (a learnable problem, not noise).
batches = [{'image': rng.uniform(-1, 1, (32, 16, 16, 3)).astype(np.float32),
            'labels': np.eye(10, dtype=np.float32)[rng.integers(0, 10, 32)]}] * 4

def run(mesh_axes, devices):
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, model=1))
  config.mesh.update(mesh_axes)
  # The trainer's own set-up path and compiled step.
  setup = trainer_setup.build(config, devices)
  mesh = setup.mesh
  state = setup.create_state()
  step = trainer_setup.compile_train_step(setup)
  loss_values = []
  with setup.context():
    for batch in batches:
      state, metrics = step(state, sharding.put_local_batch(batch, mesh), setup.dropout_rng)
      loss_values.append(float(metrics['train/loss']))
  kernel = state['params']['MixerBlock_0']['channel_mixing']['Dense_0']['kernel']
  mu = optax.tree_utils.tree_get(state['opt_state'], 'mu')
  mu_kernel = mu['MixerBlock_0']['channel_mixing']['Dense_0']['kernel']
  return {
      'losses': loss_values,
      'params': jax.tree.map(lambda x: np.asarray(x).tolist(), state['params']),
      'kernel_spec': str(kernel.sharding.spec),
      'mu_spec': str(mu_kernel.sharding.spec),
      'param_bytes_per_device': sharding.bytes_per_device(state['params']),
      'param_bytes_total': sum(x.nbytes for x in jax.tree.leaves(state['params'])),
  }

results = {'single': run({}, jax.devices()[:1])}
for name, axes in MESHES.items():
  results[name] = run(axes, jax.devices())
print(json.dumps(results))
'''

MESHES = {'data8': {'data': 8}, 'data2_fsdp4': {'data': 2, 'fsdp': 4},
          'data2_model4': {'data': 2, 'model': 4}}


# Params after several Adam steps: Adam divides by sqrt(nu), so float32 reduction-order
# differences in near-zero gradients show up as ~1e-5 absolute differences of the
# params (steps are lr=3e-3 large); anything structurally wrong is orders larger.
PARAM_ATOL = 1e-4


def _max_abs_diff(a, b):
  import numpy as np  # pylint: disable=g-import-not-at-top
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
  return max(jax.tree.leaves(diffs))


@pytest.fixture(scope='module')
def sharded_runs():
  code = _EQUIVALENCE.replace('GRAD_ACCUM', '1').replace('MESHES', repr(MESHES))
  return multidevice.run_with_devices(code, num_devices=8)


@pytest.mark.parametrize('mesh_name', list(MESHES))
def test_sharded_training_matches_single_device(sharded_runs, mesh_name):
  single, sharded = sharded_runs['single'], sharded_runs[mesh_name]
  assert single['losses'][0] > 1.0  # Real learning problem: ~log(10) at the start.
  for a, b in zip(single['losses'], sharded['losses']):
    assert abs(a - b) <= 1e-5 * abs(a), (single['losses'], sharded['losses'])
  assert single['losses'][-1] < single['losses'][0]
  assert _max_abs_diff(single['params'], sharded['params']) < PARAM_ATOL


def test_params_and_optimizer_state_are_really_sharded(sharded_runs):
  total = sharded_runs['single']['param_bytes_total']
  assert sharded_runs['single']['param_bytes_per_device'] == total
  # Pure data parallelism replicates the params on every device.
  assert sharded_runs['data8']['param_bytes_per_device'] == total
  assert sharded_runs['data8']['kernel_spec'] == "P('fsdp', 'model')"
  # FSDP splits them (and Adam's moments) along `embed` over 4 devices.
  fsdp = sharded_runs['data2_fsdp4']
  assert fsdp['param_bytes_per_device'] < 0.35 * total, fsdp['param_bytes_per_device']
  assert fsdp['mu_spec'] == fsdp['kernel_spec'] == "P('fsdp', 'model')"
  # Tensor parallelism splits the MLP hidden units over `model`.
  assert sharded_runs['data2_model4']['param_bytes_per_device'] < 0.6 * total


def test_grad_accumulation_equals_one_big_batch():
  code = _EQUIVALENCE.replace('GRAD_ACCUM', '4').replace('MESHES', repr({'data8': {'data': 8}}))
  accumulated = multidevice.run_with_devices(code, num_devices=8)
  whole = multidevice.run_with_devices(
      _EQUIVALENCE.replace('GRAD_ACCUM', '1').replace('MESHES', '{}'), num_devices=8)
  for run in (accumulated['single'], accumulated['data8']):
    for a, b in zip(run['losses'], whole['single']['losses']):
      assert abs(a - b) <= 1e-5 * abs(b)
    assert _max_abs_diff(run['params'], whole['single']['params']) < PARAM_ATOL


def _config(**mesh):
  config = ml_collections.ConfigDict({'mesh': {'data': -1, 'fsdp': 1, 'model': 1}})
  config.mesh.update(mesh)
  return config


def test_mesh_adapts_to_the_devices_present():
  mesh = sharding.create_mesh(_config())
  assert dict(mesh.shape) == {'data': jax.device_count(), 'fsdp': 1, 'model': 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_impossible_mesh_is_a_clear_error():
  with pytest.raises(ValueError, match='needs 4 devices'):
    sharding.create_mesh(_config(data=4))
  with pytest.raises(ValueError, match='at most one axis may be -1'):
    sharding.create_mesh(_config(fsdp=-1))
  with pytest.raises(ValueError, match='unknown axes'):
    sharding.create_mesh(ml_collections.ConfigDict({'mesh': {'dp': 1}}))


def test_batch_not_divisible_by_devices_is_a_clear_error():
  code = r'''
import json, ml_collections
from mixer import sharding
config = ml_collections.ConfigDict({'mesh': {'data': -1, 'fsdp': 1, 'model': 1}})
mesh = sharding.create_mesh(config)
try:
  sharding.check_batch_size(12, mesh)
  print(json.dumps('no error'))
except ValueError as e:
  print(json.dumps(str(e)))
'''
  message = multidevice.run_with_devices(code, num_devices=8)
  assert 'config.batch_size=12 is not divisible by the 8 data-parallel devices' in message


class _FakeTpuDevice:
  """Stands in for a TPU v3 core of a multislice job (slice_index, coords)."""

  def __init__(self, index, slice_index, cores_per_slice):
    local = index % cores_per_slice
    self.id = index
    self.slice_index = slice_index
    self.process_index = index // 2
    self.platform = 'tpu'
    self.device_kind = 'TPU v3'
    self.coords = (local // 2 % 2, local // 4, 0)
    self.core_on_chip = local % 2

  def __repr__(self):
    return f'core{self.id}@slice{self.slice_index}'


def test_multislice_grid_puts_slices_on_the_data_axis():
  devices = [_FakeTpuDevice(i, i // 8, 8) for i in range(16)]
  assert sharding.num_slices(devices) == 2
  config = ml_collections.ConfigDict({'mesh': {'data': -1, 'fsdp': 2, 'model': 1},
                                      'dcn_mesh': {'data': 1, 'fsdp': 1, 'model': 1}})
  grid = sharding.multislice_device_grid(config, devices)
  assert grid.shape == (8, 2, 1)
  # Each slice fills its own half of `data`: only the data-parallel reduction crosses DCN,
  # FSDP's all-gathers stay inside a slice.
  slice_of = np.vectorize(lambda d: d.slice_index)(grid)
  assert (slice_of[:4] == 0).all() and (slice_of[4:] == 1).all()
  assert all(len(set(slice_of[i, :, 0])) == 1 for i in range(8))
  with pytest.raises(ValueError, match='config.dcn_mesh'):
    config.dcn_mesh.update(data=3)
    sharding.multislice_device_grid(config, devices)
