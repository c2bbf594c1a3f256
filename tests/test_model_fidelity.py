"""Where mixer.models follows big_vision's Mixer: stochastic depth and precision.

Stochastic depth keeps branches unscaled (big_vision/models/mlp_mixer.py
multiplies by a 0/1 mask), with timm's 1/(1-p) rescale as an option; a bf16
model keeps its residual stream, LayerNorm statistics and logits in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer import models
from tests.conftest import random_params, relative_error
from tests.test_models import _param_shapes, _sample_photos

_SMALL = dict(num_classes=5, patch_size=4, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8,
              channels_mlp_dim=32)


@pytest.mark.parametrize('rescale', [False, True])
def test_stochastic_depth_drops_or_keeps_branches(rescale):
  x = jnp.ones([256, 3, 2])
  out = models.StochasticDepth(0.25, rescale).apply(
      {}, x, train=True, rngs={'dropout': jax.random.key(0)})
  per_example = np.asarray(out)[:, 0, 0]
  kept_value = 1 / 0.75 if rescale else 1.0
  kept = per_example != 0
  np.testing.assert_allclose(per_example[kept], kept_value, rtol=1e-6)
  assert 0.15 < np.mean(per_example == 0) < 0.35  # About a quarter dropped.
  np.testing.assert_array_equal(
      models.StochasticDepth(0.25, rescale).apply({}, x, train=False), x)


@pytest.mark.parametrize('scan_blocks', [False, True], ids=['loop', 'scan'])
def test_model_stochastic_depth_rescale_is_an_option(scan_blocks):
  # Block 0 has rate 0, block 1 rate 0.5. Without rescaling, an example whose
  # block-1 branches are both kept gives exactly the eval logits; with timm's
  # rescale its kept branches are doubled, so no example matches the eval logits.
  images = jnp.asarray(np.repeat(_sample_photos(16)[:1], 32, axis=0))
  results = {}
  for rescale in (False, True):
    model = models.MlpMixer(**_SMALL, stoch_depth=0.5, stoch_depth_rescale=rescale,
                            scan_blocks=scan_blocks)
    params = random_params(_param_shapes(model, 16), seed=2)
    eval_logits = model.apply({'params': params}, images[:1], train=False)
    train_logits = model.apply({'params': params}, images, train=True,
                               rngs={'dropout': jax.random.key(3)})
    results[rescale] = np.isclose(train_logits, eval_logits, rtol=1e-6, atol=1e-6).all(-1)
  assert results[False].sum() >= 3, results[False]
  assert results[True].sum() == 0, results[True]


def test_bf16_model_keeps_residual_stream_and_logits_in_float32():
  f32 = models.MlpMixer(**_SMALL)
  bf16 = f32.clone(dtype=jnp.bfloat16)
  params = random_params(_param_shapes(f32, 16), seed=4)
  images = _sample_photos(16)
  logits, state = bf16.apply({'params': params}, images, train=False,
                             capture_intermediates=True)
  assert logits.dtype == jnp.float32
  captured = state['intermediates']
  for name in ('MixerBlock_0', 'MixerBlock_1', 'pre_head_layer_norm', 'head'):
    assert captured[name]['__call__'][0].dtype == jnp.float32, name
  # The matmuls themselves run in bf16.
  token_mlp = captured['MixerBlock_0']['token_mixing']['Dense_0']['__call__'][0]
  assert token_mlp.dtype == jnp.bfloat16
  reference = f32.apply({'params': params}, images, train=False)
  assert np.std(reference) > 0.1
  # Measured 0.0036 here; 0.0084 with the residual stream, pre-head LayerNorm and
  # head in bf16 (the previous code).
  assert relative_error(logits, reference) < 6e-3
  prelogits = bf16.apply({'params': params}, images, train=False, return_prelogits=True)
  assert prelogits.dtype == jnp.float32
