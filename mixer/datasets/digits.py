"""'digits': scikit-learn's 1797 handwritten 8x8 digits, the no-download default.

The images ship inside scikit-learn (`sklearn.datasets.load_digits`, grey values
0..16), so a fresh checkout can train and evaluate without any data set-up.
They are scaled to 0..255 (round(v * 255 / 16)), repeated to RGB and encoded as
PNG inside tf.data, so they take exactly the decode/resize path of any other
source; the normal pipeline then upscales them to config.image_size.

Splits (fixed, independent of the seed): a stratified 80/20 split with
`train_test_split(test_size=0.2, stratify=labels, random_state=0)`:
'train' = 1437 examples, 'test' = 360 examples, each in the order that call
returns. TFDS-style slices work: 'train[:90%]', 'train[100:200]+test'.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from mixer.datasets import core

NUM_CLASSES = 10
SPLIT_SIZES = {'train': 1437, 'test': 360}


@functools.lru_cache(maxsize=1)
def _load() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{split: (uint8 images [N, 8, 8, 3], int64 labels [N])}."""
  from sklearn import datasets as sk_datasets  # Imported lazily: only this source needs it.
  from sklearn import model_selection

  digits = sk_datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  images = np.repeat(images[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int64)
  train_x, test_x, train_y, test_y = model_selection.train_test_split(
      images, labels, test_size=0.2, stratify=labels, random_state=0)
  return {'train': (train_x, train_y), 'test': (test_x, test_y)}


class DigitsSource(core.DataSource):
  """The embedded digits dataset."""

  name = 'digits'

  @property
  def num_classes(self) -> int:
    return NUM_CLASSES

  @property
  def class_names(self) -> list[str]:
    return [str(digit) for digit in range(NUM_CLASSES)]

  def _indices(self, split, process_index, process_count):
    """(split name, index array) pieces of this process's part of `split`."""
    pieces = core.select_split(split, SPLIT_SIZES)
    flat = [(name, i) for name, start, end in pieces for i in range(start, end)]
    start, end = core.shard_bounds(len(flat), process_index, process_count)
    return flat[start:end]

  def num_examples(self, split, *, process_index=0, process_count=1) -> int:
    return len(self._indices(split, process_index, process_count))

  def read(self, split, *, process_index=0, process_count=1) -> tf.data.Dataset:
    data = _load()
    chosen = self._indices(split, process_index, process_count)
    images = np.stack([data[name][0][i] for name, i in chosen]) if chosen else (
        np.zeros([0, 8, 8, 3], np.uint8))
    labels = np.array([data[name][1][i] for name, i in chosen], np.int64)
    ids = np.array([f'digits/{name}/{i}' for name, i in chosen], dtype=object)
    ds = tf.data.Dataset.from_tensor_slices(
        {'pixels': images, 'label': labels, 'source_id': ids.astype(bytes)})
    return ds.map(lambda ex: {'image': tf.io.encode_png(ex['pixels']),
                              'label': core.ensure_rank1_labels(ex['label']),
                              'source_id': ex['source_id']})
