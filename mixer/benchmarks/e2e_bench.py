"""The trainer end to end on the 'synthetic' source, against the bare train step.

Runs `train.train_and_evaluate` (the real loop: host batch -> devices, the
compiled step, metrics, progress, checkpoint and evaluation pauses) on
`dataset='synthetic'` (one constant host batch: no decoding, no augmentation),
and reads the trainer's own throughput (`perf/img_per_sec_per_core` in
metrics.jsonl, measured between log steps, evaluations and saves excluded).
The first window (the first steps after compilation) is dropped. The bare
step is `model_bench`'s train step (batch already on the devices, nothing
else) for the same config, timed in the same process just before and just
after the trainer, each time in as many windows of as many steps as the
trainer's: both rates are medians of like windows.

`trainer_over_bare` is the loop's efficiency: what fraction of the step's
speed a training run keeps (target >= 0.95).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import tempfile
from typing import Any

from absl import logging

from mixer import train
from mixer.benchmarks import model_bench

TARGET = 0.95


def _trainer_rates(workdir: str) -> list[float]:
  rates = []
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      record = json.loads(line)
      if 'perf/img_per_sec_per_core' in record:
        rates.append(float(record['perf/img_per_sec_per_core']))
  return rates


@contextlib.contextmanager
def _quiet():
  """The trainer's console output left out of the benchmark's: its progress, orbax's lines,
  and its closing lines, which name files in a temporary workdir deleted right after.
  Warnings and errors still show."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    logging.set_verbosity(verbosity)


def _bare_step_rates(config_kwargs: dict, steps: int, windows: int) -> tuple[list[float], dict]:
  """Images/s per device of `windows` windows of `steps` bare train steps, and the record."""
  record = model_bench.run(model_bench.bench_config(**config_kwargs), modes=('train',),
                           steps=steps, repeats=windows,
                           peak={'flops': float('nan'), 'source': 'not measured',
                                 'flops_per_cpu_second': None})[0]
  per_step = record['batch_size'] / record['devices']
  return [per_step / seconds for seconds in record['step_seconds_windows']], record


def run(steps: int = 36, log_every: int = 6, **config_kwargs) -> dict[str, Any]:
  """Trainer vs bare step for `model_bench.bench_config(**config_kwargs)`."""
  config = model_bench.bench_config(**config_kwargs)
  config.dataset = 'synthetic'
  config.update(total_steps=steps, log_every=log_every, checkpoint_every=steps, warmup_steps=1)
  for settings in config.evals.values():  # Evaluate once at the end, on a few images.
    settings.every_steps = steps
    settings.split = 'test[:16]'
  config.eval_batch_size = 16
  # No persistent cache: it would live in the temporary workdir, and JAX would go on
  # writing the bare step's compilations into it after the folder is deleted.
  config.compilation_cache_dir = 'off'
  windows = steps // log_every - 1  # The trainer's, without its first.
  if windows < 1:
    raise ValueError(f'e2e needs >= 2 trainer windows: steps={steps} with log_every={log_every} '
                     'gives fewer; raise steps or lower log_every.')
  # The bare step is timed before and after the trainer: a slow spell of the machine
  # (seconds long on a shared VM) then weighs on both sides alike.
  bare_before, record = _bare_step_rates(config_kwargs, log_every, windows)
  with tempfile.TemporaryDirectory() as workdir, _quiet():
    train.train_and_evaluate(config, workdir)
    rates = _trainer_rates(workdir)
  if len(rates) < 2:
    raise RuntimeError(f'The trainer logged {len(rates)} throughput window(s); need >= 2: '
                       'raise steps or lower log_every.')
  bare_after, _ = _bare_step_rates(config_kwargs, log_every, windows)
  trainer = statistics.median(rates[1:])
  bare = statistics.median(bare_before + bare_after)
  ratio = trainer / bare
  return {
      'benchmark': 'e2e', **model_bench.config_fields(config),
      'devices': record['devices'], 'device_kind': record['device_kind'], 'steps': steps,
      'trainer_img_per_sec_per_device': round(trainer, 2),
      'trainer_windows': [round(r, 2) for r in rates],
      'bare_step_img_per_sec_per_device': round(bare, 2),
      'bare_step_windows_before': [round(r, 2) for r in bare_before],
      'bare_step_windows_after': [round(r, 2) for r in bare_after],
      'trainer_over_bare': round(ratio, 3), 'target': TARGET, 'meets_target': ratio >= TARGET,
  }
