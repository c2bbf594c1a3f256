"""What a run shows its user: progress lines, the start-up summary, metric files and curves.

Only process 0 writes files; the other processes log to the console only, so a
pod run produces one set of event files and one `metrics.jsonl`.

The trainer calls, in this order:
- `write_config(workdir, config)` -> `<workdir>/config.json` (the full config,
  instead of dumping it to the log) and `write_parameter_table(workdir, params)`
  -> `<workdir>/parameters.txt`;
- `startup_summary(...)`: one screen of facts (model, parameter count, mesh,
  data, evaluators, steps, memory per device), logged before step 1;
- `writer.write_hparams(flatten_hparams(config))` (TensorBoard's hparams tab,
  nested keys as `model.hidden_dim`);
- `ProgressLogger`: one line per `log_every` steps, measured on finished steps,
  with the expected wall time and core-hours once the first steps are measured;
- `plot_curves(workdir, schedule_fn)` -> `<workdir>/training_curves.png`.

`<workdir>/metrics.jsonl` has one JSON object per write:
`{"step": int, "<name>": float, ...}` with, among others, `train/loss`,
`train/learning_rate`, `train/grad_norm`, `<evaluator>/loss`,
`<evaluator>/accuracy` (a fraction), `<evaluator>/<dataset>_<k>shot`,
`perf/img_per_sec_per_core` and `perf/core_hours`.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import tensorflow as tf
from absl import logging
from clu import metric_writers, parameter_overview

from mixer import paths

METRICS_FILE = 'metrics.jsonl'
CURVES_FILE = 'training_curves.png'
CONFIG_FILE = 'config.json'
PARAMETERS_FILE = 'parameters.txt'


def prepare_workdir(workdir: str) -> str:
  """Creates the workdir; local paths become absolute, bucket paths stay as given."""
  if paths.is_remote(workdir):
    tf.io.gfile.makedirs(workdir)
    return workdir
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  return workdir


# Bucket storage has no append: there the writer adds a numbered part object
# `metrics.jsonl.part-<n>` with the lines of the last minute (and at each flush),
# so the cost of a write never depends on the run's length; `close` and a resume
# merge the parts into metrics.jsonl once. Readers use `metrics_lines`.
_PART = '.part-'
_REMOTE_FLUSH_SECONDS = 60.0


def _metrics_parts(path: str) -> list[str]:
  if not paths.is_remote(path):
    return []
  return sorted(tf.io.gfile.glob(path + _PART + '*'))


def _metrics_to_handle(path: str) -> bool:
  """Whether this process tends the metrics file: process 0, once the file or a part exists."""
  return jax.process_index() == 0 and bool(tf.io.gfile.exists(path) or _metrics_parts(path))


def metrics_lines(path: str) -> list[str]:
  """The lines of `metrics.jsonl`, followed by those of its not yet merged bucket parts."""
  lines = []
  for name in [path] * tf.io.gfile.exists(path) + _metrics_parts(path):
    with tf.io.gfile.GFile(name, 'r') as f:
      lines.extend(f.read().splitlines(keepends=True))
  return lines


def _merge_metrics(path: str, keep: Callable[[str], bool] = lambda line: True) -> None:
  """Rewrites metrics.jsonl (once) from itself and its parts, keeping the lines `keep` accepts."""
  parts = _metrics_parts(path)
  lines = [line if line.endswith('\n') else line + '\n' for line in metrics_lines(path)]
  paths.atomic_write(path, lambda f: f.write(''.join(filter(keep, lines)).encode('utf-8')))
  for part in parts:
    tf.io.gfile.remove(part)


def _step_of(line: str) -> int | None:
  try:
    record = json.loads(line)
  except ValueError:
    return None
  step = record.get('step') if isinstance(record, dict) else None
  return step if isinstance(step, int) and not isinstance(step, bool) else None


def drop_metrics_after(workdir: str, step: int) -> None:
  """After a resume at `step`: removes the rows a killed run wrote past it (process 0).

  Call it before the run's writer writes: rows of later steps would otherwise
  appear twice. Lines that are not metrics records are left as they are.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not _metrics_to_handle(path):
    return
  lines = metrics_lines(path)
  dropped = sum(1 for line in lines if (_step_of(line) or 0) > step)
  if dropped or _metrics_parts(path):
    _merge_metrics(path, keep=lambda line: (_step_of(line) or 0) <= step)
  if dropped:
    logging.info('Dropped %s past step %d from %s (written before the restart).',
                 _plural(dropped, 'row'), step, path)


