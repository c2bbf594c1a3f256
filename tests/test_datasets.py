"""Tests for the data sources in mixer.datasets (all offline, tiny data)."""

import csv
import io
import logging
import os
import tarfile

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mixer import datasets
from mixer.datasets import digits
from mixer.datasets import imagenet21k
from mixer.datasets import prepare
from mixer.datasets import write_tfrecords


def _image_bytes(value: int, size=(6, 5), fmt='PNG') -> bytes:
  """An image of constant grey `value`: the pixel tells the test its origin."""
  out = io.BytesIO()
  Image.fromarray(np.full([size[0], size[1], 3], value, np.uint8)).save(out, format=fmt)
  return out.getvalue()


def make_imagefolder(root, splits=None):
  """<root>/<split>/<class>/<i>.png; pixel value = 10 * label + i (i < 10)."""
  splits = splits or {'train': {'ant': 3, 'bee': 2, 'cat': 4}, 'test': {'ant': 1, 'bee': 2,
                                                                         'cat': 1}}
  for split, classes in splits.items():
    for label, (name, count) in enumerate(sorted(classes.items())):
      os.makedirs(root / split / name, exist_ok=True)
      for i in range(count):
        fmt = 'JPEG' if i % 2 else 'PNG'
        ext = 'jpg' if fmt == 'JPEG' else 'png'
        (root / split / name / f'{i}.{ext}').write_bytes(_image_bytes(10 * label + i, fmt=fmt))
  return root


def _read_all(source, split, **kwargs):
  return list(source.read(split, **kwargs).as_numpy_iterator())


def _decoded_value(example):
  return int(round(tf.io.decode_image(example['image'], channels=3).numpy().mean()))


# ----------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------
def test_digits_splits_counts_and_slices():
  source = datasets.get_source('digits')
  assert source.num_classes == 10
  assert source.num_examples('train') == 1437 and source.num_examples('test') == 360
  assert source.num_examples('train[:90%]') == 1293
  example = next(source.read('test').as_numpy_iterator())
  image = tf.io.decode_png(example['image']).numpy()
  assert image.shape == (8, 8, 3) and image.dtype == np.uint8
  assert example['label'].shape == (1,) and 0 <= example['label'][0] < 10
  labels = np.concatenate([e['label'] for e in _read_all(source, 'test')])
  np.testing.assert_array_equal(labels, digits._load()['test'][1])  # pylint: disable=protected-access


@pytest.mark.parametrize('split', ['train', 'test[:35]'])
def test_digits_process_parts_are_disjoint_and_cover(split):
  source = datasets.get_source('digits')
  parts = [[e['source_id'] for e in _read_all(source, split, process_index=i,
                                               process_count=2)] for i in range(2)]
  whole = [e['source_id'] for e in _read_all(source, split)]
  assert not set(parts[0]) & set(parts[1])
  assert sorted(parts[0] + parts[1]) == sorted(whole)


# ----------------------------------------------------------------------------
# imagefolder
# ----------------------------------------------------------------------------
def test_imagefolder_reads_labels_in_sorted_class_order(tmp_path):
  source = datasets.get_source(f'imagefolder:{make_imagefolder(tmp_path)}')
  assert source.classes == ['ant', 'bee', 'cat'] and source.num_classes == 3
  examples = _read_all(source, 'train')
  assert len(examples) == source.num_examples('train') == 9
  for example in examples:
    assert _decoded_value(example) // 10 == example['label'][0]
  assert source.num_examples('train[:3]') == 3
  parts = [{e['source_id'] for e in _read_all(source, 'train', process_index=i,
                                              process_count=2)} for i in range(2)]
  assert not parts[0] & parts[1] and len(parts[0] | parts[1]) == 9


