"""Tests of adapt_to_resolution (paper App. C) and replace_head in mixer.surgery.

The defining property: right after adaptation, the model at K times the
resolution gives the mean of the original model's logits over the K×K
spatially contiguous crops of the image.
"""

import functools

import jax
import numpy as np
import pytest

from mixer import models, surgery, weights
from mixer.surgery import WeightsError
from tests.conftest import random_params, relative_error

_PATCH = 4
_FROM_SIZE = 16  # A 4×4 grid of patches: S = 16 tokens.
_TOKENS_MLP = 8


def _model(factor=1, num_classes=5):
  return models.MlpMixer(num_classes=num_classes, patch_size=_PATCH, hidden_dim=16, num_blocks=2,
                         tokens_mlp_dim=_TOKENS_MLP * factor**2, channels_mlp_dim=32)


def _random_params(model, image_size, seed=0):
  """Random non-zero params, head and token-mixing biases included."""
  return random_params(surgery.model_param_shapes(model, image_size), seed, bias_scale=0.3)


@functools.partial(jax.jit, static_argnums=0)  # Eager flax compiles op by op: slower.
def _jitted_apply(model, params, images):
  return model.apply({'params': params}, images, train=False)


def _logits(model, params, images):
  return np.asarray(_jitted_apply(model, params, images), np.float64)


def _mean_over_crops(model, params, images, factor):
  crops = [images[:, a * _FROM_SIZE:(a + 1) * _FROM_SIZE, b * _FROM_SIZE:(b + 1) * _FROM_SIZE]
           for a in range(factor) for b in range(factor)]
  # All crops in one batch: [K² * N, ...] -> [K², N, classes].
  logits = _logits(model, params, np.concatenate(crops))
  return logits.reshape(factor**2, len(images), -1).mean(axis=0)


@pytest.mark.parametrize('factor', [2, 3])
def test_adapted_logits_are_the_mean_over_crops(factor):
  original = _random_params(_model(), _FROM_SIZE)
  to_size = factor * _FROM_SIZE
  adapted = surgery.adapt_to_resolution(original, _FROM_SIZE, to_size, _PATCH)
  images = np.random.default_rng(1).uniform(-1, 1, (3, to_size, to_size, 3)).astype(np.float32)
  expected = _mean_over_crops(_model(), original, images, factor)
  actual = _logits(_model(factor), adapted, images)
  assert np.std(expected) > 0.05  # Logits that differ between classes and images.
  assert relative_error(actual, expected) < 1e-5


