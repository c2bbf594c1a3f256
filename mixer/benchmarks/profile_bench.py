"""Where a train step's time goes: a profiler trace of the trainer's step, summed per op.

  python -m mixer.benchmarks.run --benchmarks=profile --models=Mixer-B_16 --batch_sizes=256 \\
      --dtype=bfloat16

Compiles the trainer's train step (`trainer_setup`, as `model_bench` does), runs
it once to warm up, then traces `steps` steps with `jax.profiler` (the same
trace `config.profile_steps` writes during a training run). The trace, kept in
`trace_dir` for TensorBoard or Perfetto, is read back
(`plugins/profile/<time>/<host>.trace.json.gz`) and every device op's time is
summed: per category (`CATEGORY_NAMES`: matmul, convolution, reduction,
elementwise, copy/layout, slicing, collective, memcpy, other) and per op, the
largest first. That table says what to fix: the matmuls are the useful work,
everything else is overhead around them.

Device ops are the kernels on the GPU streams, or the "XLA Ops" line of a TPU.
The CPU backend has no device lines: XLA:CPU runs each op of the step on one of
its host threads and records it there under its HLO name, so there the step's
HLO picks the ops out (`host_op_times`), and the times are CPU time of those
threads (ops on two threads at once both count). Times are per step and per
device.

Each op's category comes from the step's optimized HLO where the trace names
an op of it (`step_ops`, the same `hlo_traffic.category` that sorts the
HLO's bytes): on a TPU every op, whose names are HLO names (`fusion.12`: libtpu
fuses each matmul with its neighbours, so a name says nothing); on a GPU the
kernels XLA generates (`fusion.12` runs as `fusion_12`). `start_trace` writes
that HLO beside the trace (`STEP_HLO`). Ops the HLO does not name (cuBLAS
`nvjet`/`xmma`, cuDNN, memcpy) are sorted by their kernel name (`category`).
The HLO also says which jax op each kernel came from ('backward
MixerBlock_*/channel_mixing/Dense_0/dot_general'): the list of the largest ops
shows it.

A training run's own trace (`config.profile_steps=(start, stop)` writes it to
`<workdir>/profile`) is summed the same way:

  python -m mixer.benchmarks.profile_bench --trace_dir=WORKDIR/profile --steps=STOP-START
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import sys
import time
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging

from mixer import trainer_setup
from mixer.benchmarks import hlo_traffic, model_bench

# First match wins: a cuDNN convolution kernel's name holds 'gemm' ('implicit_gemm'), 'conv'
# alone would match every 'convert' fusion, and NCCL's 'ReduceScatter' or an 'all-reduce' is
# no reduction. The order and the names otherwise follow `hlo_traffic.category`: 'slicing'
# reads or writes one block's slice of a scanned stack; 'copy/layout' is data movement with
# no arithmetic: transposes, copies, fills (broadcast).
_CATEGORIES = (
    ('memcpy', ('memcpy', 'memset')),
    ('collective', ('nccl', 'all-reduce', 'all_reduce', 'allreduce', 'all-gather',
                    'all_gather', 'allgather', 'reduce-scatter', 'reduce_scatter',
                    'reducescatter', 'all-to-all', 'all_to_all', 'alltoall',
                    'collective-permute', 'collective_permute', 'sendrecv')),
    ('convolution', ('convolution', 'fprop', 'dgrad', 'wgrad', 'cudnn', 'implicit_gemm')),
    ('matmul', ('gemm', 'xmma', 'nvjet', 'cutlass', 'cublas', 'dot', 'matmul')),
    ('slicing', ('dynamic_update_slice', 'dynamic-update-slice', 'dynamic_slice',
                 'dynamic-slice')),
    ('reduction', ('reduce', 'reduction')),
    ('copy/layout', ('transpose', 'copy', 'broadcast', 'concatenate', 'pad')),
    ('elementwise', ('fusion', 'loop_', 'add', 'multiply', 'convert', 'select')),
)
CATEGORY_NAMES = tuple(name for name, _ in _CATEGORIES) + ('other',)
# The step's optimized HLO, which `start_trace` writes beside the trace: what names its ops.
STEP_HLO = 'train_step.hlo.txt.gz'


def category(op_name: str, categories: dict[str, str] | None = None) -> str:
  """The category of a device op: from `categories` (`step_ops` of the step's HLO) where they
  name it, else from the op's name (a kernel's or an HLO op's)."""
  if categories and op_name in categories:
    return categories[op_name]
  lowered = op_name.lower()
  for name, keys in _CATEGORIES:
    if any(key in lowered for key in keys):
      return name
  return 'other'


def step_ops(hlo: str) -> tuple[dict[str, str], dict[str, str]]:
  """({op name as a trace writes it: category}, {...: the jax op it came from}) for the
  kernels of an optimized HLO module.

  A TPU's "XLA Ops" line and XLA:CPU's threads name each op as the HLO does
  (`fusion.12`); XLA:GPU names a kernel after its HLO instruction with '.' and
  '-' made '_' (`loop_add_fusion.2` runs as `loop_add_fusion_2`). Both
  spellings are keys. The jax op is `hlo_traffic.readable_source`'s
  ('backward MixerBlock_*/channel_mixing/Dense_0/dot_general'), '' where the
  HLO names none.
  """
  kernels = hlo_traffic.kernels(hlo)
  categories, sources = {}, {}
  for spelling in (lambda name: name, lambda name: re.sub(r'[.\-]', '_', name)):
    for kernel in kernels:  # The HLO's own names first: a '_' spelling never hides one.
      key = spelling(kernel.name)
      categories.setdefault(key, kernel.category)
      sources.setdefault(key, hlo_traffic.readable_source(kernel.source))
  return categories, sources


def _events_and_names(trace: dict | list) -> tuple[list, dict, dict]:
  """A Chrome trace's events, {pid: process name} and {(pid, tid): thread name}."""
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  processes, threads = {}, {}
  for event in events:
    if event.get('ph') != 'M':
      continue
    if event.get('name') == 'process_name':
      processes[event.get('pid')] = event['args'].get('name', '')
    elif event.get('name') == 'thread_name':
      threads[(event.get('pid'), event.get('tid'))] = event['args'].get('name', '')
  return events, processes, threads


def _sum_events(events, keep) -> dict[str, tuple[float, int]]:
  """{name: (total microseconds, count)} over the complete events `keep(event)` accepts."""
  totals = collections.defaultdict(lambda: [0.0, 0])
  for event in events:
    if event.get('ph') == 'X' and keep(event):
      total = totals[event.get('name', '?')]
      total[0] += float(event.get('dur', 0.0))
      total[1] += 1
  return {name: (total[0], total[1]) for name, total in totals.items()}


def device_op_times(trace: dict | list) -> tuple[dict[str, tuple[float, int]], int]:
  """({op name: (total microseconds, count)}, devices) over a Chrome trace's device ops.

  Device processes are those named '/device:...' (not the host, not the
  'CUSTOM' ones). On a GPU the kernels are on 'Stream #...' lines; a TPU's ops
  on its 'XLA Ops' line. Other device lines (e.g. 'XLA Modules') summarise the
  same time and are not counted again. Totals are over all devices; `devices`
  is how many had ops (`summarize` divides by it).
  """
  events, processes, threads = _events_and_names(trace)
  devices = {pid for pid, name in processes.items()
             if name.startswith('/device:') and 'CUSTOM' not in name}
  lines = {key: name for key, name in threads.items() if key[0] in devices}
  streams = {key for key, name in lines.items() if name.startswith('Stream')}
  chosen = streams or {key for key, name in lines.items() if name == 'XLA Ops'}
  busy_devices = set()

  def on_device(event):
    if (event.get('pid'), event.get('tid')) not in chosen:
      return False
    busy_devices.add(event.get('pid'))
    return True

  return _sum_events(events, on_device), len(busy_devices)


def host_op_times(trace: dict | list, op_names) -> dict[str, tuple[float, int]]:
  """{op name: (total microseconds, count)} of the step's ops that ran on the host (XLA:CPU).

  XLA:CPU runs each op (a thunk named as its HLO instruction: `dot.114`,
  `ynn_fusion.22`) on one of its threads (`tf_XLAPjRtCpuClient/...`,
  `tf_XLAEigen/...`) and records it there, beside events that are not ops (the
  executor's span, `end: dot.114` markers). `op_names` (the step's HLO, as
  `step_ops` keys it) tells them apart.
  """
  events, processes, _ = _events_and_names(trace)
  hosts = {pid for pid, name in processes.items() if name.startswith('/host:')}
  return _sum_events(events, lambda e: e.get('pid') in hosts and e.get('name') in op_names)


def summarize(op_times: dict[str, tuple[float, int]], steps: int, devices: int = 1,
              top: int = 15, categories: dict[str, str] | None = None,
              sources: dict[str, str] | None = None) -> dict[str, Any]:
  """Milliseconds per step and device: total, per category (with shares) and the `top` ops.

  `categories` and `sources` (`step_ops` of the traced step's HLO) sort the ops they name
  and say which jax op each came from."""
  if steps < 1 or devices < 1:
    raise ValueError(f'steps={steps}, devices={devices}: a trace holds at least one of each.')
  if not op_times:
    return {'device_ms_per_step': None}
  per_step = 1000 * steps * devices  # Microseconds over all devices -> ms per step and device.
  per_category = dict.fromkeys(CATEGORY_NAMES, 0.0)
  for name, (micros, _) in op_times.items():
    per_category[category(name, categories)] += micros
  total = sum(per_category.values())
  ranked = sorted(op_times.items(), key=lambda item: -item[1][0])[:top]
  return {
      'device_ms_per_step': round(total / per_step, 3),
      **{f'{name}_pct': round(100 * micros / total, 1) for name, micros in per_category.items()},
      'top_ops': [{'op': name, 'category': category(name, categories),
                   'ms_per_step': round(micros / per_step, 3),
                   'calls_per_step': round(count / steps / devices, 1),
                   'source': (sources or {}).get(name, '')}
                  for name, (micros, count) in ranked]}


def summarize_trace(trace: dict | list, steps: int, top: int = 15,
                    categories: dict[str, str] | None = None,
                    sources: dict[str, str] | None = None) -> dict[str, Any]:
  """`summarize` of a trace's device ops, per device; on the CPU backend, of the step's ops
  on the host's XLA threads (`host_op_times`: it takes the step's HLO, `categories`)."""
  op_times, devices = device_op_times(trace)
  ops_on = 'device'
  if not op_times and categories:
    op_times, ops_on = host_op_times(trace, categories), 'cpu threads'
    # Each op of the entry computation runs once per step and device (loop bodies more).
    devices = round(min(count for _, count in op_times.values()) / steps) if op_times else 1
  return {**summarize(op_times, steps, max(devices, 1), top, categories, sources),
          'ops_on': ops_on}


def start_trace(trace_dir: str, compiled) -> None:
  """`jax.profiler.start_trace(trace_dir)`, with the step's optimized HLO (`compiled`, a
  `jax.stages.Compiled`) written beside it first (`STEP_HLO`), so that `read_step_ops`
  can sort the trace's ops by what they are. The trainer's `config.profile_steps` and `run`
  both start here."""
  from etils import epath  # pylint: disable=g-import-not-at-top  (gs:// as well as local)
  folder = epath.Path(trace_dir)
  folder.mkdir(parents=True, exist_ok=True)
  try:
    # The flagship's step for v3-256 is 0.9 MB of HLO text scanned, 10.5 unrolled (1.1 MB
    # at level 1, compressed in 0.04 s; as_text itself takes 1 s).
    (folder / STEP_HLO).write_bytes(gzip.compress(compiled.as_text().encode(), compresslevel=1))
  except OSError as error:  # A training run goes on: the trace is what it asked for.
    logging.warning('Could not write %s beside the profile (%s): its ops will be sorted by '
                    'their names alone.', folder / STEP_HLO, error)
  jax.profiler.start_trace(trace_dir)


def read_step_ops(trace_dir: str) -> tuple[dict[str, str] | None, dict[str, str] | None]:
  """`step_ops` of the HLO `start_trace` wrote into `trace_dir`; (None, None) where there is
  none (a trace taken otherwise: its ops are then sorted by name alone)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(trace_dir) / STEP_HLO
  if not path.exists():
    return None, None
  return step_ops(gzip.decompress(path.read_bytes()).decode())


def read_trace(trace_dir: str) -> dict | list | None:
  """The newest trace under `trace_dir` (local or gs://), or None if the profiler wrote none.

  jax.profiler writes `plugins/profile/<time>/<host>.trace.json.gz` (Chrome
  trace format; `create_perfetto_trace=True` adds `perfetto_trace.json.gz`,
  the same events). Only the newest run's folder is read (an older one would be
  another run's), and where several hosts wrote into it, the first host's file.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top  (gs:// as well as local)
  folders = sorted(epath.Path(trace_dir).glob('plugins/profile/*'))
  if not folders:
    return None
  files = (sorted(folders[-1].glob('*.trace.json.gz'))
           or sorted(folders[-1].glob('perfetto_trace.json.gz')))
  return json.loads(gzip.decompress(files[0].read_bytes())) if files else None


def run(config: ml_collections.ConfigDict, trace_dir: str, steps: int = 5) -> dict[str, Any]:
  """Traces `steps` train steps of `config` (built with `model_bench.bench_config`)."""
  setup = trainer_setup.build(config)
  batch = model_bench.device_batch(setup)
  state = setup.create_state()
  compiled = trainer_setup.compile_train_step(setup)
  state, metrics = compiled(state, batch, setup.dropout_rng)  # Warm-up, outside the trace.
  jax.block_until_ready((state, metrics))
  start_trace(trace_dir, compiled)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch, setup.dropout_rng)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  jax.profiler.stop_trace()
  trace = read_trace(trace_dir)
  categories, sources = read_step_ops(trace_dir)
  return {
      'benchmark': 'profile', **model_bench.config_fields(config),
      'device_kind': jax.devices()[0].device_kind, 'steps': steps,
      'step_seconds': round(seconds, 4), 'trace_dir': trace_dir,
      **(summarize_trace(trace, steps, categories=categories, sources=sources)
         if trace is not None else {'device_ms_per_step': None})}


def format_top_ops(top_ops: list[dict[str, Any]]) -> str:
  """`summarize`'s largest ops, one per line."""
  width = min(max([len(op['op']) for op in top_ops] + [2]), 60)
  # The jax op each came from, where the step's HLO named them (`step_ops`).
  named = any(op.get('source') for op in top_ops)
  lines = [(f'{"ms/step":>8}  {"calls":>5}  {"category":<14}  {"op":<{width}}'
            + ('  jax op' if named else '')).rstrip()]
  for op in top_ops:
    lines.append(f'{op["ms_per_step"]:8.3f}  {op["calls_per_step"]:5g}  {op["category"]:<14}  '
                 f'{op["op"][:width]:<{width}}  {op.get("source", "")}'.rstrip())
  return '\n'.join(lines)


def format_summary(summary: dict[str, Any]) -> str:
  """Device time per step, its share per category, and the largest ops."""
  ranked = sorted(CATEGORY_NAMES, key=lambda name: -summary[f'{name}_pct'])
  shares = ', '.join(f'{name} {summary[f"{name}_pct"]}%' for name in ranked
                     if summary[f'{name}_pct'])
  what = ('CPU time of the ops on XLA\'s threads' if summary.get('ops_on') == 'cpu threads'
          else 'device time')
  return (f'{what}: {summary["device_ms_per_step"]} ms per step ({shares})\n'
          + format_top_ops(summary['top_ops']))


def main(argv, trace_dir: str, steps: int, top: int) -> int:
  """Prints the summary of the trace in `trace_dir`; 2 with an `error:` line if there is none."""
  del argv
  trace = read_trace(trace_dir) if trace_dir else None
  try:
    categories, sources = read_step_ops(trace_dir) if trace is not None else (None, None)
  except (OSError, EOFError, UnicodeDecodeError, ValueError) as error:  # Cut short, not HLO.
    reason = str(error).split(':')[0].rstrip('.')
    print(f'error: {trace_dir}/{STEP_HLO} is not a readable HLO module ({reason}): profile '
          'again, or delete it to sort the ops by their names alone.', file=sys.stderr)
    return 2
  summary = (summarize_trace(trace, steps, top, categories, sources)
             if trace is not None else None)
  if not trace_dir:
    problem = '--trace_dir is required, e.g. --trace_dir=WORKDIR/profile.'
  elif trace is None:
    problem = (f'{trace_dir} holds no plugins/profile/*/*.trace.json.gz: pass the folder given '
               'to jax.profiler (config.profile_steps writes <workdir>/profile).')
  elif summary['device_ms_per_step'] is None:
    problem = (f'{trace_dir}: the trace has no device ops, and no {STEP_HLO} to find a CPU '
               "run's ops by: take the trace with config.profile_steps or the profile "
               'benchmark, which write it.')
  else:
    print(format_summary(summary))
    return 0
  print(f'error: {problem}', file=sys.stderr)
  return 2


if __name__ == '__main__':
  # Defined here, not at import: `mixer.benchmarks.run` imports this module and has a --steps.
  _TRACE_DIR = flags.DEFINE_string('trace_dir', None, 'A folder jax.profiler wrote, e.g. '
                                   '<workdir>/profile (config.profile_steps).')
  _STEPS = flags.DEFINE_integer('steps', 1, 'How many train steps the trace holds.',
                                lower_bound=1)
  _TOP = flags.DEFINE_integer('top', 15, 'How many of the largest ops to list.', lower_bound=1)
  app.run(lambda argv: sys.exit(main(argv, _TRACE_DIR.value, _STEPS.value, _TOP.value)))
