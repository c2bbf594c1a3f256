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

with `decay_type='linear'` going from `lr` down to `lr * linear_end` (relative
to the peak, as big_vision's `create_learning_rate_schedule` in `utils.py`:
`lr * (zero + (1 - zero) * (1 - progress))`; its Mixer configs use 1e-5, so a
run ends at 1e-5 of its peak) and `decay_type='cosine'` going from `lr` down to
0. Both are optax's own schedules (`linear_schedule`, `cosine_decay_schedule`,
`join_schedules`). The first
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
ScaleByScheduleState(count)).
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
  """Returns step -> learning rate: linear warmup, then linear or cosine decay (optax's).

  Args:
    config: reads `lr`, `warmup_steps`, `total_steps`, `decay_type` and, for
      'linear', `linear_end` (relative to `lr`, as big_vision's).

  Returns:
    A function of the 0-based update index (Python int or jax scalar, traceable).
    With `total_steps=0` (evaluate-only: no update is ever made) it is 0.
  """
  base_lr = float(config.lr)
  warmup_steps = int(config.warmup_steps)
  total_steps = int(config.total_steps)
  decay_type = config.decay_type
  if decay_type not in DECAY_TYPES:
    raise ValueError(f'Unknown config.decay_type {decay_type!r}; '
                     f'use one of {DECAY_TYPES}.')
  if not total_steps:
    return optax.constant_schedule(0.0)
  if warmup_steps < 0 or total_steps <= warmup_steps:
    raise ValueError(
        f'config.warmup_steps ({warmup_steps}) must be >= 0 and below config.total_steps '
        f'({total_steps}); lower the warmup or train longer.')
  decay_steps = total_steps - warmup_steps
  if decay_type == 'linear':
    decay = optax.linear_schedule(base_lr, base_lr * float(config.linear_end), decay_steps)
  else:
    decay = optax.cosine_decay_schedule(base_lr, decay_steps)
  if not warmup_steps:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, base_lr, warmup_steps), decay], [warmup_steps])


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
