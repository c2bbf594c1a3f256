"""Tests for mixer.evaluators.fewshot: the closed-form solve, the selection, real data."""

import logging

import numpy as np
import pytest
from sklearn import datasets as sk_datasets
from sklearn import linear_model

from mixer import evaluators
from mixer.evaluators import fewshot

L2_REG = 2.0 ** 10


@pytest.fixture(scope='module')
def digits():
  """scikit-learn digits: 8x8 pixels flattened as 64 features; 1000 train, 797 test."""
  data = sk_datasets.load_digits()
  x, y = data.data.astype(np.float32), data.target.astype(np.int64)
  return x[:1000], y[:1000], x[1000:], y[1000:]


def _augmented(x, mean, std):
  z = (x.astype(np.float64) - mean) / std
  return np.concatenate([z, np.full((len(x), 1), fewshot.BIAS_CONSTANT)], axis=1)


@pytest.mark.parametrize('shots', [1, 10])  # Dual form (10 < 65 dims), primal form (100 rows).
def test_solve_matches_independent_ridge(digits, shots):
  train_x, train_y, test_x, _ = digits
  idx = fewshot.select_shots(train_y, 10, shots, seed=0)
  x, y = train_x[idx], train_y[idx]
  weights, bias = fewshot.fit_least_squares(x, y, 10, L2_REG)
  ours = fewshot.scores(test_x, weights, bias)

  mean, std = x.astype(np.float64).mean(0), x.astype(np.float64).std(0) + 1e-5
  z, z_test = _augmented(x, mean, std), _augmented(test_x, mean, std)
  targets = 2.0 * np.eye(10)[y] - 1.0
  # (1) Least squares on the ridge-augmented system [z; sqrt(l2) I] w = [Y; 0].
  dim = z.shape[1]
  w_lstsq, *_ = np.linalg.lstsq(np.concatenate([z, np.sqrt(L2_REG) * np.eye(dim)]),
                                np.concatenate([targets, np.zeros((dim, 10))]), rcond=None)
  np.testing.assert_allclose(ours, z_test @ w_lstsq, atol=1e-6)
  # (2) scikit-learn Ridge, same penalty, no separate intercept (the bias is a feature).
  ridge = linear_model.Ridge(alpha=L2_REG, fit_intercept=False, solver='svd').fit(z, targets)
  np.testing.assert_allclose(ours, ridge.predict(z_test), atol=1e-6)


def test_select_shots_per_class():
  rng = np.random.default_rng(1)
  ids = rng.permutation(np.repeat(np.arange(4), [3, 8, 20, 0]))  # Class 3 is empty.
  for seed in range(3):
    picked = {k: fewshot.select_shots(ids, 4, k, seed) for k in (1, 5, 10)}
    for k, idx in picked.items():
      assert len(np.unique(idx)) == len(idx)
      counts = np.bincount(ids[idx], minlength=4)
      np.testing.assert_array_equal(counts, [min(k, 3), min(k, 8), k, 0])
    # Fewer shots with the same seed pick a subset (big_vision's prefix draw).
    assert set(picked[1]) <= set(picked[5]) <= set(picked[10])
    np.testing.assert_array_equal(picked[5], fewshot.select_shots(ids, 4, 5, seed))
  assert not np.array_equal(fewshot.select_shots(ids, 4, 5, 0), fewshot.select_shots(ids, 4, 5, 1))


def test_fewshot_accuracy_on_digits(digits):
  train_x, train_y, test_x, test_y = digits
  acc = {k: np.mean([fewshot.fewshot_accuracy(train_x, train_y, test_x, test_y, k, L2_REG, s)
                     for s in range(3)]) for k in (1, 10)}
  assert acc[10] > 0.7, acc
  assert 0.1 < acc[1] < acc[10], acc  # Above chance, below more shots.
  # One-hot labels give the same result as int labels.
  one_hot = np.eye(10, dtype=np.float32)
  assert fewshot.fewshot_accuracy(train_x, one_hot[train_y], test_x, one_hot[test_y], 10,
                                  L2_REG, 0) == fewshot.fewshot_accuracy(
                                      train_x, train_y, test_x, test_y, 10, L2_REG, 0)


