"""Compile time and memory per device of the trainer's train step, on 1 or N (fake) devices.

Only shapes and shardings are used (`trainer_setup.build` + `compile_train_step`,
exactly what the trainer and `mixer.compile_check` compile): nothing is
allocated, so Mixer-L/16 or H/14 can be measured on a laptop. Per device it
reports XLA's memory plan (arguments, outputs, temporaries, donated = aliased
bytes) and the bytes of params and optimizer state each device holds under the
config's shardings (`fsdp=N` splits them along the hidden dimension).

Several devices on a CPU need `XLA_FLAGS=--xla_force_host_platform_device_count=N`
before jax starts, so `run_on_devices` runs this module in a subprocess:

  python -m mixer.benchmarks.compile_bench --configs='[{"model": "Mixer-L_16", "fsdp": 8}]'
  python -m mixer.benchmarks.run --benchmarks=compile --models=Mixer-L_16 --devices=1,8

With a TPU topology (`--topology=v3-256`) the step is compiled for that slice's
cores instead, compile-only, through libtpu on the CPU host (as
`mixer.compile_check` does): what a pod run compiles at every start.

`scan_vs_unscanned` pairs the records of one run that differ only in
`scan_blocks` and gives the compile-time ratio (target <= 1/4). Beside it, the
ratio's floor: the unscanned step with a single block and the same remat
(`with_one_block_steps` adds it to a run's configs) over the unscanned step.
A scanned step still compiles one block's kernels, and the unrolled step
compiles them only once too (XLA reuses a kernel for identical fusions), so
scanning saves only the per-block rest: the floor is about the lowest ratio
scanning can reach (docs/benchmarks.md).

`persistent_cache` starts two processes that compile the same step with the
persistent compilation cache (`mixer.compile_cache`) in a fresh directory: the
first start compiles and writes, the second loads. Ratios use CPU seconds of
the compiling process (wall-clock seconds are reported too): on a shared
machine other processes inflate wall-clock time, not CPU time.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from typing import Any

import jax

from mixer import trainer_setup
from mixer.benchmarks import hlo_traffic, model_bench


def _bytes_per_device(abstract_tree) -> int:
  """Bytes of the largest shard of each leaf, summed: what one device holds."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


SCAN_TARGET = 0.25  # Scanned step's compile time over the unscanned one's.


def run(topology: str | None = None, **config_kwargs) -> dict[str, Any]:
  """Compiles the train step of `model_bench.bench_config(**config_kwargs)` here.

  FSDP (`fsdp`) and data parallelism (the rest) over all of this process's
  devices, or over the cores of TPU `topology` (e.g. 'v3-256', compile-only).
  """
  config = model_bench.bench_config(**config_kwargs)
  if topology:
    from mixer import compile_check  # pylint: disable=g-import-not-at-top
    devices, _ = compile_check.topology_devices(topology)
  else:
    devices = jax.devices()
  config.mesh.data = -1
  setup = trainer_setup.build(config, devices)
  compiled, compile_time = trainer_setup.timed_compile_train_step(setup)
  plan = trainer_setup.memory_per_device(compiled) or {}
  params = _bytes_per_device(setup.abstract_state['params'])
  opt = _bytes_per_device(setup.abstract_state['opt_state'])
  traffic = hlo_traffic.step_summary(compiled)
  mib = 2.0 ** 20
  return {
      'benchmark': 'compile', **model_bench.config_fields(config),
      'num_blocks': setup.model.num_blocks,
      'mesh': dict(setup.mesh.shape), 'fsdp': setup.mesh.shape['fsdp'],
      'devices': len(devices), 'topology': topology,
      'device_kind': devices[0].device_kind,
      'compile_seconds': round(compile_time.seconds, 2),
      # CPU time of this process (all threads): robust to other load on the machine.
      'compile_cpu_seconds': round(compile_time.cpu_seconds, 2),
      # ... split into the Python side (tracing, lowering) and XLA's compile (or cache load).
      'tracing_cpu_seconds': round(compile_time.tracing_cpu_seconds, 2),
      'xla_cpu_seconds': round(compile_time.xla_cpu_seconds, 2),
      'from_cache': compile_time.from_cache,
      'params_mib_per_device': round(params / mib, 2),
      'opt_state_mib_per_device': round(opt / mib, 2),
      **{f'{name}_mib_per_device': round(plan[name] / mib, 2) if name in plan else None
         for name in ('argument', 'output', 'temp', 'alias', 'total')},
      # Bytes the step's kernels move per device, from its optimized HLO (hlo_traffic).
      'traffic_gb_per_device': traffic['traffic_gb'],
      'traffic_gb_by_category_per_device': traffic['traffic_gb_by_category'],
      # What its collectives send per device over the interconnect (ring volume).
      'interconnect_gb_per_device': traffic['interconnect_gb'],
  }


