"""'vtab:<task>': the VTAB-1k tasks whose label is not a TFDS 'label' feature.

CLEVR, KITTI, dSprites and smallNORB carry object lists or several factors;
VTAB defines one classification label on each. The definitions are those of
the benchmark's own code (google-research/task_adaptation, `data/clevr.py`,
`kitti.py`, `dsprites.py`, `smallnorb.py`), applied here to the TFDS examples
before the input pipeline sees them. Everything else (splits, per-process
shards, fixed order, SkipDecoding of the image) is `TfdsSource`'s.

Labels are clipped into [0, num_classes): real data never needs it (CLEVR has
3-10 objects, the bins cover every depth), but mock data in a rehearsal has
object lists of any length.
"""

from __future__ import annotations

import tensorflow as tf

from mixer import transfer_tasks
from mixer.datasets import core, tfds_source


def _bin(value, thresholds):
  """Index of the last threshold below `value` (task_adaptation's reduce_max(where(...)))."""
  return tf.reduce_sum(tf.cast(tf.constant(thresholds, tf.float32)[1:] < value, tf.int64))


def _clevr_count(x):
  return tf.size(x['objects']['size'], out_type=tf.int64) - 3


def _clevr_distance(x):
  depth = tf.reduce_min(x['objects']['pixel_coords'][:, 2])
  return _bin(depth, [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])


def _kitti_distance(x):
  objects = x['objects']
  vehicles = objects['type'] < 3  # Car, Van, Truck.
  depth = tf.boolean_mask(objects['location'][:, 2], vehicles)
  depth = tf.reduce_min(tf.concat([depth, [1000.0]], axis=0))  # No vehicle: the last bin.
  return _bin(depth, [-100.0, 8.0, 20.0, 999.0])


def _floordiv(key, factor):
  return lambda x: tf.cast(tf.math.floordiv(tf.cast(x[key], tf.float32), factor), tf.int64)


# task -> label function of a TFDS example.
LABELS = {
    'clevr_count': _clevr_count,
    'clevr_distance': _clevr_distance,
    'kitti_distance': _kitti_distance,
    'dsprites_location': _floordiv('label_x_position', 32 / 16),
    'dsprites_orientation': _floordiv('label_orientation', 40 / 16),
    'smallnorb_azimuth': lambda x: tf.cast(x['label_azimuth'], tf.int64),
    'smallnorb_elevation': lambda x: tf.cast(x['label_elevation'], tf.int64),
}


def _dsprites_image(image_bytes):
  """dSprites PNGs hold pixel values 0/1: scaled to 0/255 (task_adaptation's `* 255`)."""
  image = tf.io.decode_png(image_bytes, channels=1)
  return tf.io.encode_png(tf.minimum(image, 1) * 255)


class VtabSource(tfds_source.TfdsSource):
  """TFDS examples of `task.tfds` with VTAB's label for `task`."""

  def __init__(self, task_name: str, data_dir: str | None):
    if task_name not in LABELS:
      raise ValueError(f"Unknown VTAB label task {task_name!r} in 'vtab:{task_name}'; "
                       f'known: {sorted(LABELS)}.')
    self.task = transfer_tasks.get(task_name)
    # Named for the TFDS dataset: messages say what to prepare.
    super().__init__(self.task.tfds, data_dir)

  def _find_label_key(self, features) -> None:
    return None  # The label is derived from other features (LABELS).

  @property
  def num_classes(self) -> int:
    return self.task.num_classes

  @property
  def class_names(self) -> list[str]:
    return [str(i) for i in range(self.task.num_classes)]

  def _convert(self, example) -> dict[str, tf.Tensor]:
    label = tf.clip_by_value(LABELS[self.task.name](example), 0, self.task.num_classes - 1)
    image = example['image']
    if self.task.tfds.startswith('dsprites'):
      image = _dsprites_image(image)
    return {'image': image, 'label': core.ensure_rank1_labels(label),
            'source_id': example['tfds_id']}
