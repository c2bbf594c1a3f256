"""Tests for mixer.preprocess_ops: eager == tf.data, seeds, value semantics."""

import io

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from mixer import preprocess_ops as ops


def _random_image(height=37, width=29, seed=0):
  return np.random.RandomState(seed).randint(0, 256, [height, width, 3]).astype(np.uint8)


def _encode(image, fmt='JPEG'):
  out = io.BytesIO()
  Image.fromarray(image).save(out, format=fmt)
  return out.getvalue()


def _eager_and_in_tf_data(fn, *args):
  """(fn(*args) eagerly, fn(*args) inside tf.data.Dataset.map) as numpy."""
  eager = fn(*args)
  ds = tf.data.Dataset.from_tensors(tuple(args)).map(fn)
  in_graph = next(iter(ds))
  return tf.nest.map_structure(np.asarray, eager), tf.nest.map_structure(np.asarray, in_graph)


SEED = tf.constant([7, 11], tf.int64)

_OPS = {
    'decode': lambda data, seed: ops.decode(data),
    'decode_and_inception_crop': lambda data, seed: ops.decode_and_inception_crop(
        data, seed, 16),
    'inception_crop': lambda data, seed: ops.inception_crop(ops.decode(data), seed, 16),
    'flip_left_right': lambda data, seed: ops.flip_left_right(ops.decode(data), seed),
    'randaugment': lambda data, seed: ops.randaugment(ops.decode(data), seed, 2, 15),
    'resize': lambda data, seed: ops.resize(ops.decode(data), 12),
    'resize_small': lambda data, seed: ops.resize_small(ops.decode(data), 12),
    'central_crop': lambda data, seed: ops.central_crop(ops.decode(data), 10),
    'value_range': lambda data, seed: ops.value_range(ops.decode(data)),
    'eval_transform': lambda data, seed: tf.stack([
        ops.decode_and_eval_transform(data, image_size=10, pp=pp, crop_fraction=0.875)
        for pp in ops.EVAL_PP]),
    'mixup': lambda data, seed: ops.mixup(
        tf.cast(tf.stack([ops.decode(data)] * 3), tf.float32) * [[[[0.0]]], [[[1.0]]],
                                                                 [[[2.0]]]],
        tf.eye(3), seed, 0.5),
}


# RandAugment runs slowly eagerly (its 16-way switch), so it is checked on one format.
@pytest.mark.parametrize('name,fmt', [(n, f) for n in sorted(_OPS) for f in ('JPEG', 'PNG')
                                      if (n, f) != ('randaugment', 'JPEG')])
def test_op_same_eagerly_and_in_tf_data(name, fmt):
  data = tf.constant(_encode(_random_image(), fmt))
  eager, in_graph = _eager_and_in_tf_data(_OPS[name], data, SEED)
  tf.nest.map_structure(np.testing.assert_array_equal, eager, in_graph)


@pytest.mark.parametrize('op_index', range(len(ops.RANDAUG_OPS)))
def test_each_randaugment_op_same_eagerly_and_in_tf_data(op_index):
  image = tf.constant(_random_image(24, 20))

  def apply(image, seed):
    out = ops._randaug_branches(image, 15.0, -1.0, seed)[op_index]()  # pylint: disable=protected-access
    return tf.cast(out, tf.uint8)

  eager, in_graph = _eager_and_in_tf_data(apply, image, SEED)
  assert eager.dtype == np.uint8 and eager.shape == (24, 20, 3)
  np.testing.assert_array_equal(eager, in_graph)