def _subprocess(configs: list[dict], devices: int, cache_dir: str | None = None,
                timeout: float = 3600, topology: str | None = None) -> list[dict]:
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      f' --xla_force_host_platform_device_count={devices}').strip()
  env.setdefault('JAX_PLATFORMS', 'cpu')
  command = [sys.executable, '-m', 'mixer.benchmarks.compile_bench',
             f'--configs={json.dumps(configs)}']
  if cache_dir:
    command.append(f'--cache_dir={cache_dir}')
  if topology:
    command.append(f'--topology={topology}')
  done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout,
                        check=False)
  if done.returncode:
    raise RuntimeError(f'compile_bench on {devices} devices failed:\n{done.stderr[-3000:]}')
  return [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{')]


def run_on_devices(configs: list[dict], devices: int) -> list[dict]:
  """`run(**c)` for each c in `configs`, in a subprocess with `devices` CPU devices."""
  return _subprocess(configs, devices)


def run_on_topology(configs: list[dict], topology: str) -> list[dict]:
  """`run(topology, **c)` for each c in `configs`, in a subprocess (libtpu, compile-only)."""
  return _subprocess(configs, 1, topology=topology)


def with_one_block_steps(configs: list[dict]) -> list[dict]:
  """`configs` plus the floor `scan_vs_unscanned` reports: for each setting compiled both
  scanned and unscanned, the unscanned one-block step with each remat of its scanned ones."""
  def setting(kwargs):
    return tuple(sorted((k, v) for k, v in kwargs.items()
                        if k not in ('scan_blocks', 'remat', 'num_blocks')))
  scans = {}
  for kwargs in configs:
    scans.setdefault(setting(kwargs), set()).add(bool(kwargs.get('scan_blocks')))
  extra = {(setting(kwargs), kwargs.get('remat', 'none')):
           dict(kwargs, scan_blocks=False, num_blocks=1)
           for kwargs in configs
           if kwargs.get('scan_blocks') and scans[setting(kwargs)] == {False, True}}
  return configs + list(extra.values())


def scan_vs_unscanned(records: list[dict]) -> list[dict[str, Any]]:
  """Each scanned compile record against the unscanned one of the same run and setting.

  A scanned record with `remat` R is compared with the unscanned record with
  the same R, and also with the unscanned one without remat when there is one
  (the step as it was before scanning and remat existed). Where the run also
  compiled the one-block step with the scanned record's remat
  (`with_one_block_steps`), `floor_cpu_ratio` is its CPU time over the unscanned step's.
  """
  def setting(r, num_blocks=None):
    return (r['model'], r['image_size'], r['batch_size'], r['dtype'],
            r.get('residual_dtype', 'float32'), r['devices'], r.get('topology'), r.get('fsdp'),
            num_blocks or r['num_blocks'])
  compiles = [r for r in records if r.get('benchmark') == 'compile']
  unscanned = {(setting(r), r['remat']): r for r in compiles if not r['scan_blocks']}
  pairs = []
  for scanned in (r for r in compiles if r['scan_blocks']):
    floor = unscanned.get((setting(scanned, num_blocks=1), scanned['remat']))
    for remat in dict.fromkeys((scanned['remat'], 'none')):
      base = unscanned.get((setting(scanned), remat))
      if base is None:
        continue
      cpu = scanned['compile_cpu_seconds'] / base['compile_cpu_seconds']
      wall = scanned['compile_seconds'] / base['compile_seconds']
      pairs.append({
          'benchmark': 'scan_vs_unscanned', 'model': scanned['model'],
          'image_size': scanned['image_size'], 'batch_size': scanned['batch_size'],
          'dtype': scanned['dtype'], 'devices': scanned['devices'], 'fsdp': scanned.get('fsdp'),
          'device_kind': scanned['device_kind'], 'topology': scanned.get('topology'),
          'num_blocks': scanned['num_blocks'],
          'scanned_remat': scanned['remat'], 'unscanned_remat': remat,
          'scanned_cpu_seconds': scanned['compile_cpu_seconds'],
          'unscanned_cpu_seconds': base['compile_cpu_seconds'],
          'cpu_ratio': round(cpu, 3), 'wall_ratio': round(wall, 3), 'target': SCAN_TARGET,
          'meets_target_cpu': cpu <= SCAN_TARGET, 'meets_target_wall': wall <= SCAN_TARGET,
          'one_block_cpu_seconds': None if floor is None else floor['compile_cpu_seconds'],
          'floor_cpu_ratio': None if floor is None else round(
              floor['compile_cpu_seconds'] / base['compile_cpu_seconds'], 3),
      })
  return pairs


def persistent_cache(config_kwargs: dict) -> dict[str, Any]:
  """First and second start of one compile with a fresh persistent cache; the second loads.

  The cache spares XLA's compile only: the second start still traces and lowers
  the step (Python) and loads the executable, so the record splits both starts.
  """
  with tempfile.TemporaryDirectory() as cache_dir:
    first = _subprocess([config_kwargs], 1, cache_dir)[0]
    second = _subprocess([config_kwargs], 1, cache_dir)[0]
    entries = len(os.listdir(cache_dir))
  ratio = second['compile_cpu_seconds'] / first['compile_cpu_seconds']
  return {
      'benchmark': 'cache', 'model': first['model'], 'device_kind': first['device_kind'],
      **{key: first[key] for key in ('image_size', 'batch_size', 'dtype', 'scan_blocks', 'remat')},
      **{f'{start}_start_{key}': record[key]
         for start, record in (('first', first), ('second', second))
         for key in ('compile_seconds', 'compile_cpu_seconds', 'tracing_cpu_seconds',
                     'xla_cpu_seconds', 'from_cache')},
      'second_over_first': round(ratio, 3), 'cache_entries': entries,
      'target_second_over_first': 0.2, 'meets_target': ratio <= 0.2,
  }


def main():
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  configs = flags.DEFINE_string(
      'configs', '[{}]', 'JSON list of model_bench.bench_config keyword dicts.')
  cache_dir = flags.DEFINE_string('cache_dir', None, 'Persistent compilation cache directory.')
  topology = flags.DEFINE_string('topology', None, 'TPU slice to compile for, e.g. v3-256.')

  def _main(argv):
    del argv
    if cache_dir.value:
      from mixer import compile_cache  # pylint: disable=g-import-not-at-top
      compile_cache.enable(cache_dir.value)
    for kwargs in json.loads(configs.value):
      print(json.dumps(run(topology.value, **kwargs)), flush=True)

  app.run(_main)


if __name__ == '__main__':
  main()
