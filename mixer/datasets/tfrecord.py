"""'tfrecord:<glob>': JFT-style sharded TFRecord files of tf.train.Example.

Schema (one tf.train.Example per image):

  image/encoded       bytes list, 1 value    JPEG/PNG/GIF/BMP file bytes
  image/class/label   int64 list, 0+ values  class ids in [0, config.num_classes);
                                             one id -> one-hot, several -> multi-hot,
                                             none -> an all-zero label row
  image/filename      bytes list, optional   where the image came from (messages)

`python -m mixer.datasets.write_tfrecords` writes this schema from an image
folder or a CSV. The file set of a split is `glob.format(split=<split name>)`,
e.g. 'tfrecord:/data/jft/{split}-*.tfrecord' reads '/data/jft/train-*.tfrecord'
for split 'train'; files are read in sorted name order. A glob without
'{split}' is used for every split (logged, since train and eval then read the
same files). The number of classes is not stored: config.num_classes sets it,
and a label id outside it is an error.

Per-process parts: with at least as many files as processes, process i reads
files i, i+P, i+2P, ... (sorted); otherwise every process reads all files and
keeps records i, i+P, ... . Example counts come from one scan of the record
framing (no decoding), done once per file and process.
"""

from __future__ import annotations

import functools
import os

from absl import logging
import tensorflow as tf

from mixer.datasets import core

IMAGE_KEY = 'image/encoded'
LABEL_KEY = 'image/class/label'
FILENAME_KEY = 'image/filename'

_FEATURES = {
    IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
    LABEL_KEY: tf.io.VarLenFeature(tf.int64),
    FILENAME_KEY: tf.io.FixedLenFeature([], tf.string, default_value=''),
}


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  """One serialized tf.train.Example of the schema above -> a source example."""
  parsed = tf.io.parse_single_example(serialized, _FEATURES)
  return {'image': parsed[IMAGE_KEY],
          'label': tf.sparse.to_dense(parsed[LABEL_KEY]),
          'source_id': parsed[FILENAME_KEY]}


@functools.lru_cache(maxsize=None)
def _count_records(path: str) -> int:
  ds = tf.data.TFRecordDataset(path)
  return int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))


class TFRecordSource(core.DataSource):
  """Sharded TFRecord files found by a glob with an optional '{split}'."""

  def __init__(self, pattern: str, num_classes: int | None = None):
    if not pattern:
      raise ValueError("tfrecord source needs a glob: config.dataset='tfrecord:"
                       "/data/mine/{split}-*.tfrecord'.")
    self.name = f'tfrecord:{pattern}'
    self._pattern = pattern
    self._num_classes = num_classes
    self._files_cache = {}
    if '{split}' not in pattern:
      logging.warning('tfrecord glob %r has no {split} placeholder: every split reads '
                      'the same files.', pattern)

  @property
  def num_classes(self) -> int | None:
    return self._num_classes

  def files(self, split: str) -> tuple[str, ...]:
    """Sorted files of `split`."""
    if split not in self._files_cache:
      self._files_cache[split] = self._glob(split)
    return self._files_cache[split]

  def _glob(self, split: str) -> tuple[str, ...]:
    if '[' in split or '+' in split:
      raise ValueError(f'tfrecord sources take plain split names, not {split!r}; write '
                       'the subset as its own files (write_tfrecords --output=.../<name>).')
    pattern = self._pattern.replace('{split}', split)
    files = tuple(sorted(tf.io.gfile.glob(pattern)))
    if not files:
      raise FileNotFoundError(
          f'No TFRecord files match {pattern!r} (split {split!r}). Check the glob in '
          "config.dataset='tfrecord:<glob with {split}>' or write the files with "
          '`python -m mixer.datasets.write_tfrecords --input=... --output=... '
          '--num_shards=N`.')
    return files

  def check_split(self, split: str) -> None:
    self.files(split)  # Counting would read every record; the files are enough.

  def _by_file(self, split, process_count) -> bool:
    return len(self.files(split)) >= process_count

  def num_examples(self, split, *, process_index=0, process_count=1) -> int:
    core.shard_bounds(0, process_index, process_count)  # Validates the index.
    files = self.files(split)
    if self._by_file(split, process_count):
      return sum(_count_records(f) for f in files[process_index::process_count])
    total = sum(_count_records(f) for f in files)
    return len(range(process_index, total, process_count))

  def read(self, split, *, process_index=0, process_count=1) -> tf.data.Dataset:
    core.shard_bounds(0, process_index, process_count)  # Validates the index.
    files = self.files(split)
    if self._by_file(split, process_count):
      ds = tf.data.TFRecordDataset(list(files[process_index::process_count]))
    else:
      ds = tf.data.TFRecordDataset(list(files)).shard(process_count, process_index)
    return ds.map(parse_example, num_parallel_calls=tf.data.AUTOTUNE)


def shard_path(prefix: str, index: int, num_shards: int) -> str:
  """The writer's file name of shard `index`: '<prefix>-00003-of-00016.tfrecord'."""
  return f'{prefix}-{index:05d}-of-{num_shards:05d}.tfrecord'


def make_example(encoded: bytes, labels, filename: str = '') -> tf.train.Example:
  """A tf.train.Example of the schema above."""
  feature = {
      IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
      LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=list(labels))),
      FILENAME_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[os.fsencode(filename)])),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature))