def test_randaugment_depends_only_on_seed():
  image = tf.constant(_random_image(32, 32))
  outs = [ops.randaugment(image, tf.constant([s, 0], tf.int64), 2, 15).numpy()
          for s in (1, 1, 2, 3, 4, 5)]
  np.testing.assert_array_equal(outs[0], outs[1])
  assert any(not np.array_equal(outs[0], o) for o in outs[2:])


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_decode_and_crop_equals_decode_then_crop(fmt):
  data = tf.constant(_encode(_random_image(64, 48), fmt))
  for s in range(5):
    seed = tf.constant([s, 3], tf.int64)
    fused = ops.decode_and_inception_crop(data, seed, 16, min_area=0.05)
    separate = ops.inception_crop(ops.decode(data), seed, 16, min_area=0.05)
    if fmt == 'PNG':
      np.testing.assert_array_equal(fused.numpy(), separate.numpy())
    else:  # Same window; libjpeg upsamples chroma differently at the crop edge.
      diff = np.abs(fused.numpy().astype(int) - separate.numpy().astype(int))
      assert diff.mean() < 2.0
    assert fused.dtype == tf.uint8 and fused.shape == (16, 16, 3)


def test_inception_crop_varies_with_seed_and_covers_min_area():
  # A gradient image: the crop's mean position reveals which window was taken.
  ramp = np.tile(np.arange(100, dtype=np.uint8)[None, :, None], [100, 1, 3])
  crops = [ops.inception_crop(tf.constant(ramp), tf.constant([s, 0], tf.int64), 8,
                              min_area=0.05).numpy() for s in range(8)]
  assert len({c.mean() for c in crops}) > 1


def test_flip_is_a_mirror_or_identity():
  image = _random_image(8, 6)
  results = {ops.flip_left_right(tf.constant(image), tf.constant([s, 0], tf.int64))
             .numpy().tobytes() for s in range(16)}
  assert results == {image.tobytes(), image[:, ::-1].tobytes()}


def test_value_range_maps_to_minus_one_one():
  out = ops.value_range(tf.constant([[[0, 255, 127]]], tf.uint8)).numpy()
  np.testing.assert_allclose(out, [[[-1.0, 1.0, (127 - 127.5) / 127.5]]], atol=1e-6)
  assert out.dtype == np.float32


def test_resize_small_keeps_aspect_and_central_crop():
  image = tf.zeros([40, 80, 3], tf.uint8)
  assert ops.resize_small(image, 20).shape == (20, 40, 3)
  assert ops.central_crop(ops.resize_small(image, 20), 20).shape == (20, 20, 3)
  assert ops.resize(image, 16).shape == (16, 16, 3)


def test_mixup_mixes_images_and_labels_with_the_same_ratio():
  values = tf.constant([10.0, 20.0, 30.0, 40.0])
  images = tf.ones([4, 2, 2, 3]) * values[:, None, None, None]
  labels = tf.eye(4)
  mixed_images, mixed_labels = ops.mixup(images, labels, SEED, 0.5)
  # The image value is the label-weighted mean of the source values.
  np.testing.assert_allclose(mixed_images.numpy()[:, 0, 0, 0],
                             mixed_labels.numpy() @ values.numpy(), rtol=1e-5)
  np.testing.assert_allclose(mixed_labels.numpy().sum(1), 1.0, rtol=1e-6)
  ratio = mixed_labels.numpy().max()
  assert 0.5 <= ratio <= 1.0
  np.testing.assert_allclose(mixed_labels.numpy()[1, 0], 1 - ratio, rtol=1e-5)  # Rolled by 1.


def test_multi_hot_and_out_of_range_label():
  np.testing.assert_array_equal(ops.multi_hot(tf.constant([1, 3], tf.int64), 4), [0, 1, 0, 1])
  np.testing.assert_array_equal(ops.multi_hot(tf.zeros([0], tf.int64), 3), [0, 0, 0])
  with pytest.raises(tf.errors.InvalidArgumentError, match='num_classes'):
    ops.multi_hot(tf.constant([5], tf.int64), 4)


def test_example_seed_is_deterministic_and_distinct():
  a = ops.example_seed(0, 5).numpy()
  np.testing.assert_array_equal(a, ops.example_seed(0, 5).numpy())
  assert not np.array_equal(a, ops.example_seed(0, 6).numpy())
  assert not np.array_equal(a, ops.example_seed(1, 5).numpy())


