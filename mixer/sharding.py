"""Device mesh, logical-axis rules and the shardings of the train state and batches.

The mesh always has the three axes `data`, `fsdp` and `model` (`config.mesh`,
-1 = all remaining devices), so one config runs on 1 CPU, 8 fake CPU devices, a
GPU or a TPU pod slice. Parameters carry logical axis names (see
`mixer.models`); `config.sharding_rules` maps them onto mesh axes:

  ('batch', ('data', 'fsdp'))  the batch is split over every data-parallel device
  ('embed', 'fsdp')            FSDP / ZeRO-3: params and optimizer state are
                               split along the hidden dimension over `fsdp`
  ('channel_mlp', 'model')     tensor parallelism: the hidden units of the MLPs
  ('token_mlp', 'model')       are split over `model`

A logical axis without a rule is replicated. Flax resolves each array's names
in order and never uses one mesh axis twice in the same array.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'model')
BATCH_AXES = ('data', 'fsdp')  # Mesh axes the batch dimension is split over.


def _resolve_sizes(requested: dict[str, int], num_devices: int, what: str) -> tuple[int, ...]:
  """Fills in the one -1 axis so the product equals `num_devices`."""
  unknown = set(requested) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'{what} has unknown axes {sorted(unknown)}; the axes are {MESH_AXES}.')
  sizes = [int(requested.get(axis, 1)) for axis in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f'{what} {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1.')
  known = math.prod(s for s in sizes if s != -1)
  if free:
    if known <= 0 or num_devices % known:
      raise ValueError(
          f'{what} {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} devices: '
          f'choose axis sizes whose product divides {num_devices}.')
    sizes[free[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f'{what} {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but '
        f'{num_devices} are present: set one axis to -1 (e.g. --config.mesh.data=-1) '
        'so the mesh adapts to the devices.')
  return tuple(sizes)


def num_slices(devices: Sequence[Any]) -> int:
  """Number of TPU slices (multislice over DCN); 1 everywhere else."""
  return len({getattr(d, 'slice_index', 0) for d in devices})


def create_mesh(config, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """Builds the topology-aware `data` x `fsdp` x `model` mesh of `config.mesh`.

  `devices` defaults to all devices of all processes.
  """
  devices = list(devices if devices is not None else jax.devices())
  slices = num_slices(devices)
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)  # Linen's logical flow needs Auto.
  if slices == 1:
    shape = _resolve_sizes(dict(config.mesh), len(devices), 'config.mesh')
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  return jax.sharding.Mesh(multislice_device_grid(config, devices), MESH_AXES,
                           axis_types=axis_types)


def multislice_device_grid(config, devices: Sequence[Any]) -> np.ndarray:
  """Devices of several slices arranged as `data` x `fsdp` x `model`.

  `config.mesh` is the layout inside one slice (fast ICI links); `config.dcn_mesh`
  says how the slices (slow DCN links) combine, by default all along `data`, so
  only the gradient all-reduce crosses slices.
  """
  slices = num_slices(devices)
  dcn = dict(config.get('dcn_mesh', {}))
  if math.prod(dcn.values() or [1]) == 1:
    dcn = {'data': slices}
  dcn_shape = _resolve_sizes(dcn, slices, 'config.dcn_mesh')
  ici_shape = _resolve_sizes(dict(config.mesh), len(devices) // slices, 'config.mesh (per slice)')
  return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)


def logical_rules(config) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.sharding_rules)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh, what: str = 'config.batch_size') -> None:
  """The global batch must split evenly over the data-parallel devices and processes."""
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if batch_size % shards:
    raise ValueError(
        f'{what}={batch_size} is not divisible by the {shards} data-parallel devices '
        f'(mesh {dict(mesh.shape)}): use a multiple of {shards}, e.g. {what}='
        f'{max(shards, batch_size // shards * shards)}.')
  if batch_size % jax.process_count():
    raise ValueError(f'{what}={batch_size} is not divisible by the {jax.process_count()} '
                     'processes: use a multiple of the process count.')


def param_shardings(boxed_abstract_params, mesh, rules):
  """NamedShardings for the (unboxed) params from their logical axis names."""
  specs = nn.get_partition_spec(boxed_abstract_params)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, params_sharding, mesh):
  """Optimizer state leaves that mirror a param get its sharding; the rest (counts) replicate."""
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_state, params_sharding,
      transform_non_params=lambda _: replicated(mesh))


def put_local_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Assembles each process's part of the batch into global arrays split over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def put_host_tree(tree, shardings):
  """Places identical host (numpy) values on every process into the given shardings.

  Each device receives only its own slice, so nothing is materialised unsharded
  on any device.
  """
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree, shardings)


def bytes_per_device(tree) -> int:
  """Bytes the tree occupies on the first local device (to check FSDP really splits it)."""
  device = jax.local_devices()[0]
  total = 0
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total


def gather_to_host(tree):
  """Full numpy values of (possibly multi-host sharded) arrays, on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
