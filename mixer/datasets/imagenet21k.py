"""ImageNet-21k (fall11 release) as a TFDS dataset built from the manual download.

ImageNet-21k is not in the public TFDS catalogue, so this module defines the
builder. Preparation, once per data_dir:

  1. Download the full release from https://image-net.org (login required):
     `fall11_whole.tar` (about 1.3 TB; 21841 synsets, the set the paper's and
     Google's released i21k heads were trained on) or the later
     `winter21_whole.tar.gz` (19167 synsets: ~2.7k person synsets removed, so
     its label ids do NOT match the released heads).
  2. Put it (or a symlink to it) in the manual dir, e.g.
     `<data_dir>/downloads/manual/fall11_whole.tar`.
  3. `python -m mixer.datasets.prepare imagenet21k --data_dir=<data_dir>
     --manual_dir=<manual dir> --synsets_file=released` (the label order of
     the released heads; or a file of your own, or none: below).

Archive layout read: the outer tar holds one tar per synset (`n01440764.tar`)
of JPEGs; a tar of per-synset folders (`<x>/n01440764/*.JPEG`) is read too.

Labels: the label id of a synset is its index in the sorted list of the
synsets found in the archive; for the full fall11 release that is the class
order of Google's released 21843-class heads. With `synsets_file` (one synset a
line; anything after a tab on a line is ignored) the file's order is used
instead and every synset of the archive must be in it. `synsets_file='released'`
(`--synsets_file=released`) uses the released heads' order, which ships in this
package as the first column of `mixer/data/imagenet21k_labels.txt` (the file
`mixer.labels` reads the class names from): a head trained so lines up with
the released checkpoints whatever the archive.

Splits: there is no official split. An image goes to 'validation' when
`int(md5(file name)[:8], 16) % 1000 < 10` (about 1%, fixed forever, balanced
in expectation over classes), otherwise to 'train'.

Cleaning: every image is opened with PIL; one that does not decode is skipped
with a logged warning; non-JPEG or CMYK/other-mode images (ImageNet has a
few) are re-encoded as RGB JPEG (quality 95) so that TF's JPEG decoder reads
every record.

Cost: with the plain `.tar`, the listing pass only reads tar headers (seeks) and
each split's pass seeks past the images of the other split; a `.tar.gz` cannot
seek, so it is decompressed three times. `gunzip` it once first if disk allows.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import os
import tarfile
from collections.abc import Iterator

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

ARCHIVE_NAMES = ('fall11_whole.tar', 'winter21_whole.tar', 'winter21_whole.tar.gz',
                 'fall11_whole.tar.gz')
RELEASED_NUM_CLASSES = 21843
# synsets_file value for the released heads' class order (shipped in mixer/data/).
RELEASED_SYNSETS = 'released'
VALIDATION_PER_MILLE = 10
_IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png')


def is_validation(file_name: str) -> bool:
  """Whether an image (by its file name, e.g. 'n01440764_10026.JPEG') is held out."""
  digest = hashlib.md5(os.path.basename(file_name).encode()).hexdigest()
  return int(digest[:8], 16) % 1000 < VALIDATION_PER_MILLE


def _open_tar(fileobj_or_path, seekable: bool) -> tarfile.TarFile:
  # Random access ('r:') lets tarfile seek over member data; streams ('r|*')
  # must read through it but handle gzip.
  mode = 'r:' if seekable else 'r|*'
  if isinstance(fileobj_or_path, str):
    return tarfile.open(fileobj_or_path, mode)
  return tarfile.open(fileobj=fileobj_or_path, mode=mode)


def _synset_of(member: tarfile.TarInfo) -> str | None:
  """The synset an outer member belongs to, or None for other members."""
  if not member.isfile():
    return None
  name = member.name
  if name.endswith('.tar'):
    return os.path.basename(name)[:-len('.tar')]
  if name.lower().endswith(_IMAGE_EXTENSIONS):
    return os.path.basename(os.path.dirname(name)) or None
  return None


def read_synsets(synsets_file: str) -> list[str]:
  """Synsets in label order: one a line, text after a tab ignored; 'released' = the heads'."""
  if synsets_file == RELEASED_SYNSETS:
    resource = importlib.resources.files('mixer') / 'data' / 'imagenet21k_labels.txt'
    text = resource.read_text(encoding='utf-8')
  else:
    text = epath.Path(synsets_file).read_text()
  return [line.split('\t', 1)[0].strip() for line in text.splitlines() if line.strip()]


def list_synsets(archive: str) -> list[str]:
  """Sorted synsets present in the archive."""
  synsets = set()
  with _open_tar(archive, seekable=not archive.endswith('.gz')) as outer:
    for member in outer:
      synset = _synset_of(member)
      if synset:
        synsets.add(synset)
  return sorted(synsets)


