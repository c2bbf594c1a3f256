"""Tests of released-format .npz weights (mixer.weights) and tree checks (mixer.surgery)."""

import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from mixer import models, paths, surgery, weights
from mixer.surgery import WeightsError


def _tiny_model(num_classes=5, num_blocks=2, **overrides):
  kwargs = {'num_classes': num_classes, 'patch_size': 4, 'hidden_dim': 16,
            'num_blocks': num_blocks, 'tokens_mlp_dim': 8, 'channels_mlp_dim': 32}
  kwargs.update(overrides)
  return models.MlpMixer(**kwargs)


def _boxed_random(model, image_size, seed=0):
  """Params boxed as `model.init` returns them (nn.Partitioned), with random values.

  Built from `jax.eval_shape` because compiling a real init takes seconds on CPU.
  """
  rng = np.random.default_rng(seed)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  boxed = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype),
                      boxed['params'])


def _random_tree(model, image_size, seed=0):
  """Plain numpy params with every leaf random (the init has a zero head)."""
  rng = np.random.default_rng(seed)
  shapes = surgery.model_param_shapes(model, image_size)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def _flat(tree):
  return traverse_util.flatten_dict(nn.meta.unbox(tree), sep='/')


def _shapes(name, num_classes, image_size=224, **overrides):
  return surgery.model_param_shapes(
      models.get_model(name, num_classes=num_classes, **overrides), image_size)


def _released_b16_keys():
  """The 150 keys of a released Mixer-B/16 file (reference §1.7)."""
  keys = {'stem/kernel', 'stem/bias', 'pre_head_layer_norm/scale', 'pre_head_layer_norm/bias',
          'head/kernel', 'head/bias'}
  for i in range(12):
    keys |= {f'MixerBlock_{i}/{norm}/{p}' for norm in ('LayerNorm_0', 'LayerNorm_1')
             for p in ('scale', 'bias')}
    keys |= {f'MixerBlock_{i}/{mlp}/Dense_{d}/{p}' for mlp in ('token_mixing', 'channel_mixing')
             for d in (0, 1) for p in ('kernel', 'bias')}
  return keys


# --- save_npz / load_npz -------------------------------------------------------------


def test_save_load_round_trip_is_exact_and_in_released_layout(tmp_path):
  # 12 blocks + head: the same key set as a released B/16 file, at a tiny size.
  boxed = _boxed_random(_tiny_model(num_blocks=12), 16)
  assert isinstance(boxed['stem']['kernel'], nn.Partitioned)
  path = tmp_path / 'model.npz'
  weights.save_npz(boxed, path)
  loaded = weights.load_npz(path)
  expected = {k: np.asarray(v) for k, v in _flat(boxed).items()}
  assert set(_flat(loaded)) == set(expected) == _released_b16_keys()
  for key, value in _flat(loaded).items():
    assert value.dtype == np.float32
    np.testing.assert_array_equal(value, expected[key], err_msg=key)
  # The format other tools read: plain np.load, flat '/'-joined keys, no prefix.
  with np.load(path, allow_pickle=False) as plain:
    assert set(plain.files) == _released_b16_keys()
    np.testing.assert_array_equal(plain['stem/kernel'], expected['stem/kernel'])


def test_save_accepts_numpy_jax_and_variables_dict(tmp_path):
  tree = _random_tree(_tiny_model(), 16)
  as_jax = jax.tree.map(jnp.asarray, tree)
  weights.save_npz({'params': as_jax}, tmp_path / 'a.npz')
  weights.save_npz(tree, tmp_path / 'b.npz')
  a = _flat(weights.load_npz(tmp_path / 'a.npz'))
  b = _flat(weights.load_npz(tmp_path / 'b.npz'))
  assert set(a) == set(b) == set(_flat(tree))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_saved_file_gets_the_usual_permissions(tmp_path):
  umask = os.umask(0o022)
  os.umask(umask)
  weights.save_npz(_random_tree(_tiny_model(), 16), tmp_path / 'model.npz')
  assert os.stat(tmp_path / 'model.npz').st_mode & 0o777 == 0o666 & ~umask  # Not mkstemp's 0600.


