"""Metrics and progress: TensorBoard + `metrics.jsonl` writers, throughput clock, curve plot.

Only process 0 writes files; the other processes log to the console only, so a
pod run produces one set of event files and one `metrics.jsonl`.

`<workdir>/metrics.jsonl` has one JSON object per write:
`{"step": int, "<name>": float, ...}` with, among others, `train/loss`,
`train/learning_rate`, `train/grad_norm`, `eval/loss`, `eval/accuracy` (a
fraction), `perf/img_per_sec_per_core` and `perf/core_hours`.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
import tensorflow as tf
from clu import metric_writers

from mixer import checkpoint

METRICS_FILE = 'metrics.jsonl'
CURVES_FILE = 'training_curves.png'


def prepare_workdir(workdir: str) -> str:
  """Creates the workdir; local paths become absolute, bucket paths stay as given."""
  if checkpoint.is_remote(workdir):
    tf.io.gfile.makedirs(workdir)
    return workdir
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  return workdir


class JsonlWriter(metric_writers.MetricWriter):
  """Writes `{"step": step, name: value, ...}` lines to a file (scalars only).

  A resumed run extends the file. Local files are appended to; bucket storage
  (e.g. gs://) has no append, so there the whole file is rewritten on each write
  (it is small: one line per logged step).
  """

  def __init__(self, path: str):
    self._path = path
    self._remote = checkpoint.is_remote(path)
    self._lines: list[str] = []
    if self._remote:
      if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path, 'r') as f:
          self._lines = f.read().splitlines(keepends=True)
      self._file = None
    else:
      self._file = open(path, 'a', encoding='utf-8')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {'step': int(step)}
    record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    line = json.dumps(record) + '\n'
    if self._remote:
      self._lines.append(line)
      with tf.io.gfile.GFile(self._path, 'w') as f:
        f.write(''.join(self._lines))
    else:
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
    if self._file:
      self._file.flush()

  def close(self):
    if self._file:
      self._file.close()


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard events + metrics.jsonl + log lines on process 0; log lines elsewhere."""
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(os.path.join(workdir, METRICS_FILE)),
  ])


class Throughput:
  """Images/s per core and accumulated core-hours, excluding compilation, evals and saves.

  `core_hours` is carried in checkpoints so a resumed run keeps counting.
  """

  def __init__(self, num_cores: int, core_hours: float = 0.0):
    self.num_cores = num_cores
    self.core_hours = core_hours
    self._start = None
    self._images = 0

  def start(self):
    self._start = time.perf_counter()
    self._images = 0

  def pause(self):
    """Closes the current measuring window (before an eval/save) and returns its rate."""
    if self._start is None:
      return None
    seconds = time.perf_counter() - self._start
    self.core_hours += seconds * self.num_cores / 3600.0
    rate = self._images / seconds / self.num_cores if seconds > 0 and self._images else None
    self._start = None
    return rate

  def add_images(self, n: int):
    self._images += n


def plot_curves(workdir: str) -> str | None:
  """Plots train loss and eval accuracy from metrics.jsonl into training_curves.png."""
  path = os.path.join(workdir, METRICS_FILE)
  if jax.process_index() != 0 or not tf.io.gfile.exists(path):
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top  (plotting only at the end)
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  series: dict[str, list[tuple[int, float]]] = {}
  with tf.io.gfile.GFile(path, 'r') as f:
    for line in f:
      record = json.loads(line)
      for key, value in record.items():
        if key != 'step' and math.isfinite(value):
          series.setdefault(key, []).append((record['step'], value))
  panels = [k for k in ('train/loss', 'eval/loss', 'eval/accuracy', 'train/learning_rate')
            if k in series]
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
  for ax, key in zip(axes[0], panels):
    steps, values = zip(*sorted(series[key]))
    ax.plot(steps, values, marker='.' if len(steps) < 30 else None)
    ax.set_title(key)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  fig.tight_layout()
  out = os.path.join(workdir, CURVES_FILE)
  image = io.BytesIO()
  fig.savefig(image, format='png', dpi=100)
  plt.close(fig)
  with tf.io.gfile.GFile(out, 'wb') as f:
    f.write(image.getvalue())
  return out
