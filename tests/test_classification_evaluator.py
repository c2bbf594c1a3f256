"""Top-1, loss and ReaL accuracy: masked padding counts nothing, each example once."""

import flax.linen as nn
import ml_collections
import numpy as np
import pytest

from mixer import losses, sharding
from mixer.evaluators import classification


class FixedLogits(nn.Module):
  """Returns the logits stored in the image's first pixel row (the test controls them)."""

  @nn.compact
  def __call__(self, images, *, train=False):
    del train
    return images[:, 0, :, 0]


def _batch(logits, labels, mask, real=None):
  images = np.zeros((len(logits), 1, logits.shape[1], 3), np.float32)
  images[:, 0, :, 0] = logits
  batch = {'image': images, 'labels': labels.astype(np.float32), 'mask': np.asarray(mask)}
  if real is not None:
    batch['real_labels'] = real.astype(np.float32)
  return batch


@pytest.fixture
def mesh():
  return sharding.create_mesh(ml_collections.ConfigDict({'mesh': {'data': -1}}))


def test_accuracy_loss_and_real_with_padding(mesh):
  eye = np.eye(3)
  logits = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0]], np.float32)
  labels = eye[[0, 2, 2, 1]]      # correct, wrong, correct, padding (masked)
  real = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0], [0, 0, 0]])  # row 2 has no ReaL label
  second_logits = np.array([[0, 0, 5], [5, 0, 0]], np.float32)
  second = _batch(second_logits, eye[[2, 1]], [True, False], real=np.array([[0, 0, 1], [1, 0, 0]]))
  data = [_batch(logits, labels, [True, True, True, False], real=real), second]
  evaluator = classification.ClassificationEvaluator(
      FixedLogits(), losses.softmax_xent, mesh, data)
  results = evaluator.run({})

  valid_logits = np.concatenate([logits[:3], second_logits[:1]])
  valid_labels = np.concatenate([labels[:3], eye[[2]]])
  log_probs = valid_logits - np.log(np.exp(valid_logits).sum(-1, keepdims=True))
  expected_loss = -np.mean(np.sum(valid_labels * log_probs, -1))
  assert results['eval/accuracy'] == pytest.approx(3 / 4)
  assert results['eval/loss'] == pytest.approx(expected_loss, rel=1e-5)
  # ReaL: rows 0, 1 of batch one (row 2 has no ReaL labels) and row 0 of batch two.
  assert results['eval/real_accuracy'] == pytest.approx(3 / 3)


def test_multi_label_top1_counts_any_true_class(mesh):
  logits = np.array([[0, 5, 0], [0, 0, 5]], np.float32)
  labels = np.array([[1, 1, 0], [1, 1, 0]])
  evaluator = classification.ClassificationEvaluator(
      FixedLogits(), losses.sigmoid_xent, mesh, [_batch(logits, labels, [True, True])])
  assert evaluator.run({})['eval/accuracy'] == pytest.approx(0.5)


def test_empty_eval_data_is_a_clear_error(mesh):
  evaluator = classification.ClassificationEvaluator(
      FixedLogits(), losses.softmax_xent, mesh, [])
  with pytest.raises(ValueError, match='eval_split'):
    evaluator.run({})
