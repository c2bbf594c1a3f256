"""Fake datasets with the real specs, written to disk for `python -m mixer.rehearse`.

Every dataset a config names (training set, every classification evaluator's,
every few-shot set) is written into one data dir in the form the real run
reads, so the trainer, the sources and the evaluators run their real code paths
(`check_available`, `tfds.builder(...).as_dataset`, TFRecord parsing):

  TFDS catalogue datasets  the catalogue's own builder (its features, so its class
                           count and label layout: 1000 classes and the
                           `real_label` sequence of imagenet2012_real, 196 for
                           'cars196:2.1.0', ...) prepared by its own
                           `download_and_prepare`, with `_split_generators`
                           replaced by fake examples of those features;
  'imagenet21k'            this project's builder, prepared by
                           `mixer.datasets.prepare` from a generated
                           `fall11_whole.tar` (one tar per synset, as the release)
                           with `synsets_file='released'`: 21843 classes;
  'tfrecord:<dir>/<pat>'   JFT-style multi-label shards written by
                           `mixer.datasets.write_tfrecords` from a CSV, in a local
                           folder (the config's glob is pointed there).

Why on disk rather than `tfds.testing.mock_data`: the mock replaces every
builder's data_dir and reading (our imagenet21k builder included), so the
imagenet21k path would never run; prepared files also survive a resume.

Each split holds tens of small images (200 where a spec takes a percent slice,
so minival's 'train[99%:]' is not empty). TFDS refuses an index slice past the
end of a split, so specs with example indices ('train[:65000]', uc_merced's
'train[1000:]') are mapped onto the fake split by `plan`, and the report says so. Half of
each split is class 0, the rest two classes at the middle and the end of the
label range (`fake_label`): every few-shot count has its examples, and the
largest label id runs through the head. Images are noise around a colour of
their class, so the tiny model can learn something.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from mixer import evaluators
from mixer.datasets import imagenet21k, prepare, write_tfrecords

EXAMPLES_PER_SPLIT = 24
# Enough that a percent slice of 1% (minival 'train[99%:]') holds 2 examples.
PERCENT_SLICE_EXAMPLES = 200
IMAGENET21K_SYNSETS = 4  # Synsets in the generated archive (labels keep all 21843).
_IMAGE_SIZE = (40, 48)   # Height, width of generated images with a free shape.
_SPLIT = re.compile(r'^\s*(\w+)\s*(?:\[([^\]]*)\])?\s*$')


def _parse(split_spec: str) -> list[tuple[str, str, str]]:
  """'train[:99%]+validation' -> [('train', '', '99%'), ('validation', None, None)]."""
  parts = []
  for part in split_spec.split('+'):
    match = _SPLIT.match(part)
    if not match:
      raise ValueError(f'Cannot parse split {split_spec!r} (expected e.g. "train[:99%]").')
    name, slicing = match.groups()
    if slicing is None:
      parts.append((name, None, None))
    else:
      start, _, end = slicing.partition(':')
      parts.append((name, start.strip(), end.strip()))
  return parts


def _is_index(bound: str | None) -> bool:
  return bool(bound) and bound.lstrip('-').isdigit()


@dataclasses.dataclass
class Plan:
  """What to write for a config, and how its split specs read the fake splits.

  sizes:  dataset -> base split -> examples to write.
  splits: (dataset, split spec) -> the spec to read instead, for specs with
          example indices ('train[:65000]' of imagenet2012 -> 'train[:60]';
          uc_merced's 'train[:1000]' / 'train[1000:]' -> 'train[:60]' /
          'train[60:]': still a partition). Percent slices ('train[:99%]') and
          plain names are read as written.
  """
  sizes: dict[str, dict[str, int]]
  splits: dict[tuple[str, str], str]


def plan(wanted: Iterable[tuple[str, str, int]]) -> Plan:
  """The Plan for (dataset, split spec, examples the spec must yield) triples.

  A split holds what its specs need (PERCENT_SLICE_EXAMPLES if one takes a
  percent slice, so 1% is 2 examples). The example indices its specs name are
  mapped in order onto the fake split, each gap between two of them shrunk to at
  most W, the largest need of the split's specs, and W more examples after the
  last: 'train[:1000]' / 'train[1000:]' stay a partition, and a narrow window far
  into a split (VTAB's val200, 'train[63000:63200]') stays a non-empty window
  after the others. A negative index ('train[-1000:]') counts back at most W.
  """
  need: dict[tuple[str, str], int] = {}
  for dataset, spec, count in wanted:
    need[(dataset, spec)] = max(need.get((dataset, spec), 0), count)
  sizes: dict[str, dict[str, int]] = {}
  width: dict[tuple[str, str], int] = {}
  bounds: dict[tuple[str, str], set[int]] = {}
  percent: set[tuple[str, str]] = set()
  for (dataset, spec), count in need.items():
    for name, start, end in _parse(spec):
      key = (dataset, name)
      width[key] = max(width.get(key, 0), count)
      bounds.setdefault(key, set()).update(
          int(b) for b in (start, end) if _is_index(b) and not b.startswith('-'))
      if any(b and b.endswith('%') for b in (start, end)):
        percent.add(key)
  positions: dict[tuple[str, str], dict[int, int]] = {}
  for (dataset, name), w in width.items():
    mapping, previous, position = {0: 0}, 0, 0
    for bound in sorted(bounds[(dataset, name)] - {0}):
      position += min(bound - previous, w)
      mapping[bound], previous = position, bound
    positions[(dataset, name)] = mapping
    sizes.setdefault(dataset, {})[name] = max(
        position + w, PERCENT_SLICE_EXAMPLES if (dataset, name) in percent else 0)

  def moved(dataset, name, bound):
    if not _is_index(bound):
      return bound
    if bound.startswith('-'):
      return str(-min(-int(bound), width[(dataset, name)]))
    return str(positions[(dataset, name)][int(bound)])

  renamed = {}
  for dataset, spec in need:
    parts = [name if start is None else
             f'{name}[{moved(dataset, name, start)}:{moved(dataset, name, end)}]'
             for name, start, end in _parse(spec)]
    if '+'.join(parts) != spec:
      renamed[(dataset, spec)] = '+'.join(parts)
  return Plan(sizes, renamed)


def dataset_splits(config) -> list[tuple[str, str, int]]:
  """Every (dataset, split spec, examples needed) the config reads.

  The training set and every split its evaluators read
  (`evaluators.examples_per_class`). Half of the fake examples are of class 0
  (`fake_label`), so a split needing n examples of a class gets 2n plus a
  margin for slices of shuffled files: no few-shot count is skipped.
  """
  wanted = [(config.dataset, config.train_split, EXAMPLES_PER_SPLIT)]
  for (dataset, split), per_class in evaluators.examples_per_class(config).items():
    wanted.append((dataset, split, max(2 * per_class + 10 if per_class else 0,
                                       EXAMPLES_PER_SPLIT)))
  return wanted


def fake_label(index: int, num_classes: int) -> int:
  """The class of example `index`: half are class 0, the rest alternate C//2 and C-1.

  Three classes spread over the label range: the largest id (21842 of 21843)
  runs through one-hot and the head, and class 0 has enough examples for every
  few-shot count.
  """
  if index % 2 == 0:
    return 0
  return num_classes // 2 if index % 4 == 1 else num_classes - 1


def _image(rng: np.random.Generator, label: int, shape) -> np.ndarray:
  height, width, channels = (s if s is not None else d
                             for s, d in zip(shape, (*_IMAGE_SIZE, 3)))
  colour = np.random.default_rng(label).integers(40, 216, channels)
  noise = rng.normal(0, 25, (height, width, channels))
  return np.clip(colour + noise, 0, 255).astype(np.uint8)


def fake_example(features: tfds.features.FeaturesDict, rng: np.random.Generator,
                 index: int) -> dict:
  """Example `index` of `features`: class `fake_label(index)`, images coloured by it."""
  labels = [f for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
  # The class label the sources read first ('label', then ImageNet ReaL's 'original_label').
  primary = next((features[k] for k in ('label', 'original_label') if k in features),
                 labels[0] if labels else None)
  label = fake_label(index, primary.num_classes) if primary else 0

  def value(feature):
    if isinstance(feature, tfds.features.Image):
      return _image(rng, label, feature.shape)
    if isinstance(feature, tfds.features.ClassLabel):  # Secondary labels: any class.
      return label if feature is primary else int(rng.integers(feature.num_classes))
    if isinstance(feature, tfds.features.BBoxFeature):
      y, x = np.sort(rng.random(2)), np.sort(rng.random(2))
      return tfds.features.BBox(ymin=y[0], xmin=x[0], ymax=y[1], xmax=x[1])
    if isinstance(feature, tfds.features.Sequence):
      return [value(feature.feature) for _ in range(int(rng.integers(0, 3)))]
    if isinstance(feature, tfds.features.Text):
      return f'fake_{rng.integers(1 << 30)}'
    if isinstance(feature, tfds.features.FeaturesDict):
      return {k: value(f) for k, f in feature.items()}
    if isinstance(feature, tfds.features.Tensor):
      return np.zeros([s or 1 for s in feature.shape], feature.np_dtype)
    raise ValueError(f'No fake value for the TFDS feature {feature!r}.')

  return value(features)


def _is_prepared(builder: tfds.core.DatasetBuilder, splits: Mapping[str, int]) -> bool:
  info = builder.data_path / 'dataset_info.json'
  return info.exists() and all(
      s in builder.info.splits and builder.info.splits[s].num_examples >= n
      for s, n in splits.items())


def write_tfds(name: str, splits: Mapping[str, int], data_dir: str, seed: int = 0) -> None:
  """Prepares TFDS dataset `name` (e.g. 'cars196:2.1.0') with fake `splits` in `data_dir`."""
  builder = tfds.builder(name, data_dir=data_dir)
  if _is_prepared(builder, splits):
    return
  features = builder.info.features

  def examples(split: str, count: int) -> Iterator[tuple[str, dict]]:
    rng = np.random.default_rng([seed, sum(map(ord, split))])
    for i in range(count):
      yield f'{split}_{i}', fake_example(features, rng, i)

  # The builder's own preparation (features, splits, file format, dataset_info),
  # with only the source of the examples replaced.
  builder._split_generators = lambda dl_manager: {  # pylint: disable=protected-access
      split: examples(split, count) for split, count in splits.items()}
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))


def _jpeg(pixels: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format='JPEG', quality=90)
  return out.getvalue()


def _imagenet21k_names(synset: str, splits: Mapping[str, int]) -> Iterator[str]:
  """File names of one synset, as many per split as `splits` asks for each synset.

  The builder assigns a split by the md5 of the file name, so names are drawn
  until each split has its share.
  """
  want = {'train': -(-splits.get('train', 0) // IMAGENET21K_SYNSETS),
          'validation': -(-splits.get('validation', 0) // IMAGENET21K_SYNSETS)}
  i = 0
  while any(want.values()):
    name = f'{synset}_{i}.JPEG'
    split = 'validation' if imagenet21k.is_validation(name) else 'train'
    if want[split] > 0:
      want[split] -= 1
      yield name
    i += 1


def write_imagenet21k(splits: Mapping[str, int], data_dir: str, seed: int = 0) -> None:
  """Prepares 'imagenet21k' through its builder from a generated fall11_whole.tar."""
  builder = imagenet21k.Imagenet21k(data_dir=data_dir)
  if _is_prepared(builder, splits):
    return
  manual_dir = os.path.join(data_dir, 'downloads', 'manual')
  os.makedirs(manual_dir, exist_ok=True)
  synsets = imagenet21k.read_synsets(imagenet21k.RELEASED_SYNSETS)
  # Spread over the label range, so label ids are large (up to ~21k) as in the real data.
  chosen = [synsets[i] for i in np.linspace(0, len(synsets) - 1, IMAGENET21K_SYNSETS, dtype=int)]
  rng = np.random.default_rng(seed)
  with tarfile.open(os.path.join(manual_dir, imagenet21k.ARCHIVE_NAMES[0]), 'w') as outer:
    for label, synset in enumerate(chosen):
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode='w') as inner:
        for file_name in _imagenet21k_names(synset, splits):
          _add_to_tar(inner, file_name, _jpeg(_image(rng, label, (None, None, 3))))
      _add_to_tar(outer, f'{synset}.tar', inner_bytes.getvalue())
  prepare.prepare('imagenet21k', data_dir, manual_dir=manual_dir,
                  synsets_file=imagenet21k.RELEASED_SYNSETS)


def _add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  member = tarfile.TarInfo(name)
  member.size = len(data)
  tar.addfile(member, io.BytesIO(data))


def tfrecord_prefix(pattern: str, split: str) -> str:
  """The write_tfrecords output prefix whose shards match `pattern` for `split`."""
  if not pattern.endswith('-*.tfrecord'):
    raise ValueError(f"Cannot write fake TFRecords for the glob {pattern!r}: a rehearsal "
                     "writes write_tfrecords' names, '<prefix>-*.tfrecord' (e.g. "
                     "'{split}-*.tfrecord').")
  return pattern.replace('{split}', split)[:-len('-*.tfrecord')]


def write_tfrecord_dataset(pattern: str, splits: Mapping[str, int], num_classes: int,
                           seed: int = 0) -> None:
  """JFT-style multi-label shards for each split, through `write_tfrecords` (from a CSV)."""
  rng = np.random.default_rng(seed)
  for split, count in splits.items():
    prefix = tfrecord_prefix(pattern, split)
    folder = os.path.join(os.path.dirname(prefix), f'images_{split}')
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(count):
      labels = sorted(set(rng.integers(0, num_classes, int(rng.integers(1, 4))).tolist()))
      path = os.path.join(folder, f'{i}.jpg')
      with open(path, 'wb') as f:
        f.write(_jpeg(_image(rng, labels[0], (None, None, 3))))
      rows.append((os.path.relpath(path, folder), ' '.join(map(str, labels))))
    csv_path = os.path.join(folder, 'labels.csv')
    with open(csv_path, 'w', newline='', encoding='utf-8') as f:
      csv.writer(f).writerows(rows)
    write_tfrecords.write_tfrecords(csv_path, prefix, num_shards=2)


def write_all(sizes: Mapping[str, Mapping[str, int]], data_dir: str, *,
              num_classes: int, tfrecord_dir: str) -> dict[str, str]:
  """Writes every dataset of `sizes` (a Plan's: dataset -> split -> examples).

  Returns the renames to apply to the config: 'tfrecord:<glob>' names map to the
  same file pattern under `tfrecord_dir`. 'digits' and 'synthetic' need no files;
  'imagefolder:' datasets are left as they are (their class count lives in the
  folder, so only the real folder has the real spec).
  """
  renames = {}
  for dataset, splits in sizes.items():
    if dataset in ('digits', 'synthetic') or dataset.startswith('imagefolder:'):
      continue
    if dataset.startswith('tfrecord:'):
      pattern = os.path.join(tfrecord_dir, os.path.basename(dataset[len('tfrecord:'):]))
      write_tfrecord_dataset(pattern, splits, num_classes)
      renames[dataset] = f'tfrecord:{pattern}'
    elif dataset == 'imagenet21k':
      write_imagenet21k(splits, data_dir)
    elif dataset.startswith('vtab:'):  # The task's TFDS dataset; VtabSource derives the label.
      from mixer import transfer_tasks  # pylint: disable=g-import-not-at-top
      write_tfds(transfer_tasks.get(dataset[len('vtab:'):]).tfds, splits, data_dir)
    else:
      write_tfds(dataset, splits, data_dir)
  return renames

