"""Tests for mixer.optim: schedules, weight-decay semantics, mu dtype, clipping, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mixer import config_lib, optim


def _config(**overrides):
  config = config_lib.base_config()
  config.update({'lr': 1e-3, 'warmup_steps': 10, 'total_steps': 110, 'linear_end': 1e-5,
                 'weight_decay': 0.0, 'grad_clip_norm': 1.0})
  config.update(overrides)
  return config


def _params():
  # Names as in the Mixer tree: kernels decay; biases and LayerNorm params do not.
  return {
      'stem': {'kernel': jnp.full((2, 2, 3, 4), 2.0), 'bias': jnp.full((4,), 3.0)},
      'MixerBlock_0': {
          'LayerNorm_0': {'scale': jnp.full((4,), 1.5), 'bias': jnp.full((4,), 0.5)},
          'token_mixing': {'Dense_0': {'kernel': jnp.full((4, 8), -1.0),
                                       'bias': jnp.full((8,), 1.0)}},
      },
      'head': {'kernel': jnp.full((4, 10), 0.25), 'bias': jnp.full((10,), -6.9)},
  }


@pytest.mark.parametrize('decay_type', ['linear', 'cosine'])
def test_schedule_warmup_peak_end(decay_type):
  config = _config(decay_type=decay_type)
  schedule = optim.make_schedule(config)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(schedule(5), 0.5e-3, rtol=1e-6)
  np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-6)
  end = 1e-3 * 1e-5 if decay_type == 'linear' else 0.0  # linear_end is relative to the peak.
  np.testing.assert_allclose(schedule(110), end, rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(schedule(10_000), end, rtol=1e-5, atol=1e-12)  # Clipped.
  mid = end + (1e-3 - end) * 0.5 if decay_type == 'linear' else 0.5e-3
  np.testing.assert_allclose(schedule(60), mid, rtol=1e-5)


@pytest.mark.parametrize('decay_type', ['linear', 'cosine'])
@pytest.mark.parametrize('warmup_steps', [0, 7])
def test_optax_schedule_equals_big_vision_formula(decay_type, warmup_steps):
  # big_vision utils.create_learning_rate_schedule, written out: the optax
  # schedules we build must give the same value at every step.
  config = _config(decay_type=decay_type, warmup_steps=warmup_steps, total_steps=50,
                   linear_end=0.01)
  schedule = optim.make_schedule(config)
  for step in range(0, 60):
    progress = min(max((step - warmup_steps) / (50 - warmup_steps), 0.0), 1.0)
    if decay_type == 'linear':
      expected = 1e-3 * (0.01 + (1 - 0.01) * (1 - progress))
    else:
      expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * progress))
    if warmup_steps:
      expected *= min(1.0, step / warmup_steps)
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-10)


def test_evaluate_only_schedule_is_zero():
  assert float(optim.make_schedule(_config(total_steps=0))(0)) == 0.0


def test_cosine_shape_and_no_warmup():
  schedule = optim.make_schedule(_config(decay_type='cosine', warmup_steps=0, total_steps=100))
  np.testing.assert_allclose(schedule(0), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(schedule(25), 1e-3 * 0.5 * (1 + math.cos(math.pi / 4)), rtol=1e-5)
  # Traceable: the optimizer calls it with a jax counter inside jit.
  np.testing.assert_allclose(jax.jit(schedule)(jnp.int32(50)), 0.5e-3, rtol=1e-5)


def test_schedule_errors():
  with pytest.raises(ValueError, match='decay_type'):
    optim.make_schedule(_config(decay_type='rsqrt'))
  with pytest.raises(ValueError, match='total_steps'):
    optim.make_schedule(_config(warmup_steps=100, total_steps=100))


def test_kernel_mask():
  mask = optim.kernel_mask(_params())
  assert mask['stem'] == {'kernel': True, 'bias': False}
  assert mask['MixerBlock_0']['LayerNorm_0'] == {'scale': False, 'bias': False}
  assert mask['MixerBlock_0']['token_mixing']['Dense_0'] == {'kernel': True, 'bias': False}


@pytest.mark.parametrize('step', [0, 3])
def test_weight_decay_is_lr_coupled_and_kernels_only(step):
  """With zero gradients Adam's update is 0, so kernels move by exactly -lr_t * wd * p."""
  config = _config(weight_decay=0.1, warmup_steps=5, decay_type='linear')
  tx = optim.make_optimizer(config)
  params = _params()
  state = tx.init(params)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  for _ in range(step):  # Advance the schedule into the warmup.
    _, state = tx.update(zeros, state, params)
  updates, state = tx.update(zeros, state, params)
  new_params = optax.apply_updates(params, updates)
  lr_t = float(optim.make_schedule(config)(step))
  mask = optim.kernel_mask(params)

  def check(path, old, new, is_kernel):
    expected = old * (1 - lr_t * 0.1) if is_kernel else old
    np.testing.assert_allclose(new, expected, rtol=1e-6, err_msg=jax.tree_util.keystr(path))

  jax.tree_util.tree_map_with_path(check, params, new_params, mask)
  if step:  # Something really moved (at step 0 the warmup lr is 0).
    assert float(new_params['head']['kernel'][0, 0]) < 0.25
  assert int(state[-1].count) == step + 1


