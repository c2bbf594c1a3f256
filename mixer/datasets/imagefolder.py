"""'imagefolder:<root>': users' own images in `<root>/<split>/<class>/<image>`.

Layout (each split a folder, each class a folder inside every split):

  <root>/train/cat/0001.jpg
  <root>/train/dog/a.png
  <root>/test/cat/x.jpeg
  ...

Classes are the sorted union of the class-folder names over all split folders,
so 'train' and 'test' always agree on the label ids even if a split lacks a
class (that is logged). Examples are ordered by (class, file name). Files with
an image extension (.jpg .jpeg .png .gif .bmp, any case) are read; other files
and hidden files are skipped with a log line. A file at the wrong level (an
image directly in `<root>/<split>/`, a folder inside a class folder) is an
error, and so is a class folder with no image in any split. An image that does
not decode is replaced by a blank, unlabelled example by the pipeline, with a
warning naming it (mixer.input_pipeline). TFDS-style slices work: 'train[:90%]'.
"""

from __future__ import annotations

import os

from absl import logging
import tensorflow as tf

from mixer.datasets import core

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp')
_LAYOUT = '<root>/<split>/<class>/<image>'


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _list_folder(folder: str) -> tuple[list[str], list[str]]:
  """(files, folders) of `folder`, sorted, hidden entries (.DS_Store, ...) left out.

  Cloud listings (gs://) already end folder names with '/'; elsewhere only the
  entries without an image extension are checked: a class folder on GCS can hold
  thousands of images, and a stat call per image would take hours for ImageNet.
  """
  files, folders = [], []
  for entry in sorted(tf.io.gfile.listdir(folder)):
    name = entry.rstrip('/')
    if name.startswith('.'):
      continue
    is_folder = entry.endswith('/') or (
        not _is_image(name) and tf.io.gfile.isdir(os.path.join(folder, name)))
    (folders if is_folder else files).append(name)
  return files, folders