def set_aside_metrics(workdir: str) -> str | None:
  """Before a fresh run: renames an existing metrics.jsonl to `metrics.jsonl.<UTC time>.old`.

  Its rows are of an attempt that never reached a checkpoint, or of another
  tool: kept, but out of the way of this run's steps. Returns the new name.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not _metrics_to_handle(path):
    return None
  if _metrics_parts(path):
    _merge_metrics(path)
  target = f'{path}.{time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())}.old'
  tf.io.gfile.rename(path, target, overwrite=True)
  logging.warning('%s holds rows of an earlier attempt that left no checkpoint: moved it to %s.',
                  path, target)
  return target


class JsonlWriter(metric_writers.MetricWriter):
  """Writes `{"step": step, name: value, ...}` lines to a file (scalars only).

  A resumed run extends the file. Local files are appended to (opened at the
  first write, so `drop_metrics_after` may rewrite the file before); on bucket
  storage lines are buffered and written as part objects (see `_PART`).
  """

  def __init__(self, path: str):
    self._path = path
    self._remote = paths.is_remote(path)
    self._pending: list[str] = []
    self._last_upload = time.monotonic()
    self._file = None

  def _upload(self):
    if self._pending:
      part = f'{self._path}{_PART}{time.time_ns():020d}'
      with tf.io.gfile.GFile(part, 'w') as f:
        f.write(''.join(self._pending))
      self._pending = []
    self._last_upload = time.monotonic()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {'step': int(step)}
    record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    line = json.dumps(record) + '\n'
    if self._remote:
      self._pending.append(line)
      if time.monotonic() - self._last_upload >= _REMOTE_FLUSH_SECONDS:
        self._upload()
    else:
      if self._file is None:
        self._file = open(self._path, 'a', encoding='utf-8')
      self._file.write(line)
      self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    if self._remote:
      self._upload()
    elif self._file:
      self._file.flush()

  def close(self):
    if self._remote:
      self._upload()
      if _metrics_parts(self._path):
        _merge_metrics(self._path)
    elif self._file:
      self._file.close()
      self._file = None


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard events + metrics.jsonl on process 0; nothing elsewhere.

  The scalars are not echoed to the log (clu's logging writer would print each
  one on its own line with 16 digits): `ProgressLogger` prints the compact line.
  """
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  return metric_writers.MultiWriter([
      metric_writers.SummaryWriter(workdir),
      JsonlWriter(os.path.join(workdir, METRICS_FILE)),
  ])


def format_number(value: float) -> str:
  """4 significant digits, without an exponent between 1e-4 and 1e6 (0.002143, 1.258, 12346)."""
  value = float(value)
  if not math.isfinite(value):
    return str(value)
  if value == 0:
    return '0'
  magnitude = math.floor(math.log10(abs(value)))
  if -4 <= magnitude < 6:
    return f'{value:.{max(0, 3 - magnitude)}f}'
  return f'{value:.4g}'


def format_duration(seconds: float | None) -> str:
  """h:mm:ss, rounded to the second ('0:00:50', '12:03:04'); '?' when unknown."""
  if seconds is None or not math.isfinite(seconds):
    return '?'
  total = max(0, round(seconds))
  hours, rest = divmod(total, 3600)
  return f'{hours}:{rest // 60:02d}:{rest % 60:02d}'


def format_scalars(step: int, values: Mapping[str, Any]) -> str:
  """A compact log line for metrics, e.g. evaluation results: 'step 100 | eval/loss 0.1234'."""
  return ' | '.join([f'step {step}'] + [f'{key} {format_number(np.asarray(value))}'
                                        for key, value in sorted(values.items())])


#################### Progress ####################