def test_imagefolder_lists_each_class_folder_once_and_never_stats_an_image(tmp_path, monkeypatch):
  """On gs:// every listing and stat is a request: ImageNet has 1.3M images in 1000 folders."""
  root = make_imagefolder(tmp_path)
  (root / 'train' / 'cat' / 'notes.txt').write_text('not an image')
  (root / 'train' / 'cat' / '.DS_Store').write_bytes(b'')
  (root / 'train' / 'cat' / '.ipynb_checkpoints').mkdir()  # Hidden: ignored, not nested.
  listed, stat = [], []
  listdir, isdir = tf.io.gfile.listdir, tf.io.gfile.isdir
  monkeypatch.setattr(tf.io.gfile, 'listdir', lambda p: listed.append(str(p)) or listdir(p))
  monkeypatch.setattr(tf.io.gfile, 'isdir', lambda p: stat.append(str(p)) or isdir(p))
  source = datasets.get_source(f'imagefolder:{root}')
  assert source.num_examples('train') == 9 and source.num_examples('test') == 4
  assert len(listed) == len(set(listed)) == 1 + 2 + 2 * 3  # root, splits, class folders.
  assert [p for p in stat if p.endswith(('.png', '.jpg'))] == []
  assert any(p.endswith('notes.txt') for p in stat)  # Only non-images are checked.


def test_imagefolder_wrong_layouts_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='not a directory'):
    datasets.get_source(f'imagefolder:{tmp_path / "missing"}')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='no split folders'):
    datasets.get_source(f'imagefolder:{tmp_path / "empty"}')
  flat = tmp_path / 'flat'
  (flat / 'train').mkdir(parents=True)
  (flat / 'train' / 'a.png').write_bytes(_image_bytes(1))
  with pytest.raises(ValueError, match='only class folders'):
    datasets.get_source(f'imagefolder:{flat}')
  nested = tmp_path / 'nested'
  (nested / 'train' / 'cat' / 'deeper').mkdir(parents=True)
  source = datasets.get_source(f'imagefolder:{nested}')
  with pytest.raises(ValueError, match='nested folders'):
    source.num_examples('train')
  good = datasets.get_source(f'imagefolder:{make_imagefolder(tmp_path / "good")}')
  with pytest.raises(ValueError, match="Unknown split 'validation'"):
    good.num_examples('validation')


# ----------------------------------------------------------------------------
# tfrecord + writer
# ----------------------------------------------------------------------------
def test_tfrecord_writer_from_imagefolder_and_sharding(tmp_path):
  root = make_imagefolder(tmp_path / 'folder')
  (root / 'train' / 'cat' / 'broken.jpg').write_bytes(b'\xff\xd8\xffnot really a jpeg')
  out = tmp_path / 'tfr'
  write_tfrecords.write_tfrecords(str(root), str(out / 'train'), num_shards=3, split='train')
  assert (out / 'train-classes.txt').read_text().split() == ['ant', 'bee', 'cat']
  source = datasets.get_source(f'tfrecord:{out}/{{split}}-*.tfrecord', num_classes=3)
  assert len(source.files('train')) == 3
  assert source.num_examples('train') == 9  # The broken image was skipped.
  for example in _read_all(source, 'train'):
    assert _decoded_value(example) // 10 == example['label'][0]
  # 3 files, 2 processes: by file; 3 files, 4 processes: by record.
  for count in (2, 4):
    parts = [[e['source_id'] for e in _read_all(source, 'train', process_index=i,
                                                 process_count=count)] for i in range(count)]
    flat = [x for part in parts for x in part]
    assert len(flat) == len(set(flat)) == 9
    assert [len(p) for p in parts] == [source.num_examples(
        'train', process_index=i, process_count=count) for i in range(count)]
  with pytest.raises(FileNotFoundError, match='No TFRecord files'):
    source.files('test')


