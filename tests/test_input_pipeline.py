"""Tests for mixer.input_pipeline: the batch contract, sharding, determinism, resume."""

import io
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from mixer import config_lib
from mixer import input_pipeline, preprocess_ops


def _config(**overrides):
  config = config_lib.base_config()
  config.image_size = 8
  config.batch_size = 8
  config.eval_batch_size = 6
  config.input.shuffle_buffer = 64
  for key, value in overrides.items():
    target = config
    *path, last = key.split('.')
    for part in path:
      target = target[part]
    target[last] = value
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _write_valued_folder(root, num_classes=3, per_class=5, split='train'):
  """Constant-colour images; value = 20 * label + i + 1 (unique per example)."""
  for label in range(num_classes):
    os.makedirs(root / split / f'class{label}', exist_ok=True)
    for i in range(per_class):
      out = io.BytesIO()
      Image.fromarray(np.full([7, 9, 3], 20 * label + i + 1, np.uint8)).save(out, 'PNG')
      (root / split / f'class{label}' / f'{i}.png').write_bytes(out.getvalue())
  return root


def _pixel_values(images):
  """The constant grey value of each [-1, 1] image, back on 0..255."""
  return images.reshape(len(images), -1).mean(1) * 127.5 + 127.5


def test_digits_train_and_eval_batches_have_the_contract_shapes():
  config = _config(**{'input.randaug_magnitude': 10, 'input.mixup_p': 0.5})
  batch = next(input_pipeline.create_train_iterator(config))
  assert batch['image'].shape == (8, 8, 8, 3) and batch['image'].dtype == np.float32
  assert -1.0 <= batch['image'].min() and batch['image'].max() <= 1.0
  assert batch['labels'].shape == (8, 10) and batch['labels'].dtype == np.float32
  np.testing.assert_allclose(batch['labels'].sum(1), 1.0, rtol=1e-5)
  for pp in preprocess_ops.EVAL_PP:
    data = input_pipeline.create_eval_iterator(_config(), split='test', pp=pp)
    assert data.num_examples == 360 and data.num_steps == 60 and data.local_batch_size == 6
    first = next(iter(data))
    assert first['image'].shape == (6, 8, 8, 3) and first['mask'].dtype == bool
    assert first['labels'].shape == (6, 10)


def test_labels_stay_with_their_images_through_shuffle_batch_and_mixup(tmp_path):
  root = _write_valued_folder(tmp_path)
  values = np.array([20 * label + i + 1 for label in range(3) for i in range(5)], float)
  config = _config(dataset=f'imagefolder:{root}', num_classes=3,
                   **{'input.mixup_p': 0.8, 'input.shuffle_buffer': 4})
  for batch in _take(input_pipeline.create_train_iterator(config), 4):
    pixels = _pixel_values(batch['image'])
    # The mixed pixel value, per example, lies between the values of the classes
    # that the mixed label names, weighted like the label.
    low = np.array([20 * label + 1 for label in range(3)], float)
    high = low + 4
    assert np.all(pixels >= batch['labels'] @ low - 0.6)
    assert np.all(pixels <= batch['labels'] @ high + 0.6)
  # Without mixup every pixel value is one of the known values, of its own class.
  config.input.mixup_p = 0.0
  for batch in _take(input_pipeline.create_train_iterator(config), 4):
    pixels = _pixel_values(batch['image'])
    assert np.all(np.min(np.abs(pixels[:, None] - values[None]), 1) < 0.6)
    np.testing.assert_array_equal((np.round(pixels) - 1) // 20, batch['labels'].argmax(1))


def test_same_seed_same_batches_and_other_seed_other_batches():
  config = _config(**{'input.randaug_magnitude': 15, 'input.mixup_p': 0.2,
                      'train_split': 'train[:40]'})
  first = _take(input_pipeline.create_train_iterator(config), 3)
  second = _take(input_pipeline.create_train_iterator(config), 3)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['labels'], b['labels'])
  config.seed = 1
  other = _take(input_pipeline.create_train_iterator(config), 3)
  assert not np.array_equal(first[0]['image'], other[0]['image'])


def test_start_step_resumes_exactly_across_epoch_boundaries():
  # 40 examples, 2 processes -> 20 per process, 4 per local batch: an epoch is
  # 5 steps, so steps 3..9 cross the boundary at step 5.
  config = _config(**{'input.randaug_magnitude': 15, 'input.mixup_p': 0.5,
                      'train_split': 'train[:40]'})
  kwargs = dict(process_index=1, process_count=2)
  full = _take(input_pipeline.create_train_iterator(config, **kwargs), 10)
  for start in (3, 7):
    resumed = _take(input_pipeline.create_train_iterator(config, start_step=start, **kwargs),
                    10 - start)
    for step, batch in enumerate(resumed, start=start):
      np.testing.assert_array_equal(batch['image'], full[step]['image'])
      np.testing.assert_array_equal(batch['labels'], full[step]['labels'])
  # Epochs are reshuffled: the second epoch is not the first again.
  assert not np.array_equal(full[0]['image'], full[5]['image'])


def test_train_processes_read_disjoint_parts(tmp_path):
  root = _write_valued_folder(tmp_path, per_class=4)  # 12 examples, 6 per process.
  config = _config(dataset=f'imagefolder:{root}', num_classes=3, batch_size=4,
                   **{'input.inception_crop': False, 'input.flip': False})
  seen = []
  for index in range(2):
    batches = _take(input_pipeline.create_train_iterator(
        config, process_index=index, process_count=2), 3)  # One epoch of 6.
    seen.append({round(v) for b in batches for v in _pixel_values(b['image'])})
  assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 12