def iter_images(archive: str, want=lambda file_name: True
                ) -> Iterator[tuple[str, str, bytes]]:
  """(synset, file name, bytes) of the archive's images whose name `want` accepts."""
  seekable = not archive.endswith('.gz')
  with _open_tar(archive, seekable) as outer:
    for member in outer:
      synset = _synset_of(member)
      if not synset:
        continue
      fileobj = outer.extractfile(member)
      if member.name.endswith('.tar'):
        with _open_tar(fileobj, seekable) as inner:
          for image in inner:
            name = os.path.basename(image.name)
            if image.isfile() and name.lower().endswith(_IMAGE_EXTENSIONS) and want(name):
              yield synset, name, inner.extractfile(image).read()
      else:
        name = os.path.basename(member.name)
        if want(name):
          yield synset, name, fileobj.read()


def clean_image(data: bytes, file_name: str) -> bytes | None:
  """JPEG bytes TF can decode as RGB, or None (logged) if the image is broken."""
  from PIL import Image  # Only preparation needs PIL.

  try:
    with Image.open(io.BytesIO(data)) as image:
      image_format, mode = image.format, image.mode
      image.draft('RGB', (1, 1))  # Decode at 1/8 scale: checks all data, fast.
      image.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    logging.warning('Skipping %s: the image does not decode (%s).', file_name, e)
    return None
  if image_format == 'JPEG' and mode in ('RGB', 'L'):
    return data
  with Image.open(io.BytesIO(data)) as image:
    out = io.BytesIO()
    image.convert('RGB').save(out, format='JPEG', quality=95)
  logging.info('Re-encoded %s (%s, %s) as an RGB JPEG.', file_name, image_format, mode)
  return out.getvalue()


class Imagenet21k(tfds.core.GeneratorBasedBuilder):
  """ImageNet-21k (fall11_whole) with a hash-based 1% validation split."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First version: sorted synsets, md5 1% validation.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download fall11_whole.tar (or winter21_whole.tar.gz) from https://image-net.org '
      'and place it in the manual dir (default <data_dir>/downloads/manual/). See '
      'mixer/datasets/imagenet21k.py.')

  # TFDS's default looks the module up through `importlib_resources`, which is
  # not installed on Python >= 3.9 stacks (ModuleNotFoundError); the file is
  # all it needs.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pylint: disable=no-self-argument
    return epath.Path(__file__)

  def __init__(self, *, synsets_file: str | None = None, **kwargs):
    self._synsets_file = synsets_file
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(encoding_format='jpeg'),
            # Names are read from the archive in _split_generators, stored
            # with the prepared data and restored from there when reading.
            'label': tfds.features.ClassLabel(),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://image-net.org/',
    )

  def _find_archive(self, manual_dir: epath.Path) -> str:
    for name in ARCHIVE_NAMES:
      if (manual_dir / name).exists():
        return os.fspath(manual_dir / name)
    raise FileNotFoundError(
        f'No ImageNet-21k archive in the manual dir {manual_dir}: expected one of '
        f'{ARCHIVE_NAMES}. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}')

  def _label_names(self, archive: str) -> list[str]:
    found = list_synsets(archive)
    if not found:
      raise ValueError(f'{archive} holds no per-synset tars (nXXXXXXXX.tar) or synset '
                       'folders of JPEGs; is it the ImageNet-21k release?')
    if self._synsets_file:
      names = read_synsets(self._synsets_file)
      unknown = sorted(set(found) - set(names))
      if unknown:
        raise ValueError(f'{len(unknown)} synsets of the archive, e.g. {unknown[:3]}, are '
                         f'not in synsets_file={self._synsets_file}.')
      return names
    if len(found) != RELEASED_NUM_CLASSES:
      logging.warning(
          'The archive has %d synsets, not the %d of the released i21k heads: label ids '
          'follow this archive. Pass synsets_file=<released list> to use the released '
          'order.', len(found), RELEASED_NUM_CLASSES)
    return found

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    archive = self._find_archive(epath.Path(dl_manager.manual_dir))
    self.info.features['label'].names = self._label_names(archive)
    return {
        'train': self._generate_examples(archive, validation=False),
        'validation': self._generate_examples(archive, validation=True),
    }

  def _generate_examples(self, archive: str, validation: bool):
    label_ids = {name: i for i, name in enumerate(self.info.features['label'].names)}
    want = lambda name: is_validation(name) == validation  # noqa: E731
    for synset, file_name, data in iter_images(archive, want):
      jpeg = clean_image(data, file_name)
      if jpeg is None:
        continue
      yield file_name, {'image': jpeg, 'label': label_ids[synset], 'file_name': file_name}
