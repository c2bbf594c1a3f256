"""Tests of mixer.models: the paper's sizes, the released layout, and the maths.

The forward pass is checked against a second implementation written here in
plain float64 numpy straight from the paper's equations, on real photos.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from PIL import Image
from sklearn.datasets import load_sample_images

from mixer import models, param_layout
from tests.conftest import random_params, relative_error

# Paper Table 1 (exact counts in paper-and-weights.md §2.1): head-less, at 224 px.
_TABLE_1_HEADLESS = {
    'Mixer-S_32': 18_591_624,
    'Mixer-S_16': 18_015_264,
    'Mixer-B_32': 59_524_428,
    'Mixer-B_16': 59_111_472,
    'Mixer-L_32': 205_914_264,
    'Mixer-L_16': 207_171_168,
    'Mixer-H_14': 431_069_952,
}
# `gsutil ls -lh gs://mixer_models/gsam/Mixer-S_8.npz` (1000-class head).
_GSAM_S8_FILE_MIB = 78.79


def _param_shapes(model, image_size):
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  return nn.meta.unbox(variables['params'])


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize('name', sorted(_TABLE_1_HEADLESS))
def test_headless_param_count_matches_table_1(name):
  model = models.get_model(name, num_classes=0)
  assert _count(_param_shapes(model, 224)) == _TABLE_1_HEADLESS[name]


def test_s8_with_head_matches_released_gsam_file_size():
  params = _param_shapes(models.get_model('Mixer-S_8', num_classes=1000), 224)
  mib = _count(params) * 4 / 2**20  # float32
  # gsutil rounds to 0.01 MiB; the npz adds a few hundred bytes of headers per array.
  assert _GSAM_S8_FILE_MIB - 0.06 < mib <= _GSAM_S8_FILE_MIB + 0.005


def _released_layout(num_blocks, hidden, tokens, tokens_mlp, channels_mlp, patch, classes):
  """Key -> shape of a released file, written out from its listing (reference §1.7)."""
  layout = {
      'stem/kernel': (patch, patch, 3, hidden), 'stem/bias': (hidden,),
      'pre_head_layer_norm/scale': (hidden,), 'pre_head_layer_norm/bias': (hidden,),
      'head/kernel': (hidden, classes), 'head/bias': (classes,),
  }
  for i in range(num_blocks):
    block = f'MixerBlock_{i}'
    for norm in ('LayerNorm_0', 'LayerNorm_1'):
      layout[f'{block}/{norm}/scale'] = layout[f'{block}/{norm}/bias'] = (hidden,)
    layout[f'{block}/token_mixing/Dense_0/kernel'] = (tokens, tokens_mlp)
    layout[f'{block}/token_mixing/Dense_0/bias'] = (tokens_mlp,)
    layout[f'{block}/token_mixing/Dense_1/kernel'] = (tokens_mlp, tokens)
    layout[f'{block}/token_mixing/Dense_1/bias'] = (tokens,)
    layout[f'{block}/channel_mixing/Dense_0/kernel'] = (hidden, channels_mlp)
    layout[f'{block}/channel_mixing/Dense_0/bias'] = (channels_mlp,)
    layout[f'{block}/channel_mixing/Dense_1/kernel'] = (channels_mlp, hidden)
    layout[f'{block}/channel_mixing/Dense_1/bias'] = (hidden,)
  return layout


def test_param_tree_is_exactly_the_released_layout():
  params = _param_shapes(models.get_model('Mixer-B_16', num_classes=1000), 224)
  flat = traverse_util.flatten_dict(params, sep='/')
  expected = _released_layout(12, 768, 196, 384, 3072, 16, 1000)
  assert len(expected) == 150
  assert {k: tuple(v.shape) for k, v in flat.items()} == expected
  assert all(v.dtype == jnp.float32 for v in flat.values())


def test_unknown_model_name_lists_the_known_names():
  with pytest.raises(ValueError, match='Mixer-B_16') as info:
    models.get_model('Mixer-X_16', num_classes=10)
  assert all(name in str(info.value) for name in models.VARIANTS)


# --- An independent forward pass (paper Eq. 1), float64 numpy --------------------------
# Written for any array module `xp` with numpy's API: numpy in float64 checks the
# forward pass; jax.numpy lets jax.grad differentiate the plain equations, so the
# model's hand-written backward passes (LayerNorm, GELU) are checked against them.


def _layer_norm(x, norm, xp=np):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / xp.sqrt(var + 1e-6) * norm['scale'] + norm['bias']


def _gelu_tanh(x, xp=np):
  return 0.5 * x * (1 + xp.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _mlp(x, mlp, xp=np):
  hidden = _gelu_tanh(x @ mlp['Dense_0']['kernel'] + mlp['Dense_0']['bias'], xp)
  return hidden @ mlp['Dense_1']['kernel'] + mlp['Dense_1']['bias']


def _reference_mixer(p, images, xp=np):
  n, height, width, _ = images.shape
  patch = p['stem']['kernel'].shape[0]
  # Non-overlapping patches in raster order, each flattened as (row, col, rgb).
  patches = images.reshape(n, height // patch, patch, width // patch, patch, 3)
  patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, -1, patch * patch * 3)
  x = patches @ p['stem']['kernel'].reshape(-1, p['stem']['kernel'].shape[-1]) + p['stem']['bias']
  block = 0
  while f'MixerBlock_{block}' in p:
    b = p[f'MixerBlock_{block}']
    # U = X + W2 σ(W1 LN(X)) along tokens; Y = U + W4 σ(W3 LN(U)) along channels.
    x = x + _mlp(_layer_norm(x, b['LayerNorm_0'], xp).transpose(0, 2, 1),
                 b['token_mixing'], xp).transpose(0, 2, 1)
    x = x + _mlp(_layer_norm(x, b['LayerNorm_1'], xp), b['channel_mixing'], xp)
    block += 1
  pooled = _layer_norm(x, p['pre_head_layer_norm'], xp).mean(axis=1)
  return pooled @ p['head']['kernel'] + p['head']['bias']


def _numpy_mixer(params, images):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  return _reference_mixer(p, np.asarray(images, np.float64))


@functools.lru_cache
def _decoded_sample_photos():
  return tuple(load_sample_images().images)


def _sample_photos(size):
  """sklearn's china.jpg and flower.jpg (427x640), resized to size² and put in [-1, 1]."""
  photos = [Image.fromarray(p).resize((size, size), Image.Resampling.BILINEAR)
            for p in _decoded_sample_photos()]
  return (np.stack([np.asarray(p, np.float32) for p in photos]) - 127.5) / 127.5