def test_tfrecord_writer_from_csv_with_multi_labels(tmp_path):
  (tmp_path / 'a.png').write_bytes(_image_bytes(5))
  (tmp_path / 'b.jpg').write_bytes(_image_bytes(9, fmt='JPEG'))
  with open(tmp_path / 'list.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerows([['path', 'labels'], ['a.png', '1 4'], ['b.jpg', '2']])
  write_tfrecords.write_tfrecords(str(tmp_path / 'list.csv'), str(tmp_path / 'x' / 'train'),
                                  num_shards=1)
  source = datasets.get_source(f'tfrecord:{tmp_path}/x/{{split}}-*', num_classes=5)
  labels = {_decoded_value(e): sorted(e['label'].tolist()) for e in _read_all(source, 'train')}
  assert labels == {5: [1, 4], 9: [2]}


# ----------------------------------------------------------------------------
# imagenet21k builder
# ----------------------------------------------------------------------------
def _write_fake_i21k(manual_dir, synsets=('n00000003', 'n00000001', 'n00000002'),
                     per_synset=4):
  """fall11_whole.tar: one nXXXXXXXX.tar per synset of small JPEGs (+1 corrupt)."""
  manual_dir.mkdir(parents=True, exist_ok=True)

  def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))

  with tarfile.open(manual_dir / 'fall11_whole.tar', 'w') as outer:
    for synset in synsets:
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode='w') as inner:
        label = sorted(synsets).index(synset)
        # The last name is one the md5 rule holds out, so 'validation' is not empty.
        held_out = next(i for i in range(100, 10_000)
                        if imagenet21k.is_validation(f'{synset}_{i}.JPEG'))
        for i in list(range(per_synset - 1)) + [held_out]:
          add(inner, f'{synset}_{i}.JPEG', _image_bytes(40 * label + i % 10, fmt='JPEG'))
        if synset == synsets[0]:
          add(inner, f'{synset}_corrupt.JPEG', b'\xff\xd8\xff\xe0 truncated garbage')
          add(inner, f'{synset}_png.JPEG', _image_bytes(40 * label + 9, fmt='PNG'))
      add(outer, f'{synset}.tar', inner_bytes.getvalue())


def test_imagenet21k_builder_on_a_fake_archive(tmp_path, caplog):
  _write_fake_i21k(tmp_path / 'manual')
  with caplog.at_level(logging.WARNING):
    prepare.prepare('imagenet21k', str(tmp_path / 'tfds'), str(tmp_path / 'manual'))
  assert any('_corrupt.JPEG' in r.getMessage() and 'does not decode' in r.getMessage()
             for r in caplog.records)
  source = datasets.get_source('imagenet21k', data_dir=str(tmp_path / 'tfds'))
  assert source.num_classes == 3
  builder = imagenet21k.Imagenet21k(data_dir=str(tmp_path / 'tfds'))
  assert builder.info.features['label'].names == ['n00000001', 'n00000002', 'n00000003']
  # The corrupt JPEG is skipped, the PNG re-encoded; one held-out image per synset.
  assert source.num_examples('train') == 3 * 3 + 1
  assert source.num_examples('validation') == 3
  for split in ('train', 'validation'):
    for example in _read_all(source, split):
      assert tf.io.is_jpeg(example['image'])
      assert abs(_decoded_value(example) - 40 * example['label'][0]) < 12


def test_imagenet21k_label_order_from_the_released_list_in_the_package(tmp_path):
  released = imagenet21k.read_synsets(imagenet21k.RELEASED_SYNSETS)
  assert len(released) == imagenet21k.RELEASED_NUM_CLASSES == len(set(released))
  assert released[:2] == ['n00004475', 'n00005787']  # Not sorted: the heads' own order.
  synsets = (released[5], released[2], released[9])
  _write_fake_i21k(tmp_path / 'manual', synsets=synsets, per_synset=2)
  builder = prepare.prepare('imagenet21k', str(tmp_path / 'tfds'), str(tmp_path / 'manual'),
                            synsets_file=imagenet21k.RELEASED_SYNSETS)
  assert builder.info.features['label'].names == released
  labels = {int(e['label'][0]) for e in _read_all(
      datasets.get_source('imagenet21k', data_dir=str(tmp_path / 'tfds')), 'train')}
  assert labels == {2, 5, 9}


def test_imagenet21k_missing_archive_is_a_clear_error(tmp_path):
  (tmp_path / 'manual').mkdir()
  with pytest.raises(Exception, match='fall11_whole.tar'):
    prepare.prepare('imagenet21k', str(tmp_path / 'tfds'), str(tmp_path / 'manual'))


# ----------------------------------------------------------------------------
# TFDS
# ----------------------------------------------------------------------------
def test_missing_tfds_dataset_says_how_to_prepare(tmp_path):
  source = datasets.get_source('cifar10', data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError,
                     match=f'python -m mixer.datasets.prepare cifar10 --data_dir={tmp_path}`'):
    source.read('train')