class ImageFolderSource(core.DataSource):
  """Images in class folders inside split folders."""

  def __init__(self, root: str):
    self.name = f'imagefolder:{root}'
    self._root = root
    self._files_cache = {}
    self._class_listings = {}  # Class folder -> (files, folders): each is listed once.
    if not root or not tf.io.gfile.isdir(root):
      raise FileNotFoundError(
          f'imagefolder root {root!r} is not a directory. Expected the layout {_LAYOUT}; '
          "set config.dataset='imagefolder:/path/to/root'.")
    entries = sorted(e.rstrip('/') for e in tf.io.gfile.listdir(root))
    self._splits = [e for e in entries
                    if not e.startswith('.') and tf.io.gfile.isdir(os.path.join(root, e))]
    stray = [e for e in entries if not e.startswith('.') and e not in self._splits]
    if stray:
      raise ValueError(
          f'imagefolder root {root!r} contains files {stray[:5]}; expected only split '
          f'folders (layout {_LAYOUT}). Move the images into <root>/<split>/<class>/.')
    if not self._splits:
      raise ValueError(f'imagefolder root {root!r} has no split folders; expected the '
                       f'layout {_LAYOUT}, e.g. {root}/train/<class>/img.jpg.')
    per_split = {split: self._class_folders(split) for split in self._splits}
    self._split_classes = {split: set(classes) for split, classes in per_split.items()}
    self._classes = sorted(set().union(*per_split.values()))
    # A class folder without images in any split would add a class no example has
    # (a silently wider head, a softmax over a class that never occurs).
    empty = [c for c in self._classes if not any(
        self._holds_images(os.path.join(root, split, c))
        for split, classes in per_split.items() if c in classes)]
    if empty:
      raise ValueError(
          f'imagefolder {root!r}: the class folder(s) {empty[:10]} hold no images in any split '
          f'(extensions read: {", ".join(IMAGE_EXTENSIONS)}). Add images or remove the empty '
          'folders: each would add a class that no example has.')
    for split, classes in per_split.items():
      missing = sorted(set(self._classes) - set(classes))
      if missing:
        logging.warning('imagefolder %s: split %r has no folder for classes %s; they '
                        'keep their label ids from the other splits.', root, split,
                        missing[:10])

  def _class_listing(self, class_dir: str) -> tuple[list[str], list[str]]:
    if class_dir not in self._class_listings:
      self._class_listings[class_dir] = _list_folder(class_dir)
    return self._class_listings[class_dir]

  def _holds_images(self, class_dir: str) -> bool:
    """Whether a class folder has an image (or a subfolder, which listing reports as an error)."""
    files, folders = self._class_listing(class_dir)
    return bool(folders) or any(_is_image(f) for f in files)

  def _class_folders(self, split: str) -> list[str]:
    split_dir = os.path.join(self._root, split)
    files, entries = _list_folder(split_dir)
    if files:
      raise ValueError(
          f'imagefolder split folder {split_dir!r} contains files {files[:5]}, but it must '
          f'contain only class folders (layout {_LAYOUT}). Move each image into '
          f'{split_dir}/<class>/.')
    if not entries:
      raise ValueError(f'imagefolder split folder {split_dir!r} has no class folders '
                       f'(layout {_LAYOUT}).')
    return entries

  @property
  def classes(self) -> list[str]:
    """Class names; the label id of a class is its index here."""
    return list(self._classes)

  @property
  def num_classes(self) -> int:
    return len(self._classes)

  @property
  def class_names(self) -> list[str]:
    return self.classes

  def files(self, split_name: str) -> tuple[tuple[str, int], ...]:
    """(path, label) of every image of a split folder, ordered by (class, name)."""
    if split_name not in self._files_cache:
      self._files_cache[split_name] = self._list_files(split_name)
    return self._files_cache[split_name]

  def _list_files(self, split_name: str) -> tuple[tuple[str, int], ...]:
    if split_name not in self._splits:
      raise ValueError(f'imagefolder {self._root!r} has no split folder {split_name!r}; '
                       f'split folders: {self._splits}.')
    split_dir = os.path.join(self._root, split_name)
    examples = []
    for label, class_name in enumerate(self._classes):
      if class_name not in self._split_classes[split_name]:
        continue  # The split has no folder for this class (warned at construction).
      class_dir = os.path.join(split_dir, class_name)
      files, folders = self._class_listing(class_dir)
      if folders:
        raise ValueError(
            f'imagefolder class folder {class_dir!r} contains the folder {folders[0]!r}; '
            f'nested folders are not supported (layout {_LAYOUT}). Move its images '
            'up into the class folder or make it a class of its own.')
      for name in files:
        path = os.path.join(class_dir, name)
        if not _is_image(name):
          logging.warning('imagefolder: skipping %s (not an image file; extensions read: '
                          '%s).', path, ', '.join(IMAGE_EXTENSIONS))
          continue
        examples.append((path, label))
    return tuple(examples)

  def _examples(self, split, process_index, process_count):
    sizes = {name: len(self.files(name)) for name in self._splits}
    pieces = core.select_split(split, sizes)
    flat = [ex for name, start, end in pieces for ex in self.files(name)[start:end]]
    start, end = core.shard_bounds(len(flat), process_index, process_count)
    return flat[start:end]

  def num_examples(self, split, *, process_index=0, process_count=1) -> int:
    return len(self._examples(split, process_index, process_count))

  def read(self, split, *, process_index=0, process_count=1) -> tf.data.Dataset:
    examples = self._examples(split, process_index, process_count)
    paths = tf.constant([p for p, _ in examples], tf.string, shape=[len(examples)])
    labels = tf.constant([label for _, label in examples], tf.int64, shape=[len(examples)])
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    # Reading the bytes is cheap next to decoding; the bytes (not the path) are
    # what the shuffle buffer holds, like with the other sources.
    return ds.map(lambda path, label: {'image': tf.io.read_file(path),
                                       'label': core.ensure_rank1_labels(label),
                                       'source_id': path},
                  num_parallel_calls=tf.data.AUTOTUNE)