@pytest.mark.parametrize('model_kwargs, image_size', [
    ({'num_classes': 7, 'patch_size': 8, 'hidden_dim': 32, 'num_blocks': 3,
      'tokens_mlp_dim': 24, 'channels_mlp_dim': 64}, 64),
    ({'name': 'Mixer-S_32', 'num_classes': 1000}, 224),
], ids=['small', 'S_32'])
def test_forward_matches_independent_numpy_implementation(model_kwargs, image_size):
  kwargs = dict(model_kwargs)
  name = kwargs.pop('name', None)
  model = models.get_model(name, **kwargs) if name else models.MlpMixer(**kwargs)
  params = random_params(_param_shapes(model, image_size), seed=0)
  photos = _sample_photos(image_size)
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(params, photos)
  expected = _numpy_mixer(params, photos)
  assert logits.shape == (2, kwargs['num_classes'])
  assert np.std(expected) > 0.1  # Not a degenerate comparison of near-zero logits.
  assert relative_error(logits, expected) < 1e-5


def test_patch_embedding_is_the_released_strided_convolution():
  """The matmul stem computes the released nn.Conv stem (stride = kernel = patch) exactly."""
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 48, 3)), jnp.float32)
  stem = models.PatchEmbedding(features=5, patch_size=16)
  conv = nn.Conv(5, (16, 16), strides=(16, 16), padding='VALID')
  params = models.unbox(stem.init(jax.random.key(0), images))
  params = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape), params)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      jnp.shape, conv.init(jax.random.key(0), images))
  ours, released = stem.apply(params, images), conv.apply(params, images)
  assert ours.shape == released.shape == (2, 2, 3, 5)
  assert relative_error(ours, released) < 1e-6


