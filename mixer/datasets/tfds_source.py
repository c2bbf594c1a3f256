"""TFDS datasets (imagenet2012, imagenet2012_real, cifar10, ...) as a DataSource.

Datasets are read from `data_dir` with download disabled: preparing them is a
separate, explicit step (see docs/input_pipeline.md), and an unprepared
dataset is an error that says how to prepare it. Each process reads
`tfds.even_splits(split, process_count)[process_index]`, files in a fixed
order (`shuffle_files=False`); images stay encoded (`SkipDecoding`).
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_datasets as tfds

from mixer.datasets import core

# Keys tried, in order, for the class label. imagenet2012_real keeps the
# original ImageNet label in 'original_label' and the ReaL labels in 'real_label'.
_LABEL_KEYS = ('label', 'original_label', 'labels')


# Datasets built from archives the user downloads by hand (image-net.org needs a login):
# what goes into the manual dir.
_MANUAL_FILES = {
    'imagenet2012': 'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar',
    'imagenet2012_real': 'ILSVRC2012_img_val.tar',
    'imagenet21k': 'fall11_whole.tar (or winter21_whole.tar.gz)',
}


def prepare_command(name: str, data_dir: str | None) -> str:
  """The command that prepares TFDS dataset `name` in `data_dir`.

  Not `tfds build`: that CLI imports apache_beam, which the pinned stack does not
  install. `mixer.datasets.prepare` runs the builder's download_and_prepare(), which
  needs no Beam for these image datasets.
  """
  where = data_dir or '~/tensorflow_datasets'
  command = f'python -m mixer.datasets.prepare {name} --data_dir={where}'
  if name in _MANUAL_FILES:
    command += ' --manual_dir=DIR'
  if name == 'imagenet21k':
    command += ' --synsets_file=released'
  return command


def prepare_hint(name: str, data_dir: str | None) -> str:
  """How to prepare dataset `name` once, as a sentence for error messages."""
  where = data_dir or '~/tensorflow_datasets'
  manual = ''
  if name in _MANUAL_FILES:
    manual = f' with {_MANUAL_FILES[name]} from https://image-net.org in DIR'
  return (f'Prepare it once: `{prepare_command(name, data_dir)}`{manual}, then set '
          f'config.data_dir={where!r}.')


class TfdsSource(core.DataSource):
  """A TFDS dataset; `builder` may be given directly (e.g. our imagenet21k)."""

  def __init__(self, name: str, data_dir: str | None,
               builder: tfds.core.DatasetBuilder | None = None):
    self.name = name
    self._data_dir = data_dir
    self._datasets = {}
    if builder is None:
      try:
        builder = tfds.builder(name, data_dir=data_dir)
      except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f'Unknown dataset {name!r}: it is neither a TFDS dataset nor one of '
            "'digits', 'imagenet21k', 'imagefolder:<root>', 'tfrecord:<glob>'. "
            'Fix config.dataset (TFDS names are lower_case, e.g. imagenet2012).') from e
    self._builder = builder
    features = builder.info.features
    if 'image' not in features:
      raise ValueError(f'TFDS dataset {name!r} has no "image" feature '
                       f'(features: {list(features)}); it cannot be used for image '
                       'classification.')
    self._label_key = self._find_label_key(features)
    self.has_real_labels = 'real_label' in features

  def _find_label_key(self, features) -> str | None:
    """The feature `read` takes the label from (a subclass may derive it instead: None)."""
    key = next((k for k in _LABEL_KEYS if k in features), None)
    if key is None:
      raise ValueError(f'TFDS dataset {self.name!r} has none of the label features '
                       f'{_LABEL_KEYS} (features: {list(features)}).')
    return key

  @property
  def num_classes(self) -> int | None:
    feature = self._builder.info.features[self._label_key]
    if isinstance(feature, tfds.features.Sequence):
      feature = feature.feature
    return getattr(feature, 'num_classes', None)

  @property
  def class_names(self) -> list[str] | None:
    feature = self._builder.info.features[self._label_key]
    if isinstance(feature, tfds.features.Sequence):
      feature = feature.feature
    return list(getattr(feature, 'names', None) or []) or None

  def _process_split(self, split, process_index, process_count):
    core.shard_bounds(0, process_index, process_count)  # Validates the index.
    if process_count == 1:
      return split
    return tfds.even_splits(split, process_count)[process_index]

  def _as_dataset(self, split, process_index, process_count) -> tf.data.Dataset:
    key = (split, process_index, process_count)
    if key not in self._datasets:
      self._datasets[key] = self._build_dataset(*key)
    return self._datasets[key]

  def _build_dataset(self, split, process_index, process_count) -> tf.data.Dataset:
    try:
      return self._builder.as_dataset(
          split=self._process_split(split, process_index, process_count),
          shuffle_files=False,  # A fixed order: determinism and resume need it.
          decoders={'image': tfds.decode.SkipDecoding()},
          read_config=tfds.ReadConfig(skip_prefetch=True, try_autocache=False,
                                      add_tfds_id=True))
    except AssertionError as e:  # TFDS's "could not find data in ..." error.
      raise FileNotFoundError(
          f'TFDS dataset {self.name!r} is not prepared in data_dir='
          f'{self._builder.data_dir!r}. {prepare_hint(self.name, self._data_dir)}'
      ) from e
    except (KeyError, ValueError) as e:
      splits = list(self._builder.info.splits) or 'unknown'
      raise ValueError(f'Cannot read split {split!r} of {self.name!r}: {e}. '
                       f'Available splits: {splits}.') from e

  def num_examples(self, split, *, process_index=0, process_count=1) -> int:
    ds = self._as_dataset(split, process_index, process_count)
    count = int(ds.cardinality())
    if count >= 0:
      return count
    # TFDS normally knows the size; count encoded records only as a fallback.
    return int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))

  def read(self, split, *, process_index=0, process_count=1) -> tf.data.Dataset:
    ds = self._as_dataset(split, process_index, process_count)
    return ds.map(self._convert, num_parallel_calls=tf.data.AUTOTUNE)

  def _convert(self, example) -> dict[str, tf.Tensor]:
    """A TFDS example as the pipeline's {'image' (encoded), 'label', 'source_id'}."""
    out = {'image': example['image'],
           'label': core.ensure_rank1_labels(example[self._label_key]),
           'source_id': example['tfds_id']}
    if self.has_real_labels:
      out['real_label'] = core.ensure_rank1_labels(example['real_label'])
    return out
