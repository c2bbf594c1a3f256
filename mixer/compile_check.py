"""Does a config fit a TPU slice? Compile its train step for the slice, from any machine.

  python -m mixer.compile_check --config=configs/mixer_l16_i21k.py --topology=v3-128

compiles the trainer's real update step (the same `train.compile_train_step`
the run uses: model, optimizer, mesh and sharding rules from the config) for
the devices of a TPU topology, without the TPU, and prints the per-device
memory XLA plans (arguments, outputs, temporaries) against the chip's HBM, as
MaxText's `train_compile` does, and what a step moves per device: HBM bytes
and interconnect bytes (`mixer.benchmarks.hlo_traffic`). It needs the TPU compiler, libtpu
(`pip install -c constraints.txt -e '.[tpu]'`, about 700 MB; works on x86 CPU
machines). Without a TPU topology (`--topology=local`) it compiles for the
devices present, e.g. `XLA_FLAGS=--xla_force_host_platform_device_count=8`.

Topologies: `v2-N` / `v3-N` (N cores, two per chip, e.g. v3-8, v3-32, v3-128,
v3-2048) or a libtpu topology name such as `v4:2x2x4` / `v5e:4x4`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re

import jax
import ml_collections

from mixer import config_lib, platforms, trainer_setup
from mixer.benchmarks import hlo_traffic

# HBM per TPU core (v2/v3: two cores per chip) or per chip (v4 and later, one
# device per chip), in GiB.
HBM_GIB = {'v2': 8, 'v3': 16, 'v4': 32, 'v5e': 16, 'v5litepod': 16, 'v5p': 95, 'v6e': 32}


def topology_devices(topology: str) -> tuple[list, str]:
  """TPU devices of `topology` (compile-only) and the generation name."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  match = re.fullmatch(r'(v[23])-(\d+)', topology)
  if match:
    generation, cores = match.group(1), int(match.group(2))
    chips = cores // 2
    if cores % 8 or chips & (chips - 1):
      raise ValueError(f'{topology}: a {generation} slice has a power-of-two number of cores, '
                       'at least 8 (v3-8, v3-32, v3-128, ...).')
    x = 2 ** (int(math.log2(chips)) // 2)
    name = f'{generation}:{x}x{chips // x}'
  elif ':' in topology:
    name, generation = topology, topology.split(':')[0]
  else:
    raise ValueError(f'Unknown topology {topology!r}: write e.g. v3-128 or v4:2x2x4.')
  if not platforms.has_tpu_chips():
    # Off a TPU VM, libtpu looks for the accelerator type and the worker host names
    # (normally from the VM's metadata) and prints several lines of warnings when
    # they are missing. A compile-only topology needs neither (it comes from `name`
    # below); naming them keeps the output readable.
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v3-8')
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
    # libtpu takes /tmp/libtpu_lockfile so that two processes cannot drive the same chips;
    # a second compile_check (or test) would then fail with "Internal error when accessing
    # libtpu multi-process lockfile". Without chips there is nothing to guard.
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    description = topologies.get_topology_desc(
        platform='tpu', topology_name=name, chip_config_name='default',
        chips_per_host_bounds=(2, 2, 1), num_slices=1)
  except Exception as error:  # pylint: disable=broad-except  (re-raised with the fix)
    if importlib.util.find_spec('libtpu') is None:
      fix = "Compiling for TPU needs libtpu: pip install -c constraints.txt -e '.[tpu]'."
    else:
      fix = 'libtpu is installed; the topology name or libtpu itself is the problem.'
    raise RuntimeError(f'Cannot describe TPU topology {name!r}: {error}. {fix}') from error
  return list(description.devices), generation


def check(config: ml_collections.ConfigDict, devices, hbm_gib: float | None = None) -> dict:
  """Compiles `config`'s train step for `devices`; returns the per-device memory plan."""
  config_lib.validate(config)
  setup = trainer_setup.build(config, devices)
  compiled, compile_time = trainer_setup.timed_compile_train_step(setup)
  mesh, abstract_state = setup.mesh, setup.abstract_state
  result = {
      'model': config.model.name, 'image_size': config.image_size,
      'batch_size': config.batch_size, 'grad_accum_steps': config.grad_accum_steps,
      'model_dtype': config.model_dtype, 'mesh': dict(mesh.shape), 'devices': len(devices),
      'device_kind': devices[0].device_kind, 'compile_seconds': round(compile_time.seconds, 1),
      # CPU time of this process (all threads): what other load on the machine does not change.
      'compile_cpu_seconds': round(compile_time.cpu_seconds, 1),
      'params': sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state['params'])),
  }
  plan = trainer_setup.memory_per_device(compiled)
  if plan is not None:
    gib = 2.0 ** 30
    result.update({
        'argument_gib': round(plan['argument'] / gib, 3),
        'output_gib': round(plan['output'] / gib, 3),
        'temp_gib': round(plan['temp'] / gib, 3),
        'donated_gib': round(plan['alias'] / gib, 3),
        'total_gib_per_device': round(plan['total'] / gib, 3),
    })
    if hbm_gib:
      result['hbm_gib_per_device'] = hbm_gib
      result['fits'] = plan['total'] / gib <= hbm_gib
  # What one step costs besides FLOPs, per device: the bytes its kernels move in HBM, and
  # what its collectives send over the interconnect (e.g. to compare --config.mesh.fsdp).
  traffic = hlo_traffic.step_summary(compiled)
  result['hbm_traffic_gb_per_device'] = traffic['traffic_gb']
  result['interconnect_gb_per_device'] = traffic['interconnect_gb']
  return result


def main():
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                           lock_config=True)
  topology = flags.DEFINE_string('topology', 'v3-8', "TPU slice, e.g. v3-128, or 'local'.")
  flags.mark_flag_as_required('config')

  def _main(argv):
    del argv
    if topology.value == 'local':
      devices, hbm = jax.devices(), None
    else:
      try:
        devices, generation = topology_devices(topology.value)
      except (ValueError, RuntimeError) as error:  # A bad --topology: one line, not a traceback.
        raise SystemExit(f'error: --topology: {error}') from None
      hbm = HBM_GIB.get(generation)
    print(json.dumps({'topology': topology.value, **check(config.value, devices, hbm)}))

  app.run(_main)


if __name__ == '__main__':
  main()