def test_prelogits_are_pooled_features():
  model = models.MlpMixer(num_classes=3, patch_size=4, hidden_dim=8, num_blocks=1,
                          tokens_mlp_dim=4, channels_mlp_dim=16)
  params = random_params(_param_shapes(model, 16), seed=1)
  images = _sample_photos(16)
  apply = jax.jit(lambda p, x: (model.apply({'params': p}, x, train=False, return_prelogits=True),
                                model.apply({'params': p}, x, train=False)))
  features, logits = apply(params, images)
  assert features.shape == (2, 8)
  np.testing.assert_allclose(
      features @ params['head']['kernel'] + params['head']['bias'], logits, rtol=1e-5, atol=1e-5)


def test_gradients_match_autodiff_of_the_plain_equations():
  """The model's hand-written LayerNorm backward and recomputed GELU give autodiff's gradients.

  Against jax.grad of `_reference_mixer` (the paper's equations, nothing hand-
  written), float32, every parameter and the input images.
  """
  model = models.MlpMixer(num_classes=5, patch_size=8, hidden_dim=32, num_blocks=2,
                          tokens_mlp_dim=24, channels_mlp_dim=64)
  params = random_params(_param_shapes(model, 32), seed=3)
  photos = jnp.asarray(_sample_photos(32))
  weights = jax.random.normal(jax.random.key(0), (2, 5))  # Every logit counts, differently.

  def loss(apply):
    return lambda p, x: jnp.sum(weights * apply(p, x))

  ours = jax.jit(jax.grad(loss(lambda p, x: model.apply({'params': p}, x, train=False)),
                          argnums=(0, 1)))(params, photos)
  plain = jax.jit(jax.grad(loss(lambda p, x: _reference_mixer(p, x, jnp)),
                           argnums=(0, 1)))(params, photos)
  flat_ours = traverse_util.flatten_dict(ours[0], sep='/')
  flat_plain = traverse_util.flatten_dict(plain[0], sep='/')
  assert flat_ours.keys() == flat_plain.keys()
  typical = np.median([np.linalg.norm(g) for g in flat_plain.values()])
  for name, grad in flat_plain.items():
    if name.endswith('token_mixing/Dense_1/bias'):
      # Adds one constant to all channels of a token, which every later LayerNorm
      # (over channels) subtracts again: its exact gradient is 0, both give rounding noise.
      assert max(np.linalg.norm(grad), np.linalg.norm(flat_ours[name])) < 1e-5 * typical, name
      continue
    assert np.linalg.norm(grad) > 1e-3 * typical, name
    assert relative_error(flat_ours[name], grad) < 1e-4, name
  assert relative_error(ours[1], plain[1]) < 1e-4


