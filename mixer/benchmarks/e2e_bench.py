"""The trainer end to end on the 'synthetic' source, against the bare train step.

Runs `train.train_and_evaluate` (the real loop: host batch -> devices, the
compiled step, metrics, progress, checkpoint and evaluation pauses) on
`dataset='synthetic'` (one constant host batch: no decoding, no augmentation),
and reads the trainer's own throughput (`perf/img_per_sec_per_core` in
metrics.jsonl, measured between log steps, evaluations and saves excluded).
The first window (the first steps after compilation) is dropped. The bare
step is `model_bench`'s train step (batch already on the devices, nothing
else) for the same config, timed in the same process right after.

`trainer_over_bare` is the loop's efficiency: what fraction of the step's
speed a training run keeps (target >= 0.95).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from typing import Any

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


def run(steps: int = 12, log_every: int = 3, **config_kwargs) -> dict[str, Any]:
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
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    rates = _trainer_rates(workdir)
  if len(rates) < 2:
    raise RuntimeError(f'The trainer logged {len(rates)} throughput window(s); need >= 2: '
                       'raise steps or lower log_every.')
  trainer = statistics.median(rates[1:])
  bare = model_bench.run(model_bench.bench_config(**config_kwargs), modes=('train',),
                         peak={'flops': float('nan'), 'source': 'not measured',
                                     'flops_per_cpu_second': None})[0]
  ratio = trainer / bare['img_per_sec_per_device']
  return {
      'benchmark': 'e2e', **model_bench.config_fields(config),
      'devices': bare['devices'], 'device_kind': bare['device_kind'], 'steps': steps,
      'trainer_img_per_sec_per_device': round(trainer, 2),
      'trainer_windows': [round(r, 2) for r in rates],
      'bare_step_img_per_sec_per_device': bare['img_per_sec_per_device'],
      'trainer_over_bare': round(ratio, 3), 'target': TARGET, 'meets_target': ratio >= TARGET,
  }
