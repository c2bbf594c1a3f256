"""Where a train step's device time goes: a profiler trace of the trainer's step, summed per op.

  python -m mixer.benchmarks.run --benchmarks=profile --models=Mixer-B_16 --batch_sizes=256 \\
      --dtype=bfloat16

Compiles the trainer's train step (`trainer_setup`, as `model_bench` does), runs
it once to warm up, then traces `steps` steps with `jax.profiler` (the same
trace `config.profile_steps` writes during a training run). The trace, kept in
`trace_dir` for TensorBoard or Perfetto, is read back
(`plugins/profile/<time>/<host>.trace.json.gz`) and every device op's time is
summed: per category (matmul, convolution, elementwise, reduction, copy/layout,
memcpy, other) and per op, the largest first. That table says what to fix: the
matmuls are the useful work, everything else is overhead around them.

Device ops are the kernels on the GPU streams, or the "XLA Ops" line of a TPU;
the CPU backend records no per-op device events, so there only the step time
and the trace come back. Times are per step and per device. The categories are
read from the op names, which on a GPU name the kernel (cuBLAS `nvjet`/`xmma`,
Triton `gemm_fusion`, XLA's `loop_`/`input_` fusions). On a TPU the names are
HLO names (`fusion.12`), so most ops land in 'elementwise': read the top ops
there.

A training run's own trace (`config.profile_steps=(start, stop)` writes it to
`<workdir>/profile`) is summed the same way:

  python -m mixer.benchmarks.profile_bench --trace_dir=WORKDIR/profile --steps=STOP-START
"""

from __future__ import annotations

import collections
import gzip
import json
import sys
import time
from typing import Any

import jax
import ml_collections
from absl import app, flags

from mixer import trainer_setup
from mixer.benchmarks import model_bench

# First match wins: a cuDNN convolution kernel's name holds 'gemm' ('implicit_gemm'), and
# 'conv' alone would match every 'convert' fusion. 'copy/layout' is data movement with no
# arithmetic: transposes, copies, fills (broadcast) and the stacking (dynamic-update-slice)
# of scanned blocks.
_CATEGORIES = (
    ('memcpy', ('memcpy', 'memset')),
    ('convolution', ('convolution', 'fprop', 'dgrad', 'wgrad', 'cudnn', 'implicit_gemm')),
    ('matmul', ('gemm', 'xmma', 'nvjet', 'cutlass', 'cublas', 'dot', 'matmul')),
    ('copy/layout', ('transpose', 'copy', 'dynamic_update_slice', 'dynamic_slice', 'broadcast',
                     'concatenate', 'pad')),
    ('reduction', ('reduce', 'reduction')),
    ('elementwise', ('fusion', 'loop_', 'add', 'multiply', 'convert', 'select')),
)
CATEGORY_NAMES = tuple(name for name, _ in _CATEGORIES) + ('other',)


def category(op_name: str) -> str:
  """The category of a device op (a kernel or an HLO op name)."""
  lowered = op_name.lower()
  for name, keys in _CATEGORIES:
    if any(key in lowered for key in keys):
      return name
  return 'other'


def device_op_times(trace: dict | list) -> tuple[dict[str, tuple[float, int]], int]:
  """({op name: (total microseconds, count)}, devices) over a Chrome trace's device ops.

  Device processes are those named '/device:...' (not the host, not the
  'CUSTOM' ones). On a GPU the kernels are on 'Stream #...' lines; a TPU's ops
  on its 'XLA Ops' line. Other device lines (e.g. 'XLA Modules') summarise the
  same time and are not counted again. Totals are over all devices; `devices`
  is how many had ops (`summarize` divides by it).
  """
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  processes, threads = {}, {}
  for event in events:
    if event.get('ph') != 'M':
      continue
    if event.get('name') == 'process_name':
      processes[event.get('pid')] = event['args'].get('name', '')
    elif event.get('name') == 'thread_name':
      threads[(event.get('pid'), event.get('tid'))] = event['args'].get('name', '')
  devices = {pid for pid, name in processes.items()
             if name.startswith('/device:') and 'CUSTOM' not in name}
  lines = {key: name for key, name in threads.items() if key[0] in devices}
  streams = {key for key, name in lines.items() if name.startswith('Stream')}
  chosen = streams or {key for key, name in lines.items() if name == 'XLA Ops'}
  totals = collections.defaultdict(lambda: [0.0, 0])
  busy_devices = set()
  for event in events:
    if event.get('ph') == 'X' and (event.get('pid'), event.get('tid')) in chosen:
      total = totals[event.get('name', '?')]
      total[0] += float(event.get('dur', 0.0))
      total[1] += 1
      busy_devices.add(event.get('pid'))
  return {name: (total[0], total[1]) for name, total in totals.items()}, len(busy_devices)


