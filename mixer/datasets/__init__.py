"""Data sources for the input pipeline, chosen by `config.dataset`.

  'digits'               scikit-learn's 8x8 digits, embedded (no download).
  '<tfds name>'          any prepared TFDS dataset in config.data_dir.
  'imagenet21k'          our TFDS builder over the official ImageNet-21k archive.
  'imagefolder:<root>'   <root>/<split>/<class>/<image>.
  'tfrecord:<glob>'      sharded TFRecords of tf.train.Example; '{split}' in the glob.

Each source yields encoded examples (see `mixer.datasets.core`); how to prepare
each one is in docs/input_pipeline.md.
"""

from __future__ import annotations

from mixer.datasets import core
from mixer.datasets.core import DataSource

__all__ = ['DataSource', 'core', 'get_source']


def get_source(dataset: str, *, data_dir: str | None = None,
               num_classes: int | None = None) -> DataSource:
  """The data source named by `dataset` (a config.dataset value).

  Args:
    dataset: one of the forms listed in the module docstring.
    data_dir: TFDS data dir (TFDS and imagenet21k sources).
    num_classes: used by sources that do not store it ('tfrecord:').

  Returns:
    The DataSource.
  """
  # Sources are imported on use: each pulls in only what it needs.
  if dataset == 'digits':
    from mixer.datasets import digits
    return digits.DigitsSource()
  if dataset.startswith('imagefolder:'):
    from mixer.datasets import imagefolder
    return imagefolder.ImageFolderSource(dataset[len('imagefolder:'):])
  if dataset.startswith('tfrecord:'):
    from mixer.datasets import tfrecord
    return tfrecord.TFRecordSource(dataset[len('tfrecord:'):], num_classes=num_classes)
  from mixer.datasets import tfds_source
  if dataset == 'imagenet21k':
    from mixer.datasets import imagenet21k
    return tfds_source.TfdsSource(
        dataset, data_dir, builder=imagenet21k.Imagenet21k(data_dir=data_dir))
  if ':' in dataset:
    raise ValueError(f"Unknown dataset prefix in {dataset!r}: use 'imagefolder:<root>' or "
                     "'tfrecord:<glob>'.")
  return tfds_source.TfdsSource(dataset, data_dir)
