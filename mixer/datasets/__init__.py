"""Data sources for the input pipeline, chosen by `config.dataset`.

  'digits'               scikit-learn's 8x8 digits, embedded (no download).
  '<tfds name>'          any prepared TFDS dataset in config.data_dir ('name:1.2.3' pins
                         a version, e.g. 'cars196:2.1.0').
  'imagenet21k'          our TFDS builder over the official ImageNet-21k archive.
  'imagefolder:<root>'   <root>/<split>/<class>/<image>.
  'tfrecord:<glob>'      sharded TFRecords of tf.train.Example; '{split}' in the glob.
  'vtab:<task>'          a VTAB-1k task whose label VTAB derives (clevr_count, ...).
  'synthetic'            constant images, no decoding (benchmarks; mixer.datasets.synthetic).

Each source yields encoded examples (see `mixer.datasets.core`); how to prepare
each one is in docs/input_pipeline.md.
"""

from __future__ import annotations

import re

from mixer.datasets import core
from mixer.datasets.core import DataSource

__all__ = ['DataSource', 'check_available', 'core', 'get_source']


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
  if dataset == 'synthetic':
    from mixer.datasets import synthetic
    return synthetic.SyntheticSource(num_classes)
  if dataset.startswith('imagefolder:'):
    from mixer.datasets import imagefolder
    return imagefolder.ImageFolderSource(dataset[len('imagefolder:'):])
  if dataset.startswith('tfrecord:'):
    from mixer.datasets import tfrecord
    return tfrecord.TFRecordSource(dataset[len('tfrecord:'):], num_classes=num_classes)
  if dataset.startswith('vtab:'):  # VTAB-1k tasks with a derived label (mixer.transfer_tasks).
    from mixer.datasets import vtab
    return vtab.VtabSource(dataset[len('vtab:'):], data_dir)
  from mixer.datasets import tfds_source
  if dataset == 'imagenet21k':
    from mixer.datasets import imagenet21k
    return tfds_source.TfdsSource(
        dataset, data_dir, builder=imagenet21k.Imagenet21k(data_dir=data_dir))
  # 'cars196:2.1.0' is TFDS's versioned name (the recipes' few-shot list uses it).
  if ':' in dataset and not re.fullmatch(r'[\w-]+:\d+\.\d+\.\d+', dataset):
    raise ValueError(f"Unknown dataset prefix in {dataset!r}: use 'imagefolder:<root>', "
                     "'tfrecord:<glob>', 'vtab:<task>' or a versioned TFDS name "
                     "('cars196:2.1.0').")
  return tfds_source.TfdsSource(dataset, data_dir)


def check_available(dataset: str, split: str, data_dir: str | None = None) -> None:
  """Checks that `split` of `dataset` can be read, before any model state is built.

  Cheap: dataset metadata and file listings only (no model, no image decoding, no
  scan of TFRecord files). The trainer calls it for the training split and every
  evaluator's splits, so a missing dataset is found in seconds, not after the state
  of a large model has been built.

  Raises:
    ValueError: naming the dataset, the split and the command that prepares it
      (`python -m mixer.datasets.prepare NAME ...` for TFDS datasets and
      imagenet21k), or what is wrong with the name or the split.
  """
  try:
    get_source(dataset, data_dir=data_dir).check_split(split)
  except (FileNotFoundError, ValueError) as error:
    raise ValueError(f'Dataset {dataset!r}, split {split!r}: {error}') from error
