r"""Deployment formats side by side: file size, batch-1 latency, batch-32 throughput.

  python -m mixer.benchmarks.deploy_bench [--model=Mixer-B_16] [--image_size=224]

Random weights (the speed of a matmul does not depend on its values; the
head is random too, not the init's zeros, so the top-1 agreement column means
something), exported with mixer.export to each format and run through
mixer.serving on this machine's CPU: JAX (jit), the SavedModel (TF), TFLite
float32 / fp16 / int8 (ai-edge-litert, XNNPACK) and onnxruntime. Each runtime
uses all cores. Batch-1 latency is the median of `repeats` calls after one
warm-up call; batch-32 throughput is 32 x calls / seconds over
`repeats // 4 + 1` calls after a warm-up. The table in
docs/deploy.md comes from this command.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from mixer import export, models, serving
from mixer import weights as weights_lib

# (label, format, quantize): the rows of the table, in order.
ROWS = (('JAX (CPU, jit)', None, None),
        ('SavedModel (TF)', 'saved_model', None),
        ('TFLite float32', 'tflite', None),
        ('TFLite fp16', 'tflite', 'fp16'),
        ('TFLite int8 (dynamic range)', 'tflite', 'int8'),
        ('ONNX (onnxruntime)', 'onnx', None))
_SUFFIX = {'saved_model': '', 'tflite': '.tflite', 'onnx': '.onnx'}


def _random_weights(model_name: str, image_size: int, path: str, **overrides) -> None:
  """The model's own initialisation, plus a random head (the init's head is zero)."""
  model = models.get_model(model_name, **{'num_classes': 1000, **overrides})
  images = np.zeros((1, image_size, image_size, 3), np.float32)
  params = models.unbox(jax.jit(lambda x: model.init(jax.random.key(0), x))(images)['params'])
  params = jax.device_get(params)
  params['head']['kernel'] = np.random.default_rng(0).normal(
      0, 0.02, params['head']['kernel'].shape).astype(np.float32)
  weights_lib.save_npz(params, path)


def _time(run, images, calls: int) -> list[float]:
  run(images)  # Warm-up: compilation, allocation, resizing of the input tensor.
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    run(images)
    times.append(time.perf_counter() - start)
  return times


def run(model_name: str = 'Mixer-B_16', image_size: int = 224, repeats: int = 10,
        big_batch: int = 32, **model_overrides) -> list[dict]:
  """One record per format (ROWS): file size, batch-1 latency, batch-`big_batch` throughput.

  `model_overrides` (e.g. hidden_dim=32) shrink the model, for tests.
  """
  rng = np.random.default_rng(1)
  one = rng.uniform(-1, 1, (1, image_size, image_size, 3)).astype(np.float32)
  many = rng.uniform(-1, 1, (big_batch, image_size, image_size, 3)).astype(np.float32)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    weights_path = os.path.join(tmp, 'weights.npz')
    _random_weights(model_name, image_size, weights_path, **model_overrides)
    reference = None
    for label, fmt, quantize in ROWS:
      if fmt is None:
        backend, path, export_s = 'jax', weights_path, 0.0
      else:
        backend = fmt
        path = os.path.join(tmp, f'model_{quantize or "float"}{_SUFFIX[fmt]}')
        start = time.perf_counter()
        export.export(weights_path, fmt, path, quantize=quantize)
        export_s = time.perf_counter() - start
      runner = serving.make_runner(backend, path)
      latency = statistics.median(_time(runner, one, repeats))
      throughput = big_batch * (repeats // 4 + 1) / sum(_time(runner, many, repeats // 4 + 1))
      logits = runner(many)
      if reference is None:
        reference = logits
      rows.append({
          'benchmark': 'deploy', 'model': model_name, 'image_size': image_size,
          'cores': os.cpu_count(), 'format': label,
          'file_mib': round(export.size_bytes(path) / 2**20, 3),
          'batch1_latency_ms': round(1e3 * latency, 3),
          f'batch{big_batch}_img_per_s': round(throughput, 2),
          'top1_agreement_with_jax': float(np.mean(logits.argmax(-1) == reference.argmax(-1))),
          'export_s': round(export_s, 1),
      })
      del runner
  return rows


def markdown_table(rows: list[dict]) -> str:
  """The table of docs/deploy.md."""
  big = next(k for k in rows[0] if k.endswith('_img_per_s'))
  lines = ['| format | file (MiB) | batch-1 latency (ms) | '
           f'batch-{big[5:-10]} throughput (img/s) | top-1 = JAX |',
           '|---|---:|---:|---:|---:|']
  for row in rows:
    lines.append(f"| {row['format']} | {row['file_mib']:.1f} | {row['batch1_latency_ms']:.1f} | "
                 f"{row[big]:.2f} | {100 * row['top1_agreement_with_jax']:.0f}% |")
  return '\n'.join(lines)


def main(argv):
  del argv
  rows = run(flags.FLAGS.model, flags.FLAGS.image_size, flags.FLAGS.repeats)
  for row in rows:
    print(json.dumps(row))
  print(markdown_table(rows))


if __name__ == '__main__':
  flags.DEFINE_string('model', 'Mixer-B_16', 'Variant to export (random weights).')
  flags.DEFINE_integer('image_size', 224, 'Input size in pixels.')
  flags.DEFINE_integer('repeats', 10, 'Batch-1 calls to time (batch-32: repeats // 4 + 1).')
  app.run(main)