def _np_central_crop(image, size):
  top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
  return image[top:top + size, left:left + size]


def test_eval_transform_matches_big_vision_pp_strings():
  # Each pp rebuilt from tf.image.resize with big_vision's op defaults
  # (resize_small: method='area', resize: 'bilinear', neither antialiased).
  image = _random_image(45, 60)
  small = np.round(tf.image.resize(image, [32, 43], method='area').numpy())  # 45 -> 32
  square = np.round(tf.image.resize(image, [32, 32], method='bilinear').numpy())
  direct = np.round(tf.image.resize(image, [28, 28], method='bilinear').numpy())
  expected = {'resmall_crop': _np_central_crop(small, 28),
              'resize_crop': _np_central_crop(square, 28), 'resize': direct}
  for pp, want in expected.items():
    got = ops.eval_transform(tf.constant(image), image_size=28, pp=pp, crop_fraction=0.875)
    assert got.dtype == tf.float32 and got.shape == (28, 28, 3)
    np.testing.assert_allclose(got.numpy(), (want - 127.5) / 127.5, atol=1e-6, err_msg=pp)


def test_resize_small_is_area_not_bilinear():
  # Downscaling by 4 makes area (a box average) and bilinear differ on noise.
  image = tf.constant(_random_image(64, 64))
  area = ops.resize_small(image, 16).numpy()
  bilinear = ops.resize_small(image, 16, method='bilinear').numpy()
  assert np.abs(area.astype(int) - bilinear.astype(int)).mean() > 5
  box = _random_image(64, 64).reshape(16, 4, 16, 4, 3).mean((1, 3))
  np.testing.assert_allclose(area, box, atol=0.5 + 1e-6)


@pytest.mark.parametrize('pp,crop_fraction,match', [
    ('resize_small', 0.875, 'not an evaluation preprocessing'),
    ('resmall_crop', 0.0, 'crop_fraction'), ('resize_crop', 1.5, 'crop_fraction')])
def test_eval_transform_rejects_bad_arguments(pp, crop_fraction, match):
  with pytest.raises(ValueError, match=match):
    ops.eval_transform(tf.zeros([8, 8, 3], tf.uint8), image_size=8, pp=pp,
                       crop_fraction=crop_fraction)


def _textured_image(size=32):
  # Noise inside [40, 200] (so AutoContrast and Equalize have work to do) with
  # a bright corner block (so geometric ops move visible content).
  image = np.random.RandomState(3).randint(40, 201, [size, size, 3]).astype(np.uint8)
  image[:size // 4, :size // 3] = 230
  return image


@pytest.mark.parametrize('name', ops.RANDAUG_OPS)
def test_every_randaugment_op_changes_the_image(name):
  # Magnitude 7: every op is active there (at 5 the enhance factor is exactly 1;
  # from 10 on Solarize's threshold is >= 256, big_vision's quirk kept).
  image = tf.constant(_textured_image())
  branch = ops._randaug_branches(image, 7.0, 1.0, SEED)[ops.RANDAUG_OPS.index(name)]  # pylint: disable=protected-access
  out = tf.cast(branch(), tf.uint8).numpy()
  assert np.abs(out.astype(int) - _textured_image().astype(int)).mean() > 0.5, name


def test_randaugment_always_applies_the_chosen_op():
  # big_vision applies the selected op unconditionally: with one layer and an
  # image every op changes, no seed may return the input (with the old
  # probability U(0.2, 0.8) about half of them did).
  image = tf.constant(_textured_image())
  layer = tf.function(lambda seed: ops.randaugment(image, seed, num_layers=1, magnitude=7))
  unchanged = [s for s in range(24)
               if np.array_equal(layer(tf.constant([s, 1], tf.int64)).numpy(), image.numpy())]
  assert not unchanged, f'seeds {unchanged} left the image unchanged'