def test_padded_eval_counts_each_example_once_over_processes(tmp_path):
  root = _write_valued_folder(tmp_path, num_classes=3, per_class=5, split='test')  # 15.
  config = _config(dataset=f'imagefolder:{root}', num_classes=3, eval_batch_size=8)
  values, steps = [], set()
  for index in range(2):
    data = input_pipeline.create_eval_iterator(config, split='test', process_index=index,
                                               process_count=2)
    assert data.num_examples == 15 and data.local_batch_size == 4
    batches = list(data)
    assert len(batches) == data.num_steps
    steps.add(data.num_steps)
    for batch in batches:
      values += list(np.round(_pixel_values(batch['image'][batch['mask']])))
      assert np.all(batch['image'][~batch['mask']] == 0)
      assert np.all(batch['labels'][~batch['mask']] == 0)
  assert steps == {2}
  assert sorted(values) == sorted(20 * label + i + 1 for label in range(3) for i in range(5))
  # Re-iterable: a second pass gives the same batches.
  data = input_pipeline.create_eval_iterator(config, split='test', process_index=0,
                                             process_count=2)
  np.testing.assert_array_equal(next(iter(data))['image'], next(iter(data))['image'])


def test_undecodable_image_is_replaced_without_shifting_labels(tmp_path, caplog):
  root = _write_valued_folder(tmp_path, per_class=3)
  (root / 'train' / 'class1' / 'zz_broken.png').write_bytes(b'this is not an image')
  config = _config(dataset=f'imagefolder:{root}', num_classes=3, batch_size=10,
                   **{'input.inception_crop': False, 'input.flip': False})
  batch = next(input_pipeline.create_train_iterator(config))
  # The broken record keeps its place as a blank example without a label.
  labelled = batch['labels'].sum(1) > 0
  assert labelled.sum() == 9 and np.all(batch['image'][~labelled] == 0)
  pixels = _pixel_values(batch['image'][labelled])
  np.testing.assert_array_equal((np.round(pixels) - 1) // 20,
                                batch['labels'][labelled].argmax(1))
  assert 'zz_broken.png' in caplog.text  # The logged warning names the file.


def test_map_or_substitute_keeps_order_and_names_failures_in_every_kind_of_chunk():
  """Chunks of 4 over 11 elements: clean, one failure, all failing, and a short last chunk.

  The labels have a variable length (as ReaL's do), so they travel serialized.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  failing = {1, 4, 5, 6, 7, 10}
  labels = [list(range(i % 3)) for i in range(11)]
  ds = tf.data.Dataset.from_generator(
      lambda: ({'value': i, 'labels': labels[i], 'source_id': f'record{i}'} for i in range(11)),
      output_signature={'value': tf.TensorSpec([], tf.int64),
                        'labels': tf.TensorSpec([None], tf.int64),
                        'source_id': tf.TensorSpec([], tf.string)})

  def fn(example):
    check = tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(tf.equal(example['value'], sorted(failing)))), ['fails'])
    with tf.control_dependencies([check]):
      return {'value': example['value'] * 10,
              'count': tf.size(example['labels'], out_type=tf.int64)}

  out = list(input_pipeline._map_or_substitute(  # pylint: disable=protected-access
      ds, fn, {'value': tf.constant(-1, tf.int64), 'count': tf.constant(-1, tf.int64)},
      lambda example: example['source_id'], chunk_size=4).as_numpy_iterator())
  assert [int(result['value']) for result, _ in out] == [
      -1 if i in failing else 10 * i for i in range(11)]
  assert [int(result['count']) for result, _ in out] == [
      -1 if i in failing else len(labels[i]) for i in range(11)]
  assert [bad.decode() for _, bad in out] == [
      f'record{i}' if i in failing else '' for i in range(11)]


def test_configuration_errors_are_clear(tmp_path):
  with pytest.raises(ValueError, match='multiple of the number of processes'):
    input_pipeline.create_train_iterator(_config(batch_size=6), process_index=0,
                                         process_count=4)
  with pytest.raises(ValueError, match='Set config.num_classes=10'):
    input_pipeline.create_train_iterator(_config(num_classes=7))
  with pytest.raises(FileNotFoundError, match='python -m mixer.datasets.prepare cifar10'):
    input_pipeline.create_train_iterator(_config(dataset='cifar10', data_dir=str(tmp_path)))


def test_tfds_mock_datasets_give_contract_batches(tmp_path):
  with tfds.testing.mock_data(num_examples=10):
    config = _config(dataset='cifar10', data_dir=str(tmp_path),
                     **{'input.randaug_magnitude': 10})
    batch = next(input_pipeline.create_train_iterator(config))
    assert batch['image'].shape == (8, 8, 8, 3) and batch['labels'].shape == (8, 10)
    config = _config(dataset='imagenet2012', num_classes=1000, data_dir=str(tmp_path))
    data = input_pipeline.create_eval_iterator(config, split='validation', pp='resmall_crop')
    assert data.num_examples == 10 and data.num_steps == 2 and data.num_classes == 1000
    data = input_pipeline.create_eval_iterator(config, dataset='imagenet2012_real',
                                               split='validation', label_field='real_label')
    batches = list(data)
    assert batches[0]['labels'].shape == (6, 1000)
    # Only images with a ReaL label count (mock data gives some none).
    with_label = sum(int((b['labels'].sum(1) > 0).sum()) for b in batches)
    assert sum(b['mask'].sum() for b in batches) == with_label > 0
    assert batches[0]['image'].min() >= -1 and batches[0]['image'].max() <= 1
    # An evaluator's dataset has its own class count, whatever the training config's.
    data = input_pipeline.create_eval_iterator(_config(data_dir=str(tmp_path)),
                                               dataset='cifar100', split='test')
    assert data.num_classes == 100 and next(iter(data))['labels'].shape == (6, 100)
