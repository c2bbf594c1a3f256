"""Learning-rate schedules and optimizers of the MLP-Mixer paper, built from the config.

Config keys read here (see `mixer.config_lib`): `optimizer`, `lr`,
`weight_decay`, `warmup_steps`, `total_steps`, `decay_type`, `linear_end`,
`grad_clip_norm`, `momentum`, `mu_dtype`.

Schedule
--------
`make_schedule` gives the learning rate for the update with 0-based index
`step` (= the number of updates already applied):

  lr_t = lr * min(1, step / warmup_steps) * decay(progress),
  progress = clip((step - warmup_steps) / (total_steps - warmup_steps), 0, 1),

with `decay_type='linear'` going from `lr` down to `linear_end` (an absolute
learning rate, as in vision_transformer; big_vision's `linear_end` is relative
to `lr` instead) and `decay_type='cosine'` going from `lr` down to 0. The first
update (step 0) therefore has learning rate 0 when there is a warmup, as in
vision_transformer and big_vision.

Optimizers
----------
'adam' (pre-training, paper §3 and App. B):

  clip_by_global_norm(grad_clip_norm)               # skipped if None or 0
  scale_by_adam(b1=0.9, b2=0.999, eps=1e-8, mu_dtype)
  masked(add_decayed_weights(weight_decay), kernels only)   # skipped if 0
  scale_by_learning_rate(schedule)                  # multiplies by -lr_t

'momentum' (fine-tuning, paper §3 "Fine-tuning"; vision_transformer's
`optax.sgd(lr_fn, momentum=0.9, accumulator_dtype='bfloat16')`):

  clip_by_global_norm(grad_clip_norm)               # skipped if None or 0
  trace(decay=momentum, accumulator_dtype=mu_dtype)
  scale_by_learning_rate(schedule)

The paper fine-tunes without weight decay, so 'momentum' with a non-zero
`weight_decay` is rejected rather than silently ignored.

How the paper's weight decay maps onto optax
--------------------------------------------
The paper's values (wd=0.1 with lr=1e-3 on ImageNet/ImageNet-21k, wd=0.03 with
lr=3e-3 or 1e-3 on JFT) come from the old `flax.optim.Adam`, whose decay is
coupled to the (scheduled) learning rate:

  param <- param - lr_t * (adam_update + wd * param)

In optax that is `add_decayed_weights(wd)` placed *before*
`scale_by_learning_rate(schedule)`, exactly what `optax.adamw(schedule,
weight_decay=wd, mask=...)` does. So `config.weight_decay` holds the paper's
number directly (0.1, 0.03), and the decay per step is lr_t * wd (1e-4 at the
peak for lr=1e-3, wd=0.1).

big_vision writes the same thing in "decoupled" form: decay added *after* the
peak `lr` was applied and multiplied only by the relative schedule s_t = lr_t/lr,

  param <- param - s_t * (lr * adam_update + wd_bv * param),

so wd_bv = lr * wd_paper; big_vision's `wd=1e-4` in `mlp_mixer_i1k.py` is the
paper's 0.1 at lr=1e-3. Do not put a big_vision `wd` into `config.weight_decay`
(it would be 1000x too weak), nor the paper's value into a decoupled optimizer
(1000x too strong).

Like big_vision (`.*/kernel$`) the decay touches only parameters whose name is
`kernel` (Dense and Conv weights), never biases or LayerNorm scales/biases.

Optimizer state
---------------
`make_optimizer(config).init(params)` returns the `optax.chain` tuple state, one
entry per stage listed above (skipped stages are `optax.EmptyState()`):
'adam': (clip, ScaleByAdamState(count, mu, nu), MaskedState or EmptyState,
ScaleByScheduleState(count)); 'momentum': (clip, TraceState(trace),
ScaleByScheduleState(count)). `step_from_opt_state` reads the update count back.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.core import meta as flax_meta

OPTIMIZERS = ('adam', 'momentum')
DECAY_TYPES = ('linear', 'cosine')
# `mu_dtype` values accepted: None keeps the parameter dtype (float32).
MU_DTYPES = (None, 'float32', 'bfloat16')

# Adam hyper-parameters of the paper (App. B); not config keys on purpose.
ADAM_B1 = 0.9
ADAM_B2 = 0.999
ADAM_EPS = 1e-8


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Returns step -> learning rate: linear warmup, then linear or cosine decay.

  Args:
    config: reads `lr`, `warmup_steps`, `total_steps`, `decay_type` and, for
      'linear', `linear_end` (absolute learning rate at `total_steps`).

  Returns:
    A function of the 0-based update index (Python int or jax scalar, traceable)
    returning a float32 learning rate.
  """
  base_lr = float(config.lr)
  warmup_steps = int(config.warmup_steps)
  total_steps = int(config.total_steps)
  decay_type = config.decay_type
  if decay_type not in DECAY_TYPES:
    raise ValueError(f'Unknown config.decay_type {decay_type!r}; '
                     f'use one of {DECAY_TYPES}.')
  if warmup_steps < 0:
    raise ValueError(f'config.warmup_steps must be >= 0, got {warmup_steps}.')
  if total_steps <= warmup_steps:
    raise ValueError(
        f'config.total_steps ({total_steps}) must be larger than '
        f'config.warmup_steps ({warmup_steps}); lower the warmup or train longer.')
  linear_end = float(config.linear_end) if decay_type == 'linear' else 0.0

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
    if decay_type == 'linear':
      lr = linear_end + (base_lr - linear_end) * (1.0 - progress)
    else:
      lr = base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    if warmup_steps:
      lr = lr * jnp.minimum(1.0, step / warmup_steps)
    return lr

  return schedule