def _fake_pipeline(digits, batch_size=128):
  """A data_fn/embed_fn pair over numpy arrays, padded like the eval iterator."""
  train_x, train_y, test_x, test_y = digits
  splits = {'train': (train_x, train_y), 'test': (test_x, test_y)}
  calls = []

  def data_fn(dataset, split):
    calls.append((dataset, split))
    x, y = splits[split]
    for start in range(0, len(x), batch_size):
      bx, by = x[start:start + batch_size], y[start:start + batch_size]
      pad = batch_size - len(bx)
      # Padding rows carry garbage that would change the result if kept.
      yield {'image': np.concatenate([bx, np.full((pad, 64), 1e3, np.float32)]),
             'labels': np.eye(10, dtype=np.float32)[np.concatenate([by, np.zeros(pad, int)])],
             'mask': np.arange(batch_size) < len(bx)}

  def embed_fn(params, batch):
    return batch['image'] * params['scale'], batch['labels'], batch['mask']

  return data_fn, embed_fn, calls


def test_evaluator_run(digits, caplog):
  data_fn, embed_fn, calls = _fake_pipeline(digits)
  config = evaluators.settings(
      'fewshot', every_steps=10, shots=(1, 5, 10, 1000), l2_reg=L2_REG, num_seeds=2,
      datasets={'digits': ('digits', 'train', 'test'), 'again': ('digits', 'train', 'test')})
  evaluator = fewshot.FewShotEvaluator('fewshot', config, embed_fn, data_fn)
  with caplog.at_level(logging.WARNING):
    results = evaluator.run({'scale': 1.0})
  assert set(results) == {f'fewshot/{name}_{k}shot' for name in ('digits', 'again')
                          for k in (1, 5, 10)}
  assert 'skipping 1000-shot' in caplog.text
  # Features extracted once per (dataset, split) per run, whatever the number of names.
  assert sorted(calls) == [('digits', 'test'), ('digits', 'train')]
  train_x, train_y, test_x, test_y = digits
  for k in (1, 5, 10):
    expected = np.mean([fewshot.fewshot_accuracy(train_x, train_y, test_x, test_y, k, L2_REG, s)
                        for s in range(2)])
    assert results[f'fewshot/digits_{k}shot'] == pytest.approx(expected, abs=1e-12)
    assert results[f'fewshot/again_{k}shot'] == results[f'fewshot/digits_{k}shot']
  assert results['fewshot/digits_10shot'] > 0.7
  # A new run recomputes features (the cache lives for one call only).
  evaluator.run({'scale': 2.0})
  assert len(calls) == 4


def test_evaluator_rejects_bad_dataset_spec(digits):
  data_fn, embed_fn, _ = _fake_pipeline(digits)
  config = evaluators.settings('fewshot', shots=(1,), l2_reg=L2_REG, num_seeds=1,
                               datasets={'digits': ('digits', 'train')})
  with pytest.raises(ValueError, match=r'\(dataset, train_split, test_split\)'):
    fewshot.FewShotEvaluator('fewshot', config, embed_fn, data_fn)


def test_examples_per_class_sizes_a_rehearsals_fake_splits():
  """Each evaluator says what it reads and how many examples of a class it needs there."""
  from mixer import config_lib, evaluators  # pylint: disable=g-import-not-at-top
  from mixer.datasets import fake_data  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.update(dataset='imagenet21k', train_split='train[:100]')
  config.evals = {
      'val': evaluators.settings('classification', split='validation'),
      # The same split again, from a few-shot probe: the larger need wins, listed once.
      'fewshot': evaluators.settings('fewshot', shots=(1, 5, 25), datasets={
          'self': ('imagenet21k', 'validation', 'test'),
          'pets': ('oxford_iiit_pet', 'train', 'test')}),
  }
  assert evaluators.examples_per_class(config) == {
      ('imagenet21k', 'validation'): 25, ('imagenet21k', 'test'): 0,
      ('oxford_iiit_pet', 'train'): 25, ('oxford_iiit_pet', 'test'): 0}
  assert evaluators.data_splits(config) == list(evaluators.examples_per_class(config))
  train, *evaluated = fake_data.dataset_splits(config)
  assert train == ('imagenet21k', 'train[:100]', fake_data.EXAMPLES_PER_SPLIT)
  # Half of the fake examples are of class 0: 2 x 25 + a margin of 10.
  assert sorted(evaluated) == [
      ('imagenet21k', 'test', fake_data.EXAMPLES_PER_SPLIT),
      ('imagenet21k', 'validation', max(60, fake_data.EXAMPLES_PER_SPLIT)),
      ('oxford_iiit_pet', 'test', fake_data.EXAMPLES_PER_SPLIT),
      ('oxford_iiit_pet', 'train', max(60, fake_data.EXAMPLES_PER_SPLIT))]