def test_bucket_paths_go_through_epath(tmp_path, monkeypatch):
  # The trainer's workdir may be gs://...; exercise that code path on a local file.
  monkeypatch.setattr(paths, 'is_remote', lambda path: True)
  tree = _random_tree(_tiny_model(), 16)
  weights.save_npz(tree, tmp_path / 'remote.npz')
  loaded = _flat(weights.load_npz(tmp_path / 'remote.npz'))
  for key, value in _flat(tree).items():
    np.testing.assert_array_equal(loaded[key], value)
  with pytest.raises(WeightsError, match='absent.npz: no such file'):
    weights.load_npz(tmp_path / 'absent.npz')
  (tmp_path / 'page.npz').write_text('<html>')
  with pytest.raises(WeightsError,
                     match=r'not an \.npz \(zip\) archive, or truncated \(6 bytes'):
    weights.load_npz(tmp_path / 'page.npz')


def test_save_writes_bfloat16_as_float32(tmp_path):
  weights.save_npz({'x': {'kernel': jnp.ones((2, 2), jnp.bfloat16)}}, tmp_path / 'b.npz')
  with np.load(tmp_path / 'b.npz', allow_pickle=False) as plain:
    assert plain['x/kernel'].dtype == np.float32


def test_missing_file_is_a_clear_error(tmp_path):
  with pytest.raises(WeightsError, match='no such file.*storage.googleapis.com/mixer_models'):
    weights.load_npz(tmp_path / 'absent.npz')


def test_directory_is_a_clear_error(tmp_path):
  with pytest.raises(WeightsError, match='is a directory'):
    weights.load_npz(tmp_path)


def test_not_an_npz_is_a_clear_error(tmp_path):
  path = tmp_path / 'page.npz'
  path.write_text('<html>403 Forbidden</html>')
  with pytest.raises(WeightsError, match=r'page\.npz: not an \.npz \(zip\) archive') as info:
    weights.load_npz(path)
  assert 'Re-download' in str(info.value)


@pytest.mark.parametrize('keep_fraction', [0.5, 0.98])
def test_truncated_file_is_a_clear_error(tmp_path, keep_fraction):
  path = tmp_path / 'model.npz'
  weights.save_npz(_random_tree(_tiny_model(), 16), path)
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep_fraction)])
  with pytest.raises(WeightsError, match=r'model\.npz: .*(truncated|corrupt)'):
    weights.load_npz(path)