def learning_rate_at(config: ml_collections.ConfigDict, step) -> float:
  """The learning rate of update `step` (0-based), as a Python float, for logging."""
  return float(make_schedule(config)(step))


def kernel_mask(params: Any) -> Any:
  """A tree of bools like `params`: True where the parameter name is `kernel`.

  Works on plain param trees and on trees of flax `nn.Partitioned` boxes (the
  box counts as one leaf, so the mask is a prefix of the boxed tree).
  """
  def is_kernel(path, _):
    names = [_key_name(k) for k in path]
    # Skip the `.value` attribute of a flax box to reach the parameter name.
    names = [n for n in names if n != 'value'] or ['']
    return names[-1] == 'kernel'
  return jax.tree_util.tree_map_with_path(is_kernel, params, is_leaf=_is_box)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Builds the optimizer named by `config.optimizer`, schedule included.

  See the module docstring for the exact chains and the weight-decay semantics.

  Args:
    config: a training config (keys listed in the module docstring).

  Returns:
    An `optax.GradientTransformation` whose `update(grads, state, params)` needs
    `params` (for the weight decay).
  """
  name = config.optimizer
  if name not in OPTIMIZERS:
    raise ValueError(f'Unknown config.optimizer {name!r}; use one of {OPTIMIZERS}.')
  mu_dtype = _mu_dtype(config.mu_dtype)
  weight_decay = float(config.weight_decay or 0.0)
  if weight_decay < 0:
    raise ValueError(f'config.weight_decay must be >= 0, got {weight_decay}.')
  schedule = make_schedule(config)

  stages = [_clip(config.grad_clip_norm)]
  if name == 'adam':
    stages.append(optax.scale_by_adam(b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS,
                                      mu_dtype=mu_dtype))
    if weight_decay:
      # Before the learning rate: lr-coupled decay, the paper's semantics.
      stages.append(optax.masked(optax.add_decayed_weights(weight_decay), kernel_mask))
    else:
      stages.append(optax.identity())
  else:  # 'momentum'
    if weight_decay:
      raise ValueError(
          f'config.weight_decay={weight_decay} with optimizer "momentum": the paper '
          'fine-tunes without weight decay and this optimizer has none. Set '
          'config.weight_decay = 0.0, or use optimizer "adam".')
    stages.append(optax.trace(decay=float(config.momentum), nesterov=False,
                              accumulator_dtype=mu_dtype))
  stages.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*stages)


def global_norm(tree: Any) -> jax.Array:
  """L2 norm over all leaves of `tree`, in float32 (for logging grad/param norms)."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def step_from_opt_state(opt_state: Any) -> jax.Array:
  """The number of updates applied so far, read from the schedule's counter."""
  for state in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState)):
    if isinstance(state, optax.ScaleByScheduleState):
      return state.count
  raise ValueError('No optax.ScaleByScheduleState in this optimizer state; was it '
                   'built by mixer.optim.make_optimizer?')


def _clip(grad_clip_norm) -> optax.GradientTransformation:
  if not grad_clip_norm:
    return optax.identity()
  if grad_clip_norm < 0:
    raise ValueError(f'config.grad_clip_norm must be > 0 (or None/0 for no clipping), '
                     f'got {grad_clip_norm}.')
  return optax.clip_by_global_norm(float(grad_clip_norm))


def _mu_dtype(name):
  if name not in MU_DTYPES:
    raise ValueError(f'Unknown config.mu_dtype {name!r}; use one of {MU_DTYPES}.')
  return None if name is None else jnp.dtype(name)


def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _is_box(x) -> bool:
  return isinstance(x, flax_meta.AxisMetadata)
