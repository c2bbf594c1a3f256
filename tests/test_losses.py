"""Tests for mixer.losses against plain numpy references."""

import jax.numpy as jnp
import numpy as np
import pytest

from mixer import losses


def _np_softmax_xent(logits, labels):
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  return -(labels * log_probs).sum(axis=1)


def _np_sigmoid_xent(logits, labels):
  logits = logits.astype(np.float64)
  probs = 1.0 / (1.0 + np.exp(-logits))
  return -(labels * np.log(probs) + (1 - labels) * np.log(1 - probs)).sum(axis=1)


def _logits(n=6, c=5, seed=0):
  return np.random.default_rng(seed).normal(scale=3.0, size=(n, c)).astype(np.float32)


def test_softmax_xent_one_hot():
  logits = _logits()
  labels = np.eye(5, dtype=np.float32)[[0, 1, 2, 3, 4, 0]]
  loss = losses.softmax_xent(jnp.asarray(logits), jnp.asarray(labels))
  assert loss.shape == (6,) and loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, _np_softmax_xent(logits, labels), rtol=1e-5)


def test_softmax_xent_mixup_soft_labels():
  logits = _logits()
  one_hot = np.eye(5, dtype=np.float32)[[0, 1, 2, 3, 4, 0]]
  soft = 0.7 * one_hot + 0.3 * one_hot[::-1]  # Mixup of the batch with its reverse.
  loss = losses.softmax_xent(jnp.asarray(logits), jnp.asarray(soft))
  np.testing.assert_allclose(loss, _np_softmax_xent(logits, soft), rtol=1e-5)
  # Linear in the labels: mixing labels mixes the losses.
  mixed = (0.7 * losses.softmax_xent(logits, one_hot)
           + 0.3 * losses.softmax_xent(logits, one_hot[::-1]))
  np.testing.assert_allclose(loss, mixed, rtol=1e-5)


def test_sigmoid_xent_multi_hot():
  logits = _logits()
  multi_hot = np.zeros((6, 5), np.float32)
  multi_hot[0, [0, 3]] = 1
  multi_hot[1, 1] = 1
  multi_hot[2, [1, 2, 4]] = 1
  multi_hot[4] = 0.5  # Soft targets too.
  loss = losses.sigmoid_xent(jnp.asarray(logits), jnp.asarray(multi_hot))
  assert loss.shape == (6,) and loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, _np_sigmoid_xent(logits, multi_hot), rtol=1e-5)


def test_stable_for_large_logits_and_bfloat16():
  logits = jnp.array([[1000.0, -1000.0, 0.0]], jnp.bfloat16)
  labels = jnp.array([[0.0, 1.0, 0.0]])
  for fn in (losses.softmax_xent, losses.sigmoid_xent):
    loss = fn(logits, labels)
    assert loss.dtype == jnp.float32
    assert np.isfinite(np.asarray(loss)).all()
  np.testing.assert_allclose(losses.softmax_xent(logits, labels), [2000.0], rtol=1e-3)
  np.testing.assert_allclose(losses.sigmoid_xent(logits, labels), [2000.0 + np.log(2)],
                             rtol=1e-3)


def test_get_loss_fn():
  assert losses.get_loss_fn('softmax_xent') is losses.softmax_xent
  assert losses.get_loss_fn('sigmoid_xent') is losses.sigmoid_xent
  with pytest.raises(ValueError, match=r"Unknown config.loss 'xent'.*sigmoid_xent.*softmax_xent"):
    losses.get_loss_fn('xent')


def test_rejects_integer_labels():
  with pytest.raises(ValueError, match='one-hot'):
    losses.softmax_xent(jnp.zeros((4, 3)), jnp.zeros((4,)))


def test_softmax_xent_multi_hot_is_a_uniform_target_and_empty_rows_are_zero():
  logits = np.random.default_rng(3).normal(size=(3, 4)).astype(np.float32)
  labels = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], np.float32)
  loss = np.asarray(losses.softmax_xent(jnp.asarray(logits), jnp.asarray(labels)))
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(loss[0], -(log_probs[0, 0] + log_probs[0, 2]) / 2, rtol=1e-5)
  assert loss[1] == 0.0
  np.testing.assert_allclose(loss[2], -log_probs[2, 1], rtol=1e-5)