@pytest.mark.parametrize('dataset,command', [
    ('cifar10', 'python -m mixer.datasets.prepare cifar10 --data_dir={}`'),
    ('imagenet2012', 'python -m mixer.datasets.prepare imagenet2012 --data_dir={} '
                     '--manual_dir=DIR` with ILSVRC2012_img_train.tar'),
    ('imagenet21k', 'python -m mixer.datasets.prepare imagenet21k --data_dir={} '
                    '--manual_dir=DIR --synsets_file=released` with fall11_whole.tar'),
])
def test_check_available_names_the_command_that_prepares_the_dataset(tmp_path, dataset,
                                                                     command):
  with pytest.raises(ValueError) as error:
    datasets.check_available(dataset, 'train', str(tmp_path))
  message = str(error.value)
  assert message.startswith(f"Dataset '{dataset}', split 'train': ")
  assert command.format(tmp_path) in message and 'tfds build' not in message


def test_check_available_accepts_readable_splits_and_names_bad_ones(tmp_path):
  datasets.check_available('digits', 'train[:90%]')
  with pytest.raises(ValueError, match=r"'digits', split 'trian'.*Available splits"):
    datasets.check_available('digits', 'trian')
  with pytest.raises(ValueError, match='No TFRecord files match'):
    datasets.check_available(f'tfrecord:{tmp_path}/{{split}}-*.tfrecord', 'train')
  with pytest.raises(ValueError, match='is not a directory'):
    datasets.check_available(f'imagefolder:{tmp_path}/none', 'train')
  with pytest.raises(ValueError, match='Unknown dataset'):
    datasets.check_available('no_such_dataset_xyz', 'train', str(tmp_path))
  with tfds.testing.mock_data(num_examples=3):  # How tests and rehearsals fake TFDS data.
    datasets.check_available('imagenet2012_real', 'validation', str(tmp_path))


def _fake_cifar10_download(root):
  """The extracted cifar-10-binary.tar.gz: 1 byte label + 3072 bytes a record."""
  folder = root / 'cifar-10-batches-bin'
  folder.mkdir(parents=True)
  (folder / 'batches.meta.txt').write_text('\n'.join(f'class{i}' for i in range(10)) + '\n')
  rng = np.random.default_rng(0)
  for name in [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']:
    records = [bytes([label]) + rng.integers(0, 256, 3072, np.uint8).tobytes()
               for label in (3, 7)]
    (folder / name).write_bytes(b''.join(records))
  return root


def test_prepare_builds_a_catalog_dataset_in_the_pinned_environment(tmp_path, monkeypatch):
  """`mixer.datasets.prepare cifar10` (the command the errors name) works without Beam.

  Only the download is replaced (no network here); the rest is TFDS's
  download_and_prepare in this environment (`tfds build` fails: no apache_beam).
  """
  extracted = _fake_cifar10_download(tmp_path / 'download')
  monkeypatch.setattr(tfds.download.DownloadManager, 'download_and_extract',
                      lambda self, url: str(extracted))
  prepare.prepare('cifar10', str(tmp_path / 'tfds'))
  datasets.check_available('cifar10', 'test', str(tmp_path / 'tfds'))
  source = datasets.get_source('cifar10', data_dir=str(tmp_path / 'tfds'))
  assert source.num_examples('train') == 10 and source.num_examples('test') == 2
  assert sorted(e['label'][0] for e in _read_all(source, 'test')) == [3, 7]


def test_unknown_dataset_name_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='Unknown dataset'):
    datasets.get_source('no_such_dataset_xyz', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='prefix'):
    datasets.get_source('folder:/x')


def test_tfds_source_with_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=5):
    source = datasets.get_source('imagenet2012_real', data_dir=str(tmp_path))
    assert source.num_classes == 1000 and source.has_real_labels
    assert source.num_examples('validation') == 5
    example = next(source.read('validation').as_numpy_iterator())
    assert isinstance(example['image'], bytes) and example['label'].shape == (1,)
    assert example['real_label'].ndim == 1