class ProgressLogger:
  """One compact line per `log_every` steps, timed on *finished* steps.

  JAX dispatches steps asynchronously, so a step counted when it is queued makes
  the first lines overstate the speed many times over. Here the caller reports a
  step only once it has finished (after fetching its metrics, which waits for
  it), and the clock starts at the first finished step, so the compilation and
  start-up of step 1 count in no rate:

    progress = ProgressLogger(total_steps, start_step, batch_size, num_cores, log_every)
    while step < total_steps:
      state, metrics = train_step(state, batch)
      step += 1
      if progress.should_fetch(step):
        values = jax.device_get(metrics)               # Waits for the step.
        perf = progress.finished(step, values)         # Logs the line at log steps.
        if perf: writer.write_scalars(step, {**values, **perf})
      if <evaluate or save>:
        progress.pause(step, state)                    # Waits for `state`, stops the clock.
        ...
        progress.resume()

  A line (4 significant digits, plain text: one line per log step also on a
  non-interactive console such as CI or pod logs), here split in two:

    step  50/300 | loss 0.4123 | lr 0.002143 | grad 1.258 |
        2.134 steps/s | 34.14 img/s/core | ETA 0:01:57

  steps/s and img/s/core cover the steps since the previous line, without
  pauses. The ETA is the remaining steps times the wall time per step since the
  first finished step, pauses (evaluations, checkpoints) included, so it
  converges to the real end time. `core_hours` (carried in checkpoints) counts
  training time only, times `num_cores`.
  """

  def __init__(self, total_steps: int, start_step: int, batch_size: int, num_cores: int,
               log_every: int, *, core_hours: float = 0.0,
               clock: Callable[[], float] = time.perf_counter,
               log: Callable[[str], None] = logging.info):
    self.total_steps = int(total_steps)
    self.batch_size = int(batch_size)
    self.num_cores = int(num_cores)
    self.log_every = int(log_every)
    self.core_hours = float(core_hours)
    self._clock = clock
    self._log = log
    self._running_since: float | None = clock()
    self._active = 0.0                  # Seconds of training, pauses excluded.
    self._window: tuple[int, float] | None = None   # (step, self._active) at the window start.
    self._origin: tuple[int, float] | None = None   # (step, wall clock) of the first finished step.
    self._paused_at_step: int | None = None
    self._expected_logged = False
    self._step_width = len(str(self.total_steps))
    del start_step  # The first finished step, whichever it is, starts the clock.

  def should_fetch(self, step: int) -> bool:
    """Whether to wait for `step` and report it: the first step, log steps, the last."""
    return (self._window is None or step % self.log_every == 0
            or step == self.total_steps)

  def _tick(self, now: float) -> None:
    if self._running_since is not None:
      seconds = now - self._running_since
      self._active += seconds
      self.core_hours += seconds * self.num_cores / 3600.0
      self._running_since = now

  def finished(self, step: int, metrics: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Reports that `step` has finished; logs a line at log steps.

    Returns the perf scalars to write at a log step (`perf/img_per_sec_per_core`
    when measured, `perf/core_hours`), or {} at a step that only starts the clock.
    """
    now = self._clock()
    self._tick(now)
    if self._origin is None:
      self._origin = (step, now)
    is_log_step = step % self.log_every == 0 or step == self.total_steps
    if self._window is None:
      self._window = (step, self._active)
      if not is_log_step:
        return {}
    window_step, window_active = self._window
    seconds = self._active - window_active
    steps_per_sec = (step - window_step) / seconds if step > window_step and seconds > 0 else None
    self._window = (step, self._active)
    if not is_log_step:
      return {}
    origin_step, origin_time = self._origin
    eta = None
    if step > origin_step:
      eta = (self.total_steps - step) * (now - origin_time) / (step - origin_step)
    metrics = metrics or {}
    fields = [f'step {step:>{self._step_width}}/{self.total_steps}']
    for key, label in (('train/loss', 'loss'), ('train/learning_rate', 'lr'),
                       ('train/grad_norm', 'grad')):
      if key in metrics:
        fields.append(f'{label} {format_number(np.asarray(metrics[key]))}')
    perf = {'perf/core_hours': self.core_hours}
    if steps_per_sec is not None:
      img_per_sec_per_core = steps_per_sec * self.batch_size / self.num_cores
      perf['perf/img_per_sec_per_core'] = img_per_sec_per_core
      fields += [f'{format_number(steps_per_sec)} steps/s',
                 f'{format_number(img_per_sec_per_core)} img/s/core']
    fields.append(f'ETA {format_duration(eta) if step < self.total_steps else "done"}')
    self._log(' | '.join(fields))
    if steps_per_sec is not None and not self._expected_logged and step < self.total_steps:
      self._expected_logged = True
      self._log(self.expected_cost(step, steps_per_sec))
    return perf

  def expected_cost(self, step: int, steps_per_sec: float) -> str:
    """'Expected: ...' the wall time and core-hours of the remaining training steps."""
    seconds = (self.total_steps - step) / steps_per_sec
    core_hours = self.core_hours + seconds * self.num_cores / 3600.0
    cores = f'{self.num_cores} core{"s" if self.num_cores > 1 else ""}'
    return (f'Expected: {format_duration(seconds)} more for steps {step}..{self.total_steps} '
            f'at {format_number(steps_per_sec)} steps/s, {format_number(core_hours)} '
            f'core-hours in all on {cores} (training steps only; evaluations and '
            'checkpoints add to it).')

  def pause(self, step: int, in_flight: Any = None) -> None:
    """Stops the clock before an evaluation or save, once `in_flight` (e.g. the state) is done."""
    if in_flight is not None:
      jax.block_until_ready(in_flight)
    self._tick(self._clock())
    self._running_since = None
    self._paused_at_step = step

  def resume(self) -> None:
    """Restarts the clock; the next window starts at the step `pause` was given."""
    self._running_since = self._clock()
    if self._window is not None and self._paused_at_step is not None:
      self._window = (self._paused_at_step, self._active)


#################### Start-up: summary, config and parameter files ####################


def _plural(count: int, noun: str, plural: str | None = None) -> str:
  return f'{count:,} {noun if count == 1 else plural or noun + "s"}'


def _cadence(every_steps: int) -> str:
  return f'every {every_steps:,} steps and at the end' if every_steps else 'at the end'


def describe_evaluator(name: str, settings: Mapping[str, Any], train_dataset: str) -> str:
  """One line for an evaluator's settings (`config.evals.<name>`): what it reads, how often."""
  kind = settings.get('type', '?')
  every = int(settings.get('every_steps') or 0)
  if kind == 'classification':
    what = f'{settings.get("dataset") or train_dataset}:{settings.get("split")}'
    if settings.get('label_field', 'label') != 'label':
      what += f' ({settings["label_field"]})'
  elif kind == 'fewshot':
    shots = ','.join(str(k) for k in settings.get('shots', ()))
    what = f'{", ".join(settings.get("datasets", {}) or ["(none)"])}, {shots} shots'
  else:
    what = ''
  return f'{name} ({kind}{": " + what if what else ""}) {_cadence(every)}'


def startup_summary(*, workdir: str, model_name: str, model_sizes: Mapping[str, Any],
                    image_size: int, num_classes: int, num_params: int,
                    mesh_shape: Mapping[str, int], device_kind: str, num_devices: int,
                    num_processes: int, dataset: str, train_size: int | None,
                    batch_size: int, evaluators: Mapping[str, Mapping[str, Any]],
                    total_steps: int, start_step: int = 0, warmup_steps: int | None = None,
                    memory: Mapping[str, int] | None = None, model_dtype: str = 'float32',
                    init_from: str | None = None) -> str:
  """The facts a user looks for before step 1, as at most ~15 lines of text.

  Plain values only (no trainer objects). `model_sizes` holds patch_size,
  hidden_dim, num_blocks, tokens_mlp_dim, channels_mlp_dim; `evaluators` is
  `config.evals` (name -> settings with `type` and `every_steps`); `memory` is
  `trainer_setup.memory_per_device(compiled)` (bytes; None where the backend
  reports none); `train_size` is the number of training examples (None if unknown).
  """
  sizes = model_sizes
  if start_step:
    start = f'resuming at step {start_step:,}'
  elif init_from:
    start = f'starting from {init_from}'
  else:
    start = 'starting from scratch'
  mesh = ' '.join(f'{axis}={size}' for axis, size in mesh_shape.items())
  per_host = batch_size // max(1, num_processes)
  data = f'{dataset}: '
  data += f'{_plural(train_size, "training image")}, ' if train_size else 'training size unknown, '
  data += f'{num_classes:,} classes; batch {batch_size:,} ({per_host:,} per host)'
  steps = f'{total_steps:,} steps'
  if train_size:
    steps += f' = {format_number(total_steps * batch_size / train_size)} epochs'
  if warmup_steps:
    steps += f', warm-up {warmup_steps:,}'
  lines = [
      f'Run in {workdir}, {start}.',
      f'  model       {model_name}: patch {sizes["patch_size"]}, hidden {sizes["hidden_dim"]}, '
      f'{sizes["num_blocks"]} blocks, token MLP {sizes["tokens_mlp_dim"]}, channel MLP '
      f'{sizes["channels_mlp_dim"]}; {image_size}x{image_size} px, {model_dtype} compute',
      f'  parameters  {num_params:,} ({format_number(num_params / 1e6)} M); table in '
      f'{PARAMETERS_FILE}',
      f'  devices     {num_devices} x {device_kind} in '
      f'{_plural(num_processes, "process", "processes")}; mesh {mesh}',
      f'  data        {data}',
      f'  steps       {steps}',
  ]
  for index, (name, settings) in enumerate(evaluators.items()):
    label = 'evaluators  ' if index == 0 else ' ' * 12
    lines.append(f'  {label}{describe_evaluator(name, settings, dataset)}')
  if memory:
    mib = {k: v / 2**20 for k, v in memory.items()}
    lines.append(
        f'  memory      {format_number(mib["total"])} MiB per device for the train step '
        f'(arguments {format_number(mib["argument"])} + temporaries {format_number(mib["temp"])}'
        f' + outputs {format_number(mib["output"])} - donated {format_number(mib["alias"])} MiB)')
  else:
    lines.append('  memory      not reported by this backend')
  lines.append(f'  files       {CONFIG_FILE}, {PARAMETERS_FILE}, {METRICS_FILE}, {CURVES_FILE}; '
               f'watch: tensorboard --logdir {workdir} --host localhost')
  return '\n'.join(lines)


def config_as_dict(config) -> dict[str, Any]:
  """The config as plain JSON-able Python (tuples become lists, anything else its str)."""
  return json.loads(json.dumps(config.to_dict(), default=str))


def _write_text(path: str, text: str) -> str:
  paths.atomic_write(path, lambda f: f.write(text.encode('utf-8')))
  return path


def write_config(workdir: str, config) -> str:
  """Writes the full config to `<workdir>/config.json` (sorted keys) and returns the path."""
  text = json.dumps(config_as_dict(config), indent=2, sort_keys=True) + '\n'
  return _write_text(os.path.join(workdir, CONFIG_FILE), text)


def write_parameter_table(workdir: str, params: Any) -> str:
  """Writes clu's parameter table (name, shape, size; no statistics) to `<workdir>/parameters.txt`.

  `params` may be abstract (`jax.ShapeDtypeStruct` leaves): nothing is fetched.
  """
  text = parameter_overview.get_parameter_overview(params, include_stats=False) + '\n'
  return _write_text(os.path.join(workdir, PARAMETERS_FILE), text)


def flatten_hparams(config) -> dict[str, bool | int | float | str]:
  """Every config key for TensorBoard's hparams tab, nested keys as 'model.hidden_dim'.

  Values TensorBoard cannot hold (lists, tuples, None) become their text, so
  `sharding_rules` or `fewshot.datasets.<name>` stay one readable entry each.
  """
  flat: dict[str, bool | int | float | str] = {}

  def visit(prefix: str, node: Any) -> None:
    if hasattr(node, 'items'):  # dict or ConfigDict (which is not a Mapping).
      for key, value in node.items():
        visit(f'{prefix}.{key}' if prefix else str(key), value)
      return
    if isinstance(node, np.generic):
      node = node.item()
    flat[prefix] = node if isinstance(node, (bool, int, float, str)) else str(node)

  visit('', config)
  return flat


#################### Curves ####################

_ACCURACY_KEY = re.compile(r'^(?P<name>[^/]+)/(?P<metric>accuracy|top5_accuracy|real_accuracy)$')
_FEWSHOT_KEY = re.compile(r'^(?P<name>[^/]+)/(?P<dataset>.+)_(?P<shots>\d+)shot$')
_ACCURACY_LABELS = {'accuracy': 'top-1', 'top5_accuracy': 'top-5', 'real_accuracy': 'ReaL'}
_MAX_WARNINGS = 3


def read_metrics(path: str) -> dict[str, list[tuple[int, float]]]:
  """`metrics.jsonl` as name -> [(step, value)] sorted by step.

  A line that is not a JSON object with an integer `step` and numeric values
  (broken by a crash, or written by another tool) is skipped with a warning.
  Non-finite values are left out. Where a resumed run wrote a step twice, the
  later line wins.
  """
  series: dict[str, dict[int, float]] = {}
  skipped = []
  for number, line in enumerate(metrics_lines(path), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or 'step' not in record:
        raise ValueError("no 'step'")
      step = record['step']
      if not isinstance(step, int) or isinstance(step, bool):
        raise ValueError(f'step {step!r} is not an integer')
      values = {key: value for key, value in record.items() if key != 'step'}
      for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
          raise ValueError(f'{key!r} is {value!r}, not a number')
    except ValueError as error:  # JSONDecodeError is a ValueError too.
      skipped.append((number, error))
      continue
    for key, value in values.items():
      if math.isfinite(value):
        series.setdefault(key, {})[step] = float(value)
  for number, error in skipped[:_MAX_WARNINGS]:
    logging.warning('%s line %d skipped (not a metrics record: %s).', path, number, error)
  if len(skipped) > _MAX_WARNINGS:
    logging.warning('%s: %s skipped.', path, _plural(len(skipped) - _MAX_WARNINGS, 'more line'))
  return {key: sorted(points.items()) for key, points in series.items()}


def _schedule_curve(schedule_fn: Callable[[Any], Any], last_step: int):
  """(steps, rates): the rate update `x` used, for x = 1..last_step (schedule_fn(x - 1)).

  The trainer logs `schedule(step_before_the_update)` at the step count after it,
  so the logged points lie on this curve. Evaluated for every step at once (the
  optax-style schedules take arrays); one call per step where that fails.
  """
  counts = np.arange(last_step)
  try:
    rates = np.asarray(schedule_fn(counts), np.float64)
    if rates.shape != counts.shape:
      raise ValueError('not vectorised')
  except Exception:  # pylint: disable=broad-except  (any scalar-only schedule)
    counts = np.unique(np.linspace(0, last_step - 1, min(last_step, 4096)).astype(int))
    rates = np.array([float(schedule_fn(int(c))) for c in counts])
  return counts + 1, rates


def _run_facts(workdir: str) -> dict[str, Any]:
  """Model name, dataset and total_steps from `<workdir>/config.json` ({} when unreadable)."""
  try:
    config = json.loads(paths.read_bytes(os.path.join(workdir, CONFIG_FILE)))
    return {'model': str(config['model']['name']), 'dataset': str(config['dataset']),
            'total_steps': int(config['total_steps'])}
  except (OSError, ValueError, KeyError, TypeError):
    return {}


def _title(workdir: str, last_step: int, facts: Mapping[str, Any]) -> str:
  """'Mixer-S_32 on digits, step 100 of 300 (digits_demo)'."""
  name = os.path.basename(os.path.normpath(workdir))
  if not facts:
    return f'{name}, step {last_step:,}'
  return (f'{facts["model"]} on {facts["dataset"]}, step {last_step:,} of '
          f'{facts["total_steps"]:,} ({name})')


def curves_figure(series: Mapping[str, list[tuple[int, float]]],
                  schedule_fn: Callable[[Any], Any] | None = None, title: str | None = None,
                  total_steps: int | None = None):
  """The matplotlib Figure of `plot_curves` (None when nothing is plottable).

  Panels, each present only when it has data: "Loss" (train on a log axis,
  every evaluator's `<name>/loss` on the same axes), "Accuracy" (every
  `<name>/accuracy`, `top5_accuracy`, `real_accuracy`, in %), "Few-shot" (every
  `<name>/<dataset>_<k>shot`, in %) and "Learning rate" (`schedule_fn` at every
  step, the logged values as dots). With `total_steps`, every x axis spans the
  whole run and the schedule's steps still to come are drawn dashed, so a
  picture taken mid-run shows where the run stands.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top  (plotting only)
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  losses = sorted(k for k in series if k.endswith('/loss'))
  losses.sort(key=lambda k: k != 'train/loss')
  accuracies = sorted(k for k in series if _ACCURACY_KEY.match(k))
  fewshots = sorted((k for k in series if _FEWSHOT_KEY.match(k)),
                    key=lambda k: (_FEWSHOT_KEY.match(k)['name'], _FEWSHOT_KEY.match(k)['dataset'],
                                   int(_FEWSHOT_KEY.match(k)['shots'])))
  last_step = max((points[-1][0] for points in series.values()), default=0)
  has_lr = 'train/learning_rate' in series or (schedule_fn is not None and last_step > 0)
  panels = [p for p, present in (('loss', losses), ('accuracy', accuracies),
                                 ('fewshot', fewshots), ('lr', has_lr)) if present]
  if not panels:
    return None
  columns = len(panels) if len(panels) <= 3 else 2  # Four as 2x2: each stays large enough.
  rows = math.ceil(len(panels) / columns)
  fig, grid = plt.subplots(rows, columns, figsize=(6.0 * columns, 4.2 * rows), squeeze=False)
  for extra in grid.flat[len(panels):]:
    extra.remove()
  axes = dict(zip(panels, grid.flat))

  def draw(ax, key, label, scale=1.0, **style):
    steps, values = zip(*series[key])
    many = len(steps) > 40
    ax.plot(steps, np.asarray(values) * scale, label=label,
            marker=None if many else 'o', markersize=3, linewidth=1.4, **style)

  if 'loss' in axes:
    ax = axes['loss']
    for key in losses:
      draw(ax, key, key.split('/')[0], alpha=0.9 if key == 'train/loss' else 1.0)
    if all(v > 0 for key in losses for _, v in series[key]):
      ax.set_yscale('log')
    ax.set_title('Loss')
    ax.set_ylabel('loss' + (' (log scale)' if ax.get_yscale() == 'log' else ''))
  if 'accuracy' in axes:
    ax = axes['accuracy']
    for key in accuracies:
      match = _ACCURACY_KEY.match(key)
      draw(ax, key, f'{match["name"]} {_ACCURACY_LABELS[match["metric"]]}', scale=100)
    ax.set_title('Accuracy')
    ax.set_ylabel('accuracy (%)')
  if 'fewshot' in axes:
    ax = axes['fewshot']
    for key in fewshots:
      match = _FEWSHOT_KEY.match(key)
      draw(ax, key, f'{match["dataset"]} {match["shots"]}-shot', scale=100)
    ax.set_title('Few-shot linear accuracy')
    ax.set_ylabel('accuracy (%)')
  if 'lr' in axes:
    ax = axes['lr']
    if schedule_fn is not None and last_step > 0:
      ax.plot(*_schedule_curve(schedule_fn, last_step), linewidth=1.4, label='schedule')
      if total_steps and total_steps > last_step:
        steps, rates = _schedule_curve(schedule_fn, total_steps)
        ax.plot(steps[last_step - 1:], rates[last_step - 1:], linewidth=1.2, linestyle='--',
                color=ax.get_lines()[-1].get_color(), alpha=0.5, label='to come')
    if 'train/learning_rate' in series:
      steps, values = zip(*series['train/learning_rate'])
      ax.plot(steps, values, linestyle='none', marker='o', markersize=3.5, color='black',
              label='logged')
    ax.set_title('Learning rate')
    ax.set_ylabel('learning rate')
    ax.ticklabel_format(axis='y', style='sci', scilimits=(-3, 3))
  for ax in axes.values():
    ax.set_xlabel('step')
    ax.grid(alpha=0.3, which='both' if ax.get_yscale() == 'log' else 'major')
    ax.set_xlim(0, total_steps * 1.02 if total_steps and total_steps > last_step else None)
    if len(ax.get_lines()) > 1:
      ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def plot_curves(workdir: str, schedule_fn: Callable[[Any], Any] | None = None,
                title: str | None = None) -> str | None:
  """Writes `<workdir>/training_curves.png` from metrics.jsonl (see `curves_figure`).

  Cheap enough to call at every evaluation, so a long run always has a current
  picture. `title` defaults to the model, dataset and steps read from
  `<workdir>/config.json` (written by `write_config`), and so does the run's
  length for the x axes. Returns the path, or None on processes other than 0
  or before anything plottable was logged.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not _metrics_to_handle(path):
    return None
  series = read_metrics(path)
  last_step = max((points[-1][0] for points in series.values()), default=0)
  facts = _run_facts(workdir)
  fig = curves_figure(series, schedule_fn,
                      title if title is not None else _title(workdir, last_step, facts),
                      total_steps=facts.get('total_steps'))
  if fig is None:
    return None
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  image = io.BytesIO()
  fig.savefig(image, format='png', dpi=100)
  plt.close(fig)
  out = os.path.join(workdir, CURVES_FILE)
  paths.atomic_write(out, lambda f: f.write(image.getvalue()))
  return out
