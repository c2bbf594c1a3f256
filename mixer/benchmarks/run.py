"""`make bench`: the benchmark suite, as JSON lines (`--out`) and a readable table.

  input    the trainer's input pipeline, images/s per CPU core     (input_bench)
  forward  forward pass, images/s per device and MFU                (model_bench)
  train    the trainer's train step, images/s per device and MFU    (model_bench)
  compile  train-step compile time and memory per device, on each
           of --devices (fake CPU devices, FSDP over all of them)  (compile_bench)
           or, with --topology=v3-256, for a TPU slice (libtpu,
           compile-only; --fsdp=1,16 for data x FSDP meshes); with
           --scan_blocks=false,true also the scanned/unscanned
           compile-time ratio beside its floor (the unscanned one-block
           step, compiled too); the bytes its kernels move per step
           (hlo_traffic: memory-bound cost) and its collectives send
           over the interconnect
  cache    first vs second start with the persistent compile cache (compile_bench)
  e2e      the trainer on 'synthetic' data vs the bare train step   (e2e_bench)
  profile  where the train step's time goes: a jax.profiler trace, summed
           per op category and per op (profile_bench; device time on a
           GPU/TPU, on the CPU the time XLA's threads spend in each op)
  deploy   exported formats: file size, batch-1 latency, batch-32
           throughput, top-1 agreement with JAX (deploy_bench; not in
           the default list: about 27 min for B/16 on 2 cores)

Every combination of --models x --batch_sizes x --image_sizes x --scan_blocks x
--remat x --residual_dtype is measured (forward, train and profile: x --ablate too,
speed-of-light bounds with ops made free, see ablation.py). The defaults are sized for a
2-core CPU (a few minutes); on an accelerator, e.g.:

  python -m mixer.benchmarks.run --benchmarks=forward,train --models=Mixer-B_16,Mixer-L_16 \\
      --batch_sizes=128,256,512 --dtype=bfloat16

Figures vary with the machine and its load; compare runs on the same machine
(each record names its device). docs/benchmarks.md has measured tables.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from typing import NoReturn

from absl import app, flags

_ALL = ('input', 'forward', 'train', 'compile', 'cache', 'e2e', 'profile', 'deploy')
_KINDS = _ALL[:4] + ('scan_vs_unscanned',) + _ALL[4:]  # Record kinds, in table order.
_DEFAULT = ('input', 'forward', 'train', 'compile', 'cache', 'e2e', 'profile')

_BENCHMARKS = flags.DEFINE_list('benchmarks', list(_DEFAULT), f'Which of {",".join(_ALL)}.')
_MODELS = flags.DEFINE_list('models', ['Mixer-S_32'], 'Variants, e.g. Mixer-B_16,Mixer-L_16.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['8'], 'Global batch sizes.')
_IMAGE_SIZES = flags.DEFINE_list('image_sizes', ['224'], 'Image sizes.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_SCAN = flags.DEFINE_list('scan_blocks', ['false'], 'false and/or true.')
_REMAT = flags.DEFINE_list('remat', ['none'], 'none, full and/or dots.')
_RESIDUAL_DTYPE = flags.DEFINE_list('residual_dtype', ['float32'],
                                    'float32 and/or bfloat16: the residual stream between blocks.')
_ABLATE = flags.DEFINE_list(
    'ablate', ['none'], '`forward`, `train`, `profile`: none and/or ops made free, as if fused '
    'into the matmuls, for a speed-of-light bound: layernorm, gelu, transpose, joined by + '
    '(e.g. none,gelu+layernorm). The ablated model computes another function (ablation.py).')
_DEVICES = flags.DEFINE_list('devices', ['1', '8'],
                             'Device counts for `compile` (more than the real devices: fake '
                             'CPU devices in a subprocess); FSDP over all of them.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps per window (forward, train).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed windows; the median is reported.')
_E2E_STEPS = flags.DEFINE_integer(
    'e2e_steps', 36, 'Trainer steps of `e2e`: 6 windows of steps/6, the first dropped.')
_INPUT_IMAGES = flags.DEFINE_integer(
    'input_images', 3072, 'Images timed by `input`: many times what the pipeline buffers, '
    'or the rate measures the buffers.')
_FSDP = flags.DEFINE_list(
    'fsdp', ['1'], '`compile --topology`: FSDP degrees, each compiled on a data=-1 x fsdp mesh '
    '(e.g. 1,16). With --devices, FSDP spans all devices.')
_TOPOLOGY = flags.DEFINE_string(
    'topology', None, '`compile` for this TPU slice (e.g. v3-256; needs libtpu) instead of '
    '--devices.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 1000, 'Classes of the head (21843: i21k).')
_PROFILE_STEPS = flags.DEFINE_integer('profile_steps', 5, 'Traced train steps of `profile`.',
                                      lower_bound=1)
_PROFILE_DIR = flags.DEFINE_string(
    'profile_dir', 'bench_profile', '`profile` writes one trace folder per combination here '
    '(TensorBoard / Perfetto).')
_OUT = flags.DEFINE_string('out', 'bench_results.jsonl', 'JSON lines output file.')

# Columns of the readable table, per benchmark: (header, record key).
_COLUMNS = {
    'input': [('img/s/core', 'images_per_sec_per_core'),
              ('bare img/s/core', 'bare_decode_resize_images_per_sec_per_core'),
              ('target', 'target_images_per_sec_per_core')],
    'forward': [('img/s/dev', 'img_per_sec_per_device'), ('ms/step', 'step_seconds'),
                ('GFLOP/img', 'model_gflops_per_image'), ('MFU', 'mfu'),
                ('cpu ms/img', 'cpu_ms_per_image'), ('MFU cpu-time', 'mfu_cpu_time'),
                ('mem MiB', 'memory_bytes_per_device')],
    'compile': [('blocks', 'num_blocks'), ('devices', 'devices'), ('fsdp', 'fsdp'),
                ('compile s', 'compile_seconds'),
                ('cpu s', 'compile_cpu_seconds'), ('tracing cpu s', 'tracing_cpu_seconds'),
                ('params MiB', 'params_mib_per_device'),
                ('opt MiB', 'opt_state_mib_per_device'), ('args MiB', 'argument_mib_per_device'),
                ('temp MiB', 'temp_mib_per_device'), ('donated MiB', 'alias_mib_per_device'),
                ('total MiB', 'total_mib_per_device'), ('traffic GB', 'traffic_gb_per_device'),
                ('ICI GB', 'interconnect_gb_per_device')],
    'scan_vs_unscanned': [('devices', 'devices'), ('fsdp', 'fsdp'), ('remat', 'scanned_remat'),
                          ('vs remat', 'unscanned_remat'),
                          ('scanned cpu s', 'scanned_cpu_seconds'),
                          ('unscanned cpu s', 'unscanned_cpu_seconds'),
                          ('cpu ratio', 'cpu_ratio'), ('wall ratio', 'wall_ratio'),
                          ('target', 'target'), ('1-block cpu s', 'one_block_cpu_seconds'),
                          ('floor', 'floor_cpu_ratio')],
    'cache': [('1st cpu s', 'first_start_compile_cpu_seconds'),
              ('1st tracing', 'first_start_tracing_cpu_seconds'),
              ('1st XLA', 'first_start_xla_cpu_seconds'),
              ('2nd cpu s', 'second_start_compile_cpu_seconds'),
              ('2nd tracing', 'second_start_tracing_cpu_seconds'),
              ('2nd load', 'second_start_xla_cpu_seconds'),
              ('2nd from cache', 'second_start_from_cache'),
              ('2nd/1st', 'second_over_first'), ('target', 'target_second_over_first')],
    # Then a column per category (profile_bench.CATEGORY_NAMES) with time in it (*_pct keys).
    'profile': [('ms/step', 'step_seconds'), ('ops on', 'ops_on'),
                ('op ms', 'device_ms_per_step')],
    'deploy': [('format', 'format'), ('MiB', 'file_mib'), ('b1 ms', 'batch1_latency_ms'),
               ('b32 img/s', 'batch32_img_per_s'), ('top1=jax', 'top1_agreement_with_jax')],
    'e2e': [('trainer img/s/dev', 'trainer_img_per_sec_per_device'),
            ('bare img/s/dev', 'bare_step_img_per_sec_per_device'),
            ('trainer/bare', 'trainer_over_bare'), ('target', 'target')],
}
_COLUMNS['train'] = _COLUMNS['forward']
_KEY = [('model', 'model'), ('res', 'image_size'), ('batch', 'batch_size'), ('dtype', 'dtype'),
        ('scan', 'scan_blocks'), ('remat', 'remat'), ('residual', 'residual_dtype'),
        ('ablated', 'ablate')]
# Key columns shown only where a row differs from this default (most tables never do).
_KEY_DEFAULTS = {'residual_dtype': 'float32', 'ablate': 'none'}


def _cell(record, key) -> str:
  value = record.get(key)
  if value is None:
    return '-'
  if key == 'memory_bytes_per_device':
    return f'{value / 2**20:.0f}'
  if key == 'step_seconds':
    return f'{value * 1000:.1f}'
  if isinstance(value, float):
    return 'nan' if math.isnan(value) else f'{value:.3g}' if abs(value) < 1000 else f'{value:.0f}'
  return str(value)


def format_table(records: list[dict]) -> str:
  """One aligned table per benchmark kind, in run order."""
  blocks = []
  for kind in _KINDS:
    rows = [r for r in records if r.get('benchmark') == kind]
    if not rows:
      continue
    key = [c for c in _KEY if c[1] in rows[0] and (
        c[1] not in _KEY_DEFAULTS or any(r.get(c[1]) != _KEY_DEFAULTS[c[1]] for r in rows))
           ] if kind != 'input' else []
    columns = key + _COLUMNS[kind]
    if kind == 'profile':  # The categories any row has time in.
      columns += [(f'{k[:-len("_pct")]} %', k) for k in rows[0]
                  if k.endswith('_pct') and any(r.get(k) for r in rows)]
    table = [[header for header, _ in columns]] + [[_cell(r, key) for _, key in columns]
                                                   for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ['  '.join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table]
    lines.insert(1, '  '.join('-' * w for w in widths))
    cores = rows[0].get('cores')
    device = rows[0].get('device_kind') or (f'{cores} CPU cores' if cores else None)
    heading = f'== {kind} ({device}) ==' if device else f'== {kind} =='
    blocks.append(heading + '\n' + '\n'.join(lines))
  return '\n\n'.join(blocks)


def _refuse(message: str) -> NoReturn:
  """A flag value the suite cannot run with: one `error:` line on stderr, exit status 2."""
  print(f'error: {message}', file=sys.stderr)
  raise SystemExit(2)


def _bool(text: str) -> bool:
  if text.lower() not in ('true', 'false'):
    _refuse(f'--scan_blocks takes true/false values, got {text!r}.')
  return text.lower() == 'true'


def main(argv):
  del argv
  unknown = set(_BENCHMARKS.value) - set(_ALL)
  if unknown:
    _refuse(f'Unknown benchmark(s) {sorted(unknown)}; choose from {_ALL}.')
  # Each benchmark's module is imported only when chosen: `--help` and flag errors come back
  # fast, and forward/train need neither TF nor clu (a bare GPU image has jax and flax only).
  # pylint: disable=g-import-not-at-top
  from mixer import models
  for residual in _RESIDUAL_DTYPE.value:
    if residual not in models.RESIDUAL_DTYPES:
      _refuse(f'--residual_dtype takes {",".join(models.RESIDUAL_DTYPES)}, got {residual!r}.')
  from mixer.benchmarks import ablation
  try:
    ablations = [ablation.parse(text) for text in _ABLATE.value]
  except ValueError as e:
    _refuse(str(e))
  if any(ablations) and not {'forward', 'train', 'profile'} & set(_BENCHMARKS.value):
    _refuse('--ablate applies to forward, train and profile only; add one of them to '
            '--benchmarks or drop --ablate.')
  combos = [dict(model=m, batch_size=int(b), image_size=int(s), dtype=_DTYPE.value,
                 scan_blocks=_bool(scan), remat=r, residual_dtype=residual,
                 num_classes=_NUM_CLASSES.value)
            for m, b, s, scan, r, residual in itertools.product(
                _MODELS.value, _BATCH_SIZES.value, _IMAGE_SIZES.value, _SCAN.value, _REMAT.value,
                _RESIDUAL_DTYPE.value)]
  chosen = set(_BENCHMARKS.value)
  records = []
  with open(_OUT.value, 'w', encoding='utf-8') as out:

    def emit(record):
      records.append(record)
      out.write(json.dumps(record) + '\n')
      out.flush()

    if 'input' in chosen:
      from mixer.benchmarks import input_bench
      emit(input_bench.run(num_images=_INPUT_IMAGES.value))
    modes = tuple(m for m in ('forward', 'train') if m in chosen)
    if modes:
      from mixer.benchmarks import model_bench
      peak = model_bench.peak_flops_per_device(_DTYPE.value)  # Once: same peak for every row.
      for kwargs, names in itertools.product(combos, ablations):
        with ablation.ablated(names):
          results = model_bench.run(model_bench.bench_config(**kwargs), modes,
                                    steps=_STEPS.value, repeats=_REPEATS.value, peak=peak)
        for record in results:
          emit({**record, 'ablate': ablation.label(names)})
    if 'compile' in chosen or 'cache' in chosen:
      from mixer.benchmarks import compile_bench
    if 'compile' in chosen:
      compiled = []
      if _TOPOLOGY.value:
        compiled += compile_bench.run_on_topology(compile_bench.with_one_block_steps(
            [dict(kwargs, fsdp=int(fsdp)) for fsdp in _FSDP.value for kwargs in combos]),
            _TOPOLOGY.value)
      else:
        for devices in (int(d) for d in _DEVICES.value):
          compiled += compile_bench.run_on_devices(compile_bench.with_one_block_steps(
              [dict(kwargs, fsdp=devices) for kwargs in combos]), devices)
      for record in compiled + compile_bench.scan_vs_unscanned(compiled):
        emit(record)
    if 'cache' in chosen:
      emit(compile_bench.persistent_cache(combos[0]))
    if 'e2e' in chosen:
      from mixer.benchmarks import e2e_bench
      for kwargs in combos:
        emit(e2e_bench.run(steps=_E2E_STEPS.value, log_every=max(1, _E2E_STEPS.value // 6),
                           **kwargs))
    if 'profile' in chosen:
      from mixer.benchmarks import model_bench, profile_bench
      for index, (kwargs, names) in enumerate(itertools.product(combos, ablations)):
        with ablation.ablated(names):
          record = profile_bench.run(model_bench.bench_config(**kwargs),
                                     os.path.join(_PROFILE_DIR.value, str(index)),
                                     steps=_PROFILE_STEPS.value)
        emit({**record, 'ablate': ablation.label(names)})
    if 'deploy' in chosen:
      from mixer.benchmarks import deploy_bench
      for kwargs in combos:
        for record in deploy_bench.run(model_name=kwargs['model'], image_size=kwargs['image_size']):
          emit(record)
  print(format_table(records))
  for record in records:
    if record.get('top_ops'):
      from mixer.benchmarks import profile_bench
      where = 'device' if record.get('ops_on') == 'device' else 'CPU-thread'
      print(f'\nTop {where} ops, {record["model"]} batch {record["batch_size"]} '
            f'({record["device_kind"]}; trace: {record["trace_dir"]}):')
      print(profile_bench.format_top_ops(record['top_ops']))
  print(f'\nJSON lines: {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
