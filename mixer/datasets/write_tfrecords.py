r"""Writes images to sharded TFRecords for the 'tfrecord:<glob>' source.

Usage:

  # An image folder split (<root>/<split>/<class>/<image>):
  python -m mixer.datasets.write_tfrecords --input=/data/pets --split=train \
      --output=/data/pets_tfr/train --num_shards=16
  # A CSV of `path,labels` rows (labels: one id, or several ids separated by
  # spaces; paths relative to the CSV's folder; '#' lines and a
  # 'path,labels' header are skipped):
  python -m mixer.datasets.write_tfrecords --input=/data/jft/train.csv \
      --output=/data/jft_tfr/train --num_shards=1024

then train with config.dataset='tfrecord:/data/pets_tfr/{split}-*.tfrecord'.
Files are '<output>-00000-of-00016.tfrecord' etc. (schema in
mixer/datasets/tfrecord.py). Examples are shuffled with --seed before they are
dealt round-robin to the shards, because the reader reads files in a fixed order
and shuffles only within its buffer. Images that do not decode are skipped with
a warning. For an image folder, the class names in label-id order are written
to '<output>-classes.txt'.
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf

from mixer.datasets import imagefolder
from mixer.datasets import tfrecord

_INPUT = flags.DEFINE_string('input', None, 'Image folder root or CSV of path,labels.')
_SPLIT = flags.DEFINE_string('split', 'train', 'Split folder to write (image folder input).')
_OUTPUT = flags.DEFINE_string('output', None, 'Output path prefix, e.g. /data/out/train.')
_NUM_SHARDS = flags.DEFINE_integer('num_shards', 16, 'Number of files to write.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the example shuffle before sharding.')


def _read_csv(path: str) -> list[tuple[str, list[int]]]:
  base = os.path.dirname(path)
  examples = []
  with tf.io.gfile.GFile(path) as f:
    for line_number, row in enumerate(csv.reader(f), start=1):
      if not row or row[0].startswith('#') or [c.strip() for c in row] == ['path', 'labels']:
        continue
      if len(row) != 2:
        raise ValueError(f'{path}:{line_number}: expected `path,labels`, got {row}.')
      image_path, labels = row[0].strip(), row[1].split()
      try:
        ids = [int(label) for label in labels]
      except ValueError as e:
        raise ValueError(f'{path}:{line_number}: labels must be integer class ids '
                         f'separated by spaces, got {row[1]!r}.') from e
      examples.append((os.path.join(base, image_path), ids))
  return examples


def _decodes(data: bytes) -> bool:
  try:
    tf.io.decode_image(data, channels=3, expand_animations=False)
    return True
  except (tf.errors.InvalidArgumentError, ValueError):
    return False


def write_tfrecords(input_path: str, output: str, num_shards: int, *,
                    split: str = 'train', seed: int = 0) -> list[str]:
  """Writes the examples of `input_path` to `num_shards` files; returns their paths."""
  if num_shards < 1:
    raise ValueError(f'num_shards must be >= 1, got {num_shards}.')
  tf.io.gfile.makedirs(os.path.dirname(output) or '.')
  if tf.io.gfile.isdir(input_path):
    source = imagefolder.ImageFolderSource(input_path)
    examples = [(p, [label]) for p, label in source.files(split)]
    with tf.io.gfile.GFile(f'{output}-classes.txt', 'w') as f:
      f.write(''.join(f'{name}\n' for name in source.classes))
  elif tf.io.gfile.exists(input_path):
    examples = _read_csv(input_path)
  else:
    raise FileNotFoundError(f'--input={input_path!r} is neither an image folder nor a CSV '
                            'file.')
  if not examples:
    raise ValueError(f'No examples found in {input_path!r}.')
  random.Random(seed).shuffle(examples)
  paths = [tfrecord.shard_path(output, i, num_shards) for i in range(num_shards)]
  writers = [tf.io.TFRecordWriter(p) for p in paths]
  written = skipped = 0
  try:
    for image_path, labels in examples:
      with tf.io.gfile.GFile(image_path, 'rb') as f:
        data = f.read()
      if not _decodes(data):
        logging.warning('Skipping %s: the image does not decode.', image_path)
        skipped += 1
        continue
      example = tfrecord.make_example(data, labels, image_path)
      writers[written % num_shards].write(example.SerializeToString())
      written += 1
  finally:
    for writer in writers:
      writer.close()
  logging.info('Wrote %d examples (%d skipped) to %d files %s-*.', written, skipped,
               num_shards, output)
  return paths


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  write_tfrecords(_INPUT.value, _OUTPUT.value, _NUM_SHARDS.value, split=_SPLIT.value,
                  seed=_SEED.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['input', 'output'])
  app.run(main)