@pytest.mark.parametrize('factor', [2, 3])
def test_token_mixing_is_block_diagonal_over_contiguous_windows(factor):
  original = _random_params(_model(), _FROM_SIZE)
  adapted = surgery.adapt_to_resolution(original, _FROM_SIZE, factor * _FROM_SIZE, _PATCH)
  grid, big_grid = _FROM_SIZE // _PATCH, factor * _FROM_SIZE // _PATCH
  rows, cols = np.divmod(np.arange(big_grid**2), big_grid)  # Raster order, as the model's stem.
  window_of_token = (rows // grid) * factor + cols // grid  # Contiguous K×K tiling.
  window_of_hidden = np.arange(factor**2 * _TOKENS_MLP) // _TOKENS_MLP
  same_window = window_of_token[:, None] == window_of_hidden[None, :]
  for block in ('MixerBlock_0', 'MixerBlock_1'):
    mixing = adapted[block]['token_mixing']
    w_in, w_out = mixing['Dense_0']['kernel'], mixing['Dense_1']['kernel']
    assert w_in.shape == (big_grid**2, factor**2 * _TOKENS_MLP)
    assert not np.any(w_in[~same_window]) and not np.any(w_out[~same_window.T])
    # Token (i, j) of every window uses the original weights of token (i, j).
    trained = original[block]['token_mixing']
    position_in_window = (rows % grid) * grid + cols % grid
    for token in range(big_grid**2):
      window = window_of_token[token]
      hidden = slice(window * _TOKENS_MLP, (window + 1) * _TOKENS_MLP)
      np.testing.assert_array_equal(
          w_in[token, hidden], trained['Dense_0']['kernel'][position_in_window[token]])
      np.testing.assert_array_equal(
          w_out[hidden, token], trained['Dense_1']['kernel'][:, position_in_window[token]])
      assert mixing['Dense_1']['bias'][token] == (
          trained['Dense_1']['bias'][position_in_window[token]])
    np.testing.assert_array_equal(mixing['Dense_0']['bias'],
                                  np.tile(trained['Dense_0']['bias'], factor**2))
    # Everything else is untouched.
    np.testing.assert_array_equal(adapted[block]['channel_mixing']['Dense_0']['kernel'],
                                  original[block]['channel_mixing']['Dense_0']['kernel'])


def test_factor_one_changes_nothing():
  original = _random_params(_model(), _FROM_SIZE)
  same = surgery.adapt_to_resolution(original, _FROM_SIZE, _FROM_SIZE, _PATCH)
  jax.tree.map(np.testing.assert_array_equal, same, original)


@pytest.mark.parametrize('to_size', [24, 8])
def test_non_integer_factor_is_a_clear_error(to_size):
  original = _random_params(_model(), _FROM_SIZE)
  with pytest.raises(WeightsError, match=rf'Cannot adapt from 16 px to {to_size} px: .*'
                                            'integer K'):
    surgery.adapt_to_resolution(original, _FROM_SIZE, to_size, _PATCH)


def test_size_not_a_multiple_of_the_patch_is_a_clear_error():
  with pytest.raises(WeightsError, match='to_size=34 is not a positive multiple of the patch'):
    surgery.adapt_to_resolution(_random_params(_model(), _FROM_SIZE), 16, 34, _PATCH)


def test_wrong_from_size_is_a_clear_error():
  original = _random_params(_model(), _FROM_SIZE)
  with pytest.raises(WeightsError, match='has 16 tokens, but from_size=32 at patch 4 means 64'):
    surgery.adapt_to_resolution(original, 32, 64, _PATCH)


def test_adapted_tokens_mlp_dim():
  assert surgery.adapted_tokens_mlp_dim(384, 224, 448, 16) == 1536
  assert surgery.adapted_tokens_mlp_dim(384, 224, 224, 16) == 384
  with pytest.raises(WeightsError, match='integer K'):
    surgery.adapted_tokens_mlp_dim(384, 224, 384, 16)


def test_load_for_model_infers_the_trained_size_and_adapts(tmp_path):
  original = _random_params(_model(), _FROM_SIZE)
  path = tmp_path / 'small.npz'
  weights.save_npz(original, path)
  params = weights.load_for_model(path, _model(2), 2 * _FROM_SIZE, head='keep')
  images = np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  expected = _mean_over_crops(_model(), original, images, 2)
  assert relative_error(_logits(_model(2), params, images), expected) < 1e-5


def test_load_for_model_with_unadapted_width_says_which_width(tmp_path):
  path = tmp_path / 'small.npz'
  weights.save_npz(_random_params(_model(), _FROM_SIZE), path)
  with pytest.raises(WeightsError, match='build the model with tokens_mlp_dim=32'):
    weights.load_for_model(path, _model(1), 2 * _FROM_SIZE)


def test_load_for_model_non_integer_factor_names_the_file(tmp_path):
  path = tmp_path / 'small.npz'
  weights.save_npz(_random_params(_model(), _FROM_SIZE), path)
  with pytest.raises(WeightsError, match=r'small\.npz \(trained at 16 px\): Cannot adapt'):
    weights.load_for_model(path, _model(1), 24)


def test_replace_head_is_zero_kernel_and_given_bias():
  original = _random_params(_model(num_classes=5), _FROM_SIZE)
  replaced = surgery.replace_head(original, 11, bias=-np.log(11))
  np.testing.assert_array_equal(replaced['head']['kernel'], np.zeros((16, 11), np.float32))
  np.testing.assert_allclose(replaced['head']['bias'], np.full(11, -np.log(11)), rtol=1e-6)
  assert replaced['head']['kernel'].dtype == np.float32
  assert original['head']['kernel'].shape == (16, 5)  # The input is not modified.
  assert 'head' not in surgery.replace_head(original, 0)
