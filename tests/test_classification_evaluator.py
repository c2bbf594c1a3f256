"""Top-1, top-5 and loss: masked padding counts nothing, each example once."""

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


def _batch(logits, labels, mask):
  images = np.zeros((len(logits), 1, logits.shape[1], 3), np.float32)
  images[:, 0, :, 0] = logits
  return {'image': images, 'labels': labels.astype(np.float32), 'mask': np.asarray(mask)}


def _evaluator(loss_fn, mesh, data, name='eval'):
  return classification.ClassificationEvaluator(name, 0, FixedLogits(), loss_fn, mesh, data)


@pytest.fixture
def mesh():
  return sharding.create_mesh(ml_collections.ConfigDict({'mesh': {'data': -1}}))


def test_accuracy_loss_and_top5_with_padding(mesh):
  eye = np.eye(7)
  logits = np.array([[7, 6, 5, 4, 3, 2, 1]] * 4, np.float32)
  # Top-1 hit, top-5 hit only (class 4), miss (class 6 is 7th), padding (masked).
  labels = eye[[0, 4, 6, 0]]
  second_logits = np.array([[1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1]], np.float32)
  second = _batch(second_logits, eye[[6, 1]], [True, False])
  data = [_batch(logits, labels, [True, True, True, False]), second]
  results = _evaluator(losses.softmax_xent, mesh, data).run({})

  valid_logits = np.concatenate([logits[:3], second_logits[:1]])
  valid_labels = np.concatenate([labels[:3], eye[[6]]])
  log_probs = valid_logits - np.log(np.exp(valid_logits).sum(-1, keepdims=True))
  expected_loss = -np.mean(np.sum(valid_labels * log_probs, -1))
  assert set(results) == {'eval/loss', 'eval/accuracy', 'eval/top5_accuracy'}
  assert results['eval/accuracy'] == pytest.approx(2 / 4)
  assert results['eval/top5_accuracy'] == pytest.approx(3 / 4)
  assert results['eval/loss'] == pytest.approx(expected_loss, rel=1e-5)


def test_multi_label_top1_counts_any_true_class(mesh):
  logits = np.array([[0, 5, 0], [0, 0, 5]], np.float32)
  labels = np.array([[1, 1, 0], [1, 1, 0]])
  results = _evaluator(losses.sigmoid_xent, mesh, [_batch(logits, labels, [True, True])],
                       name='real').run({})
  assert results['real/accuracy'] == pytest.approx(0.5)
  # Fewer than 5 classes: top-5 is top-3, every example hits.
  assert results['real/top5_accuracy'] == pytest.approx(1.0)


def test_empty_eval_data_is_a_clear_error(mesh):
  with pytest.raises(ValueError, match='config.evals.eval'):
    _evaluator(losses.softmax_xent, mesh, []).run({})
