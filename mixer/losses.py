"""Per-example classification losses, selected by `config.loss`.

Labels are float `[N, C]` targets: one-hot, multi-hot (ImageNet-21k images can
have several labels) or mixup-soft rows. Both losses return one value per
example, `[N]`, so the trainer can weight padded examples by their mask before
averaging.

- `softmax_xent`: -sum_c labels_c * log_softmax(logits)_c. With soft labels
  (mixup) this is the cross-entropy against the soft distribution.
- `sigmoid_xent`: sum over classes of the binary cross-entropy of each class,
  as big_vision's `sigmoid_xent` (used there for ImageNet-1k and -21k
  pre-training, with a negative initial head bias). Summed, not averaged, over
  classes, so its scale grows with the number of classes like big_vision's.

Both compute in float32 whatever the logits dtype (bfloat16 logits under mixed
precision) and use `log_softmax` / `log_sigmoid`, which stay finite for large
logits.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def softmax_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy per example.

  Args:
    logits: `[N, C]`, any float dtype.
    labels: `[N, C]` float targets (one-hot, mixup-soft or multi-hot). Each row
      is normalised to sum to 1, so a multi-hot row (several true classes, as in
      ImageNet-21k or JFT) is a uniform target over its classes; an all-zero
      row (no label) gives loss 0.

  Returns:
    `[N]` float32 losses.
  """
  _check_shapes(logits, labels)
  labels = labels.astype(jnp.float32)
  labels = labels / jnp.maximum(jnp.sum(labels, axis=-1, keepdims=True), 1e-12)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(labels * log_probs, axis=-1)


def sigmoid_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Independent per-class sigmoid cross-entropy, summed over classes.

  Args:
    logits: `[N, C]`, any float dtype.
    labels: `[N, C]` float targets in [0, 1] (multi-hot or mixup-soft).

  Returns:
    `[N]` float32 losses.
  """
  _check_shapes(logits, labels)
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  per_class = (labels * jax.nn.log_sigmoid(logits)
               + (1.0 - labels) * jax.nn.log_sigmoid(-logits))
  return -jnp.sum(per_class, axis=-1)


LOSSES: dict[str, LossFn] = {
    'softmax_xent': softmax_xent,
    'sigmoid_xent': sigmoid_xent,
}


def get_loss_fn(name: str) -> LossFn:
  """Returns the per-example loss function called `name` (`config.loss`)."""
  try:
    return LOSSES[name]
  except KeyError:
    raise ValueError(f'Unknown config.loss {name!r}; use one of {sorted(LOSSES)}.') from None


def _check_shapes(logits, labels):
  # A [N] integer label vector broadcasts silently against [N, C] logits and
  # gives a wrong loss, so insist on the one-hot form here.
  if logits.shape != labels.shape:
    raise ValueError(
        f'logits {logits.shape} and labels {labels.shape} must have the same [N, C] '
        'shape; pass one-hot/multi-hot float labels (e.g. jax.nn.one_hot(y, C)).')