def test_layer_norm_is_flax_layer_norm_with_its_gradients():
  """`models.LayerNorm` (hand-written backward) against flax's nn.LayerNorm, values and grads."""
  rng = np.random.default_rng(0)
  # Rows with far-from-zero means and different spreads, as the residual stream has.
  x = jnp.asarray(rng.normal(3.0, 1.0, (4, 7, 48)) * rng.uniform(0.1, 5.0, (4, 7, 1)), jnp.float32)
  params = {'scale': jnp.asarray(rng.normal(1.0, 0.3, 48), jnp.float32),
            'bias': jnp.asarray(rng.normal(0.0, 0.3, 48), jnp.float32)}
  weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  ours, flax_ln = models.LayerNorm(), nn.LayerNorm(epsilon=models.LAYER_NORM_EPSILON)

  def value_and_grads(module):
    def loss(p, x):
      return jnp.sum(weights * module.apply({'params': p}, x))
    return module.apply({'params': params}, x), jax.grad(loss, argnums=(0, 1))(params, x)

  (y, (dparams, dx)), (y_ref, (dparams_ref, dx_ref)) = (value_and_grads(ours),
                                                        value_and_grads(flax_ln))
  assert relative_error(y, y_ref) < 1e-6
  assert relative_error(dx, dx_ref) < 1e-5
  for name in ('scale', 'bias'):
    assert relative_error(dparams[name], dparams_ref[name]) < 1e-5
  assert models.LayerNorm(jnp.bfloat16).apply({'params': params}, x).dtype == jnp.bfloat16


def test_bfloat16_residual_stream_is_bf16_between_blocks_and_close_to_float32():
  """`residual_dtype='bfloat16'` rounds the stream between blocks (and only that: the logits
  stay float32), scanned or not, with stochastic depth in training, and stays close to the
  float32 stream: logits and gradients."""
  kwargs = dict(num_classes=5, patch_size=8, hidden_dim=32, num_blocks=3, tokens_mlp_dim=24,
                channels_mlp_dim=64, dtype=jnp.bfloat16, stoch_depth=0.3)
  exact, fast = models.MlpMixer(**kwargs), models.MlpMixer(residual_dtype='bfloat16', **kwargs)
  fast_scanned = models.MlpMixer(residual_dtype='bfloat16', scan_blocks=True, **kwargs)
  params = random_params(_param_shapes(exact, 32), seed=4)
  photos = jnp.asarray(_sample_photos(32))
  weights = jax.random.normal(jax.random.key(0), (2, 5))

  @functools.partial(jax.jit, static_argnums=(0, 2))
  def logits_and_grads(model, p, train):
    def loss(p):
      logits = model.apply({'params': p}, photos, train=train, rngs={'dropout': jax.random.key(7)})
      return jnp.sum(weights * logits), logits
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(p)
    return logits, grads['stem']['kernel']

  _, state = fast.apply({'params': params}, photos, capture_intermediates=True,
                        mutable=['intermediates'])
  blocks = state['intermediates']
  assert [blocks[f'MixerBlock_{i}']['__call__'][0].dtype for i in range(3)] == [jnp.bfloat16] * 3
  _, state = exact.apply({'params': params}, photos, capture_intermediates=True,
                         mutable=['intermediates'])
  assert state['intermediates']['MixerBlock_2']['__call__'][0].dtype == jnp.float32
  for train in (False, True):  # Training drops branches (stochastic depth) in bf16 too.
    exact_logits, exact_grad = logits_and_grads(exact, params, train)
    fast_logits, fast_grad = logits_and_grads(fast, params, train)
    scanned_logits, scanned_grad = logits_and_grads(
        fast_scanned, param_layout.to_scanned(params), train)
    assert fast_logits.dtype == jnp.float32
    # bf16 has 8 significant bits: about 0.5% on the logits here. Above 1e-3, so the
    # option does round the stream; scanned and unscanned round in different places.
    assert 1e-3 < relative_error(fast_logits, exact_logits) < 0.03, train
    assert relative_error(fast_grad, exact_grad) < 0.05, train
    assert relative_error(scanned_logits, fast_logits) < 0.02, train
    assert relative_error(scanned_grad, fast_grad) < 0.05, train


def test_unknown_residual_dtype_is_refused():
  model = models.MlpMixer(num_classes=2, patch_size=8, hidden_dim=8, num_blocks=1,
                          tokens_mlp_dim=4, channels_mlp_dim=8, residual_dtype='float16')
  with pytest.raises(ValueError, match=r"residual_dtype='float16': use one of \['float32', "):
    model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