def test_corrupt_member_is_a_clear_error(tmp_path):
  path = tmp_path / 'model.npz'
  np.savez_compressed(path, **{'stem/kernel': np.arange(4096, dtype=np.float32)})
  data = bytearray(path.read_bytes())
  data[len(data) // 3] ^= 0xFF  # Inside the compressed stream, before the zip directory.
  path.write_bytes(bytes(data))
  with pytest.raises(WeightsError, match=r'model\.npz: .*corrupt'):
    weights.load_npz(path)


def test_pickled_objects_are_refused(tmp_path):
  path = tmp_path / 'pickled.npz'
  np.savez(path, **{'stem/kernel': np.array([{'not': 'an array'}], dtype=object)})
  with pytest.raises(WeightsError, match=r'pickled\.npz: holds pickled Python objects'):
    weights.load_npz(path)


def test_zip_without_arrays_is_refused(tmp_path):
  path = tmp_path / 'other.zip'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('readme.txt', 'hello')
  with pytest.raises(WeightsError, match="member 'readme.txt' is not a .npy array"):
    weights.load_npz(path)


def test_save_refuses_non_arrays_and_keeps_the_existing_file(tmp_path):
  path = tmp_path / 'model.npz'
  weights.save_npz(_random_tree(_tiny_model(), 16), path)
  before = path.read_bytes()
  with pytest.raises(WeightsError, match=r"'head/kernel'.*not numeric"):
    weights.save_npz({'stem': {'kernel': np.ones(3)}, 'head': {'kernel': object()}}, path)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ['model.npz']


def test_failed_write_leaves_the_existing_file_whole(tmp_path, monkeypatch):
  path = tmp_path / 'model.npz'
  weights.save_npz(_random_tree(_tiny_model(), 16), path)
  before = path.read_bytes()

  def crash_half_way(file, **arrays):
    file.write(b'PK\x03\x04 partial bytes')
    raise OSError('No space left on device')

  monkeypatch.setattr(np, 'savez', crash_half_way)
  with pytest.raises(OSError, match='No space left'):
    weights.save_npz(_random_tree(_tiny_model(), 16, seed=1), path)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ['model.npz']  # No temporary file left behind.


# --- check_params ----------------------------------------------------------------------


def test_check_params_accepts_a_matching_tree():
  model = _tiny_model()
  surgery.check_params(_random_tree(model, 16), _boxed_random(model, 16))


def test_missing_key_is_named():
  expected = _shapes('Mixer-B_16', 1000)
  params = _flat(expected)
  del params['MixerBlock_3/LayerNorm_1/scale']
  with pytest.raises(WeightsError, match=r'missing key MixerBlock_3/LayerNorm_1/scale '
                                            r'\(expected shape \(768,\)\)'):
    surgery.check_params(traverse_util.unflatten_dict(params, sep='/'), expected)


def test_unexpected_key_is_named():
  expected = _shapes('Mixer-B_16', 1000)
  params = _flat(expected)
  params['pre_logits/kernel'] = jax.ShapeDtypeStruct((768, 768), jnp.float32)
  with pytest.raises(WeightsError,
                     match=r'unexpected key pre_logits/kernel \(shape \(768, 768\)'):
    surgery.check_params(traverse_util.unflatten_dict(params, sep='/'), expected)


def test_wrong_shape_names_key_shapes_and_fix():
  expected = _shapes('Mixer-B_16', 1000)
  params = _flat(expected)
  params['MixerBlock_5/channel_mixing/Dense_0/kernel'] = np.zeros((768, 3000), np.float32)
  with pytest.raises(WeightsError) as info:
    surgery.check_params(traverse_util.unflatten_dict(params, sep='/'), expected)
  message = str(info.value)
  assert ('wrong shape for MixerBlock_5/channel_mixing/Dense_0/kernel: expected (768, 3072), '
          'found (768, 3000)') in message
  assert 'Fix:' in message


def test_token_count_mismatch_suggests_adapt_to_resolution():
  with pytest.raises(WeightsError) as info:
    surgery.check_params(_shapes('Mixer-B_16', 1000),
                            _shapes('Mixer-B_16', 1000, 448, tokens_mlp_dim=1536))
  message = str(info.value)
  assert ('wrong shape for MixerBlock_0/token_mixing/Dense_0/kernel: expected (784, 1536), '
          'found (196, 384)') in message
  assert 'checkpoint has 196 tokens (224 px at patch 16), the model 784 (448 px' in message
  assert 'adapt_to_resolution' in message and 'config.init_from_image_size=224' in message


def test_head_mismatch_suggests_replace_head():
  with pytest.raises(WeightsError) as info:
    surgery.check_params(_shapes('Mixer-B_16', 21843), _shapes('Mixer-B_16', 1000))
  message = str(info.value)
  assert 'wrong shape for head/kernel: expected (768, 1000), found (768, 21843)' in message
  assert 'replace_head' in message and "config.init_head='replace'" in message


def test_other_variant_is_named():
  with pytest.raises(WeightsError) as info:
    surgery.check_params(_shapes('Mixer-L_16', 1000), _shapes('Mixer-B_16', 1000))
  message = str(info.value)
  assert 'looks like Mixer-L_16: hidden 1024, 24 blocks, patch 16' in message
  assert 'the model is Mixer-B_16: hidden 768, 12 blocks' in message
  assert 'unexpected key MixerBlock_12/LayerNorm_0/bias' in message


@pytest.mark.parametrize('name', sorted(models.VARIANTS))
def test_infer_architecture_recognises_each_variant(name):
  found = surgery.infer_architecture(_shapes(name, 1000))
  assert found.variant == name
  assert found.image_size == 224 // found.patch_size * found.patch_size
  assert found.num_classes == 1000


# --- load_for_model ----------------------------------------------------------------------


def test_load_for_model_replaces_head_and_returns_exact_float32_tree(tmp_path):
  path = tmp_path / 'model.npz'
  weights.save_npz(_random_tree(_tiny_model(num_classes=21), 16), path)
  model = _tiny_model(num_classes=3)
  params = weights.load_for_model(path, model, 16, head_bias=-2.0)
  expected = _flat(surgery.model_param_shapes(model, 16))
  flat = _flat(params)
  assert {k: (v.shape, v.dtype) for k, v in flat.items()} == {
      k: (v.shape, v.dtype) for k, v in expected.items()}
  assert all(isinstance(v, np.ndarray) for v in flat.values())
  np.testing.assert_array_equal(params['head']['kernel'], np.zeros((16, 3)))
  np.testing.assert_array_equal(params['head']['bias'], np.full(3, -2.0))
  np.testing.assert_array_equal(params['stem']['kernel'],
                                weights.load_npz(path)['stem']['kernel'])
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
  np.testing.assert_allclose(apply(params, jnp.ones((1, 16, 16, 3))), np.full((1, 3), -2.0))


def test_load_for_model_keeps_a_matching_head(tmp_path):
  path = tmp_path / 'model.npz'
  tree = _random_tree(_tiny_model(), 16)
  weights.save_npz(tree, path)
  params = weights.load_for_model(path, _tiny_model(), 16, head='keep')
  np.testing.assert_array_equal(params['head']['kernel'], tree['head']['kernel'])


def test_load_for_model_keep_with_other_head_is_a_clear_error(tmp_path):
  path = tmp_path / 'model.npz'
  weights.save_npz(_random_tree(_tiny_model(num_classes=21), 16), path)
  with pytest.raises(WeightsError,
                     match=r'(?s)model\.npz at 16 px: .*head/kernel.*replace_head'):
    weights.load_for_model(path, _tiny_model(num_classes=3), 16, head='keep')


def test_load_for_model_without_head_for_feature_extractor(tmp_path):
  path = tmp_path / 'model.npz'
  weights.save_npz(_random_tree(_tiny_model(), 16), path)
  params = weights.load_for_model(path, _tiny_model(num_classes=0), 16, head='keep')
  assert 'head' not in params


def test_load_for_model_other_variant_is_a_clear_error(tmp_path):
  path = tmp_path / 'model.npz'
  weights.save_npz(_random_tree(_tiny_model(), 16), path)
  with pytest.raises(WeightsError, match='different model: it looks like no paper variant: '
                                            'hidden 16'):
    weights.load_for_model(path, models.get_model('Mixer-S_16', num_classes=5), 16)


def test_load_for_model_wrong_from_image_size_is_a_clear_error(tmp_path):
  path = tmp_path / 'model.npz'
  weights.save_npz(_random_tree(_tiny_model(), 16), path)
  with pytest.raises(WeightsError, match=r'from_image_size=32 .* the file has 16 tokens '
                                            r'\(16 px\)\. Set it to 16'):
    weights.load_for_model(path, _tiny_model(tokens_mlp_dim=32), 32, from_image_size=32)


def test_load_for_model_rejects_unknown_head_mode(tmp_path):
  with pytest.raises(ValueError, match="head='new'"):
    weights.load_for_model(tmp_path / 'x.npz', _tiny_model(), 16, head='new')


def test_scanned_models_read_and_write_the_released_layout(tmp_path):
  """`scan_blocks` stacks the blocks in memory; files stay per-block, bit for bit."""
  released = _random_tree(_tiny_model(num_blocks=3), 16)
  path = tmp_path / 'released.npz'
  weights.save_npz(released, path)
  scanned_model = _tiny_model(num_blocks=3, scan_blocks=True)
  loaded = weights.load_for_model(path, scanned_model, 16, head='keep')
  assert 'MixerBlocks' in loaded and 'MixerBlock_0' not in loaded
  weights.save_npz(loaded, tmp_path / 'again.npz')  # Scanned in, released out.
  again = weights.load_npz(tmp_path / 'again.npz')
  flat, flat_again = surgery.flatten(weights.load_npz(path)), surgery.flatten(again)
  assert flat.keys() == flat_again.keys()
  for key in flat:
    np.testing.assert_array_equal(flat[key], flat_again[key])