def summarize(op_times: dict[str, tuple[float, int]], steps: int, devices: int = 1,
              top: int = 15) -> dict[str, Any]:
  """Milliseconds per step and device: total, per category (with shares) and the `top` ops."""
  if steps < 1 or devices < 1:
    raise ValueError(f'steps={steps}, devices={devices}: a trace holds at least one of each.')
  if not op_times:
    return {'device_ms_per_step': None}
  per_step = 1000 * steps * devices  # Microseconds over all devices -> ms per step and device.
  per_category = dict.fromkeys(CATEGORY_NAMES, 0.0)
  for name, (micros, _) in op_times.items():
    per_category[category(name)] += micros
  total = sum(per_category.values())
  ranked = sorted(op_times.items(), key=lambda item: -item[1][0])[:top]
  return {
      'device_ms_per_step': round(total / per_step, 3),
      **{f'{name}_pct': round(100 * micros / total, 1) for name, micros in per_category.items()},
      'top_ops': [{'op': name, 'category': category(name),
                   'ms_per_step': round(micros / per_step, 3),
                   'calls_per_step': round(count / steps / devices, 1)}
                  for name, (micros, count) in ranked]}


def summarize_trace(trace: dict | list, steps: int, top: int = 15) -> dict[str, Any]:
  """`summarize` of a trace's device ops, per device."""
  op_times, devices = device_op_times(trace)
  return summarize(op_times, steps, max(devices, 1), top)


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
  jax.profiler.start_trace(trace_dir)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch, setup.dropout_rng)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  jax.profiler.stop_trace()
  trace = read_trace(trace_dir)
  return {
      'benchmark': 'profile', **model_bench.config_fields(config),
      'device_kind': jax.devices()[0].device_kind, 'steps': steps,
      'step_seconds': round(seconds, 4), 'trace_dir': trace_dir,
      **(summarize_trace(trace, steps) if trace is not None else {'device_ms_per_step': None})}


def format_top_ops(top_ops: list[dict[str, Any]]) -> str:
  """`summarize`'s largest ops, one per line."""
  lines = [f'{"ms/step":>8}  {"calls":>5}  {"category":<14}  op']
  for op in top_ops:
    lines.append(f'{op["ms_per_step"]:8.3f}  {op["calls_per_step"]:5g}  {op["category"]:<14}  '
                 f'{op["op"][:100]}')
  return '\n'.join(lines)


def format_summary(summary: dict[str, Any]) -> str:
  """Device time per step, its share per category, and the largest ops."""
  ranked = sorted(CATEGORY_NAMES, key=lambda name: -summary[f'{name}_pct'])
  shares = ', '.join(f'{name} {summary[f"{name}_pct"]}%' for name in ranked
                     if summary[f'{name}_pct'])
  return (f'device time: {summary["device_ms_per_step"]} ms per step ({shares})\n'
          + format_top_ops(summary['top_ops']))


def main(argv, trace_dir: str, steps: int, top: int) -> int:
  """Prints the summary of the trace in `trace_dir`; 2 with an `error:` line if there is none."""
  del argv
  trace = read_trace(trace_dir) if trace_dir else None
  summary = summarize_trace(trace, steps, top) if trace is not None else None
  if not trace_dir:
    problem = '--trace_dir is required, e.g. --trace_dir=WORKDIR/profile.'
  elif trace is None:
    problem = (f'{trace_dir} holds no plugins/profile/*/*.trace.json.gz: pass the folder given '
               'to jax.profiler (config.profile_steps writes <workdir>/profile).')
  elif summary['device_ms_per_step'] is None:
    problem = (f'{trace_dir}: the trace has no device ops (a CPU run records none); profile on '
               'a GPU or TPU.')
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
