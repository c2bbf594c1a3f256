"""Scanned blocks and rematerialisation change compilation, never the function.

The same weights (converted with mixer.param_layout) must give the same logits
and gradients with scan_blocks on or off and with every remat policy, and the
released <-> scanned conversion must round-trip bit for bit.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer import models, param_layout, sharding

_TINY = dict(num_classes=5, patch_size=4, hidden_dim=16, num_blocks=3, tokens_mlp_dim=8,
             channels_mlp_dim=32)


def _model(**kw):
  return models.MlpMixer(**{**_TINY, **kw})


def _images(n=4, size=16, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=-1, maxval=1)


def _released_params(seed=0):
  """Released-layout params with a non-zero head (the default head is zero-initialised)."""
  params = nn.unbox(jax.jit(_model().init)(jax.random.key(seed), _images())['params'])
  params['head']['kernel'] = jax.random.normal(jax.random.key(seed + 1),
                                               params['head']['kernel'].shape)
  return params


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, images):
  return model.apply({'params': params}, images)


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(model, params, images, labels):
  return jax.value_and_grad(_loss, argnums=1)(model, params, images, labels)


def _loss(model, params, images, labels):
  logits = model.apply({'params': params}, images, train=True,
                       rngs={'dropout': jax.random.key(3)})
  return jnp.mean(jnp.sum(-jax.nn.log_softmax(logits) * labels, axis=-1))


def test_scanned_init_has_stacked_params_with_layers_axis():
  variables = jax.jit(_model(scan_blocks=True).init)(jax.random.key(0), _images())
  boxed = variables['params']
  assert sorted(boxed) == ['MixerBlocks', 'head', 'pre_head_layer_norm', 'stem']
  kernel = boxed['MixerBlocks']['token_mixing']['Dense_0']['kernel']
  assert kernel.value.shape == (3, 16, 8)  # [layers, tokens S, token_mlp D_S]
  assert kernel.names == ('layers', 'tokens', 'token_mlp')
  # Each layer gets its own initialisation (split_rngs), not one copy stacked.
  assert not np.allclose(kernel.value[0], kernel.value[1])


@pytest.mark.parametrize('remat', ['none', 'full', 'dots'])
def test_scanned_and_unscanned_give_same_logits_and_grads(remat):
  released = _released_params()
  scanned = param_layout.to_scanned(released, num_blocks=3)
  images = _images()
  labels = jax.nn.one_hot(jnp.arange(4) % 5, 5)
  plain, scan = _model(), _model(scan_blocks=True, remat=remat)

  logits = _apply(plain, released, images)
  np.testing.assert_allclose(_apply(scan, scanned, images), logits,
                             rtol=1e-5, atol=1e-5)
  assert float(jnp.std(logits)) > 0.1  # A real comparison, not of two constant outputs.

  loss, grads = _loss_and_grads(plain, released, images, labels)
  scan_loss, scan_grads = _loss_and_grads(scan, scanned, images, labels)
  np.testing.assert_allclose(scan_loss, loss, rtol=1e-5)
  scan_grads = param_layout.to_released(scan_grads)
  assert jax.tree.structure(scan_grads) == jax.tree.structure(grads)
  for (path, g), s in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(scan_grads)):
    np.testing.assert_allclose(s, g, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  block_grad = grads['MixerBlock_0']['token_mixing']['Dense_0']['kernel']
  assert float(jnp.abs(block_grad).max()) > 0  # Gradients reach the first block.


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_unscanned_keeps_released_layout_and_grads(remat):
  released = _released_params()
  images, labels = _images(), jax.nn.one_hot(jnp.arange(4) % 5, 5)
  _, grads = _loss_and_grads(_model(), released, images, labels)
  _, remat_grads = _loss_and_grads(_model(remat=remat), released, images, labels)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               remat_grads, grads)


def test_stochastic_depth_under_scan_drops_branches_in_training_only():
  released = _released_params()
  scanned = param_layout.to_scanned(released)
  model = _model(scan_blocks=True, stoch_depth=0.9)
  images = _images(n=16)
  evaluation = _apply(model, scanned, images)
  np.testing.assert_allclose(evaluation, _apply(_model(stoch_depth=0.9), released, images),
                             rtol=1e-5, atol=1e-5)
  rngs = {'dropout': jax.random.key(1)}
  trained = jax.jit(lambda p, x: model.apply({'params': p}, x, train=True, rngs=rngs))(
      scanned, images)
  assert not np.allclose(trained, evaluation, atol=1e-3)  # Some branches were dropped.
  # The first block's rate is 0 and the last's is 0.9 (linear, as unscanned).
  assert models.drop_path_rate(0.9, 0, 3) == 0.0
  assert models.drop_path_rate(0.9, 2, 3) == pytest.approx(0.9)


@pytest.mark.parametrize('remat', ['none', 'dots'])
def test_stochastic_depth_drops_the_same_branches_scanned_or_not(remat):
  """The masks are drawn once, before the blocks: the same rng drops the same branches."""
  released = _released_params()
  images, rngs = _images(n=16), {'dropout': jax.random.key(1)}
  unscanned = _model(stoch_depth=0.9, remat=remat).apply(
      {'params': released}, images, train=True, rngs=rngs)
  scanned = _model(scan_blocks=True, stoch_depth=0.9, remat=remat).apply(
      {'params': param_layout.to_scanned(released)}, images, train=True, rngs=rngs)
  np.testing.assert_allclose(scanned, unscanned, rtol=1e-5, atol=1e-5)
  assert not np.allclose(unscanned, _apply(_model(), released, images), atol=1e-3)


def test_round_trip_is_bit_exact_for_numpy_and_jax_trees():
  released = jax.tree.map(np.asarray, _released_params())
  scanned = param_layout.to_scanned(released, num_blocks=3)
  assert param_layout.is_scanned(scanned) and not param_layout.is_scanned(released)
  assert isinstance(scanned['MixerBlocks']['LayerNorm_0']['scale'], np.ndarray)
  back = param_layout.to_released(scanned)
  assert jax.tree.structure(back) == jax.tree.structure(released)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(released)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  # Jax arrays (e.g. params on devices) convert too, and conversions are idempotent.
  jax_scanned = param_layout.to_scanned(jax.tree.map(jnp.asarray, released))
  assert param_layout.to_scanned(jax_scanned) is jax_scanned
  assert param_layout.to_released(released) is released
  for a, b in zip(jax.tree.leaves(param_layout.to_released(jax_scanned)),
                  jax.tree.leaves(released)):
    assert np.array_equal(np.asarray(a), b)


def test_scanned_tree_matches_a_scanned_model_init():
  scanned = param_layout.to_scanned(_released_params())
  shapes = jax.eval_shape(_model(scan_blocks=True).init, jax.random.key(0), _images())
  expected = jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(shapes['params']))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), scanned) == expected


def test_to_scanned_rejects_wrong_depth_and_gaps():
  released = _released_params()
  with pytest.raises(ValueError, match='expected MixerBlock_0..MixerBlock_3'):
    param_layout.to_scanned(released, num_blocks=4)
  del released['MixerBlock_1']
  with pytest.raises(ValueError, match='Cannot stack'):
    param_layout.to_scanned(released)


def test_get_model_and_bad_remat():
  model = models.get_model('Mixer-B_16', num_classes=10, scan_blocks=True, remat='dots')
  assert model.scan_blocks and model.remat == 'dots'
  with pytest.raises(ValueError, match="remat='some'"):
    _model(remat='some').init(jax.random.key(0), _images())


def test_layers_axis_is_replicated_and_fsdp_splits_embed():
  from mixer import config_lib
  config = config_lib.base_config()
  rules = sharding.logical_rules(config)
  assert ('layers', None) in rules
  boxed = jax.eval_shape(_model(scan_blocks=True).init, jax.random.key(0), _images())['params']
  mesh = jax.make_mesh((1, 1, 1), sharding.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  shardings = sharding.param_shardings(boxed, mesh, rules)
  spec = shardings['MixerBlocks']['channel_mixing']['Dense_0']['kernel'].spec
  assert tuple(spec) == (None, 'fsdp', 'model')
