r"""Prepares a TFDS dataset (ours or the catalogue's) in a data dir, once.

  python -m mixer.datasets.prepare imagenet21k --data_dir=/data/tfds \
      --manual_dir=/data/manual --synsets_file=released   # fall11_whole.tar there
  python -m mixer.datasets.prepare imagenet2012 --data_dir=/data/tfds \
      --manual_dir=/data/manual   # ILSVRC2012_img_{train,val}.tar there
  python -m mixer.datasets.prepare cifar10 --data_dir=/data/tfds   # downloads

It runs the builder's `download_and_prepare()`, in the pinned environment: TFDS's
own `tfds build` CLI imports apache_beam, which this project does not install.
Training later reads the prepared data with download disabled
(config.data_dir=/data/tfds). See docs/input_pipeline.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging
import tensorflow_datasets as tfds

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir to write into.')
_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', None, 'Folder holding manually downloaded archives '
    '(default: <data_dir>/downloads/manual).')
_SYNSETS_FILE = flags.DEFINE_string(
    'synsets_file', None, "imagenet21k only: label order, one synset a line, or 'released' "
    "for the order of Google's released heads (shipped in mixer/data/).")


def prepare(name: str, data_dir: str, manual_dir: str | None = None,
            synsets_file: str | None = None) -> tfds.core.DatasetBuilder:
  """Builds dataset `name` into `data_dir`; returns the builder."""
  if name == 'imagenet21k':
    from mixer.datasets import imagenet21k
    builder = imagenet21k.Imagenet21k(data_dir=data_dir, synsets_file=synsets_file)
  else:
    if synsets_file:
      raise ValueError('--synsets_file is only for imagenet21k.')
    builder = tfds.builder(name, data_dir=data_dir)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  builder.download_and_prepare(download_config=config)
  logging.info('Prepared %s in %s: %s', name, builder.data_dir, builder.info.splits)
  return builder


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError('Usage: python -m mixer.datasets.prepare <dataset name> '
                         '--data_dir=... [--manual_dir=...]')
  prepare(argv[1], _DATA_DIR.value, _MANUAL_DIR.value, _SYNSETS_FILE.value)


if __name__ == '__main__':
  flags.mark_flag_as_required('data_dir')
  app.run(main)
