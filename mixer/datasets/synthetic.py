"""'synthetic': constant images for benchmarks: no files, no decoding, no augmentation.

Training reads one fixed batch (uniform noise in [-1, 1] from a fixed seed,
labels i mod num_classes) over and over, straight from host memory
(`train_batches`), so a run on it measures the trainer and the step alone: the
gap to the bare step (`python -m mixer.benchmarks.run --benchmarks=e2e`) is the
loop's overhead. Evaluation reads `read()`, a tiny constant PNG per example,
through the normal pipeline (it must exist, its speed does not matter).

Splits: 'train' (50,000 examples) and 'test' (512); TFDS-style slices work.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from mixer.datasets import core

SPLIT_SIZES = {'train': 50_000, 'test': 512}


class SyntheticSource(core.DataSource):
  """Constant examples; the class count is the config's (None: split checks only)."""

  name = 'synthetic'

  def __init__(self, num_classes: int | None = None):
    self._num_classes = int(num_classes) if num_classes else None

  @property
  def num_classes(self) -> int | None:
    return self._num_classes

  def _classes(self) -> int:
    if not self._num_classes:
      raise ValueError("dataset 'synthetic' needs config.num_classes (e.g. 1000).")
    return self._num_classes

  def _range(self, split, process_index, process_count) -> tuple[int, int]:
    total = sum(end - start for _, start, end in core.select_split(split, SPLIT_SIZES))
    return core.shard_bounds(total, process_index, process_count)

  def num_examples(self, split, *, process_index=0, process_count=1) -> int:
    start, end = self._range(split, process_index, process_count)
    return end - start

  def read(self, split, *, process_index=0, process_count=1) -> tf.data.Dataset:
    start, end = self._range(split, process_index, process_count)
    num_classes = self._classes()
    png = tf.io.encode_png(tf.fill([8, 8, 3], tf.constant(128, tf.uint8)))
    return tf.data.Dataset.range(start, end).map(lambda i: {
        'image': png,
        'label': tf.reshape(i % num_classes, [1]),
        'source_id': tf.strings.join(['synthetic/', tf.strings.as_string(i)])})

  def train_batches(self, local_batch: int, image_size: int,
                    seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """The same host batch forever: {'image' [b, S, S, 3] float32, 'labels' [b, K]}."""
    num_classes = self._classes()
    rng = np.random.default_rng(seed)
    batch = {
        'image': rng.uniform(-1, 1, (local_batch, image_size, image_size, 3)).astype(np.float32),
        'labels': np.eye(num_classes, dtype=np.float32)[np.arange(local_batch) % num_classes],
    }
    return itertools.repeat(batch)