def test_adam_matches_optax_adamw():
  """The documented equivalence: same chain as optax.adamw with a kernel mask."""
  config = _config(weight_decay=0.03, grad_clip_norm=None)
  params = _params()
  grads = jax.tree_util.tree_map(lambda p: jnp.sin(p + 1.0), params)
  schedule = optim.make_schedule(config)
  ours, ref = optim.make_optimizer(config), optax.adamw(
      schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.03, mask=optim.kernel_mask)
  s1, s2 = ours.init(params), ref.init(params)
  for _ in range(15):
    u1, s1 = ours.update(grads, s1, params)
    u2, s2 = ref.update(grads, s2, params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12),
                           u1, u2)


def test_mu_dtype_bfloat16():
  params = _params()
  adam_state = optim.make_optimizer(_config(mu_dtype='bfloat16')).init(params)
  mu_dtypes = {x.dtype for x in jax.tree_util.tree_leaves(adam_state[1].mu)}
  nu_dtypes = {x.dtype for x in jax.tree_util.tree_leaves(adam_state[1].nu)}
  assert mu_dtypes == {jnp.dtype(jnp.bfloat16)}
  assert nu_dtypes == {jnp.dtype(jnp.float32)}  # Only the first moment is halved.

  sgd = optim.make_optimizer(_config(optimizer='momentum', mu_dtype='bfloat16'))
  trace_state = sgd.init(params)[1]
  assert {x.dtype for x in jax.tree_util.tree_leaves(trace_state.trace)} == {
      jnp.dtype(jnp.bfloat16)}

  default = optim.make_optimizer(_config()).init(params)[1]
  assert {x.dtype for x in jax.tree_util.tree_leaves(default.mu)} == {jnp.dtype(jnp.float32)}


def test_clipping_caps_a_huge_gradient():
  params = {'w': {'kernel': jnp.ones((3,))}}
  grads = {'w': {'kernel': jnp.array([3e6, 4e6, 0.0])}}
  # SGD without momentum and a constant lr exposes the clipped gradient directly.
  config = _config(optimizer='momentum', momentum=0.0, lr=1.0, warmup_steps=0,
                   decay_type='linear', linear_end=1.0, grad_clip_norm=1.0)
  tx = optim.make_optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-6)
  np.testing.assert_allclose(updates['w']['kernel'], [-0.6, -0.8, 0.0], rtol=1e-6)

  # Without clipping the update is the raw gradient.
  config.grad_clip_norm = None
  tx = optim.make_optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), 5e6, rtol=1e-6)


def test_momentum_accumulates():
  params = {'kernel': jnp.zeros((2,))}
  grads = {'kernel': jnp.ones((2,))}
  config = _config(optimizer='momentum', momentum=0.9, lr=0.1, warmup_steps=0,
                   decay_type='linear', linear_end=1.0, grad_clip_norm=None)  # Constant lr.
  tx = optim.make_optimizer(config)
  state = tx.init(params)
  _, state = tx.update(grads, state, params)
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(updates['kernel'], -0.1 * 1.9, rtol=1e-6)


def test_errors():
  with pytest.raises(ValueError, match='weight_decay.*momentum'):
    optim.make_optimizer(_config(optimizer='momentum', weight_decay=0.1))
  with pytest.raises(ValueError, match=r"Unknown config.optimizer 'lamb'.*adam.*momentum"):
    optim.make_optimizer(_config(optimizer='lamb'))
  with pytest.raises(ValueError, match='mu_dtype'):
    optim.make_optimizer(_config(mu_dtype='float16'))
