"""Few-shot linear evaluation of frozen representations (paper §3 "Metrics").

The paper reports "few-shot accuracies obtained by solving the l2-regularized
linear regression problem between the frozen learned representations of images
and the labels" and uses ImageNet 5-shot as its proxy for transfer quality.
This module follows big_vision's `evaluators/fewshot_lsr.py`, the reference
implementation of that protocol:

1. Features are the model's pre-logits (GAP output after the pre-head
   LayerNorm) of every train and test image, computed once per `run`.
2. For each seed `s` in `range(num_seeds)`: `rng = np.random.default_rng(s)`
   draws one random permutation of each class's train examples (classes in
   order 0..C-1); the k-shot train set is the first k of each permutation, so
   the 1-shot examples are among the 5-shot ones (same as big_vision).
3. The selected features are standardised with *their* mean and std
   (std + 1e-5), a constant bias feature of 100 is appended (large, so the
   bias is almost unregularised), targets are `2 * onehot - 1`.
4. Closed-form ridge regression in float64 on the host with `l2_reg` (2**10):
   W = (X^T X + l2 I)^-1 X^T Y, or X^T (X X^T + l2 I)^-1 Y when there are fewer
   examples than features (the same W, cheaper).
5. Test features get the same standardisation; accuracy is the fraction of
   test images whose argmax of X_test W is the true class.

`run` reports, for each configured dataset and shot count, the mean accuracy
over the seeds as `<evaluator name>/{dataset name}_{k}shot` (big_vision reports
each seed separately instead).

Settings (`DEFAULTS`), as big_vision's `configs/common_fewshot.py`:
  every_steps   run every N steps (0: only at the end) and at the last step.
  datasets      name -> (dataset, train split, test split); each dataset's
                class count is read from its own source.
  shots         shot counts, (1, 5, 10, 25).
  l2_reg        ridge strength, 2**10.
  num_seeds     selections averaged per shot count, 3.
  pp, crop_fraction  'resize_crop' with 0.875: big_vision's
                `resize(256)|central_crop(224)` at 224 px, scaled to the run's
                image size.
  batch_size    global batch for feature extraction; None = config.eval_batch_size.

Everything after feature extraction is numpy with fixed seeds, so every process
computes the same numbers.

Labels are taken as the argmax of the float `[n, C]` label rows, so multi-label
datasets are not supported here (the paper's few-shot datasets are single-label).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from mixer import input_pipeline, preprocess_ops, sharding

# Value of the appended constant feature; big_vision's BIAS_CONSTANT.
BIAS_CONSTANT = 100.0
# Added to the per-feature std before dividing, so constant features stay finite.
STD_EPSILON = 1e-5
# Test rows scored per matmul, bounding the float64 temporary (ImageNet val is 50k).
_TEST_CHUNK = 8192

DEFAULTS = {
    'every_steps': 0,
    'datasets': {},
    'shots': (1, 5, 10, 25),
    'l2_reg': 2.0 ** 10,
    'num_seeds': 3,
    'pp': 'resize_crop',
    'crop_fraction': 0.875,
    'batch_size': None,
}

EmbedFn = Callable[[Any, Mapping[str, Any]], tuple[np.ndarray, np.ndarray, np.ndarray]]
DataFn = Callable[[str, str], Iterable[Mapping[str, Any]]]


def class_ids_from_labels(labels: np.ndarray, num_classes: int | None = None):
  """Returns (int class ids `[n]`, number of classes) from one-hot or int labels."""
  labels = np.asarray(labels)
  if labels.ndim == 2:
    return labels.argmax(axis=1).astype(np.int64), labels.shape[1]
  if labels.ndim != 1:
    raise ValueError(f'Labels must be int [n] or one-hot [n, C], got shape {labels.shape}.')
  ids = labels.astype(np.int64)
  if num_classes is None:
    num_classes = int(ids.max()) + 1 if ids.size else 0
  return ids, num_classes


def select_shots(class_ids: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
  """Indices of `shots` random train examples per class (all of a smaller class).

  The draw is big_vision's: one `default_rng(seed)` permutation per class, in
  class order, of which the first `shots` are taken, so a smaller shot count
  with the same seed selects a subset of a larger one.
  """
  rng = np.random.default_rng(seed)
  per_class = [rng.permutation(np.flatnonzero(class_ids == c))[:shots]
               for c in range(num_classes)]
  return np.concatenate(per_class).astype(np.int64)


def fit_least_squares(x: np.ndarray, class_ids: np.ndarray, num_classes: int,
                      l2_reg: float) -> tuple[np.ndarray, np.ndarray]:
  """Fits the regularised least-squares classifier on standardised features.

  Args:
    x: `[n, D]` train features.
    class_ids: `[n]` int classes.
    num_classes: C.
    l2_reg: ridge strength; the bias feature is regularised too, but is 100,
      so in effect hardly at all.

  Returns:
    `(weights, bias)` in float64, `[D, C]` and `[C]`, acting on the *raw*
    features: scores = x @ weights + bias. The standardisation and the
    constant feature are folded in, so scoring needs no float64 copy of x.
  """
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=0)
  std = x.std(axis=0) + STD_EPSILON
  z = np.concatenate([(x - mean) / std, np.full((len(x), 1), BIAS_CONSTANT)], axis=1)
  targets = 2.0 * np.eye(num_classes)[class_ids] - 1.0
  num_points, dim = z.shape
  # Primal or dual form of the same ridge solution, whichever system is smaller.
  if num_points >= dim:
    w = np.linalg.solve(z.T @ z + l2_reg * np.eye(dim), z.T @ targets)
  else:
    w = z.T @ np.linalg.solve(z @ z.T + l2_reg * np.eye(num_points), targets)
  weights = w[:-1] / std[:, None]
  bias = BIAS_CONSTANT * w[-1] - mean @ weights
  return weights, bias


def scores(x: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
  """`[n, C]` regression outputs of the fitted classifier, in float64."""
  x = np.asarray(x)
  out = np.empty((len(x), weights.shape[1]), np.float64)
  for start in range(0, len(x), _TEST_CHUNK):
    chunk = x[start:start + _TEST_CHUNK].astype(np.float64)
    out[start:start + _TEST_CHUNK] = chunk @ weights + bias
  return out


def fewshot_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                     test_y: np.ndarray, shots: int, l2_reg: float, seed: int) -> float:
  """Few-shot linear accuracy for one shot count and one seed.

  Args:
    train_x: `[n, D]` features of the whole train split.
    train_y: `[n]` int classes or `[n, C]` one-hot rows.
    test_x: `[m, D]` test features.
    test_y: like `train_y`, for the test rows.
    shots: train examples per class (all of a class that has fewer).
    l2_reg: ridge strength (the paper / big_vision: 2**10).
    seed: selects the examples; see `select_shots`.

  Returns:
    Top-1 accuracy on the test rows, a fraction in [0, 1].
  """
  train_y, test_y = np.asarray(train_y), np.asarray(test_y)
  num_classes = None
  if train_y.ndim == 1 and test_y.ndim == 1:
    num_classes = int(max(train_y.max(initial=-1), test_y.max(initial=-1))) + 1
  train_ids, num_classes = class_ids_from_labels(train_y, num_classes)
  test_ids, test_classes = class_ids_from_labels(test_y, num_classes)
  if test_classes != num_classes:
    raise ValueError(f'Train labels have {num_classes} classes, test labels {test_classes}.')
  if not len(test_ids):
    raise ValueError('fewshot_accuracy needs at least one test example.')
  idx = select_shots(train_ids, num_classes, shots, seed)
  weights, bias = fit_least_squares(np.asarray(train_x)[idx], train_ids[idx], num_classes,
                                    l2_reg)
  predictions = scores(test_x, weights, bias).argmax(axis=1)
  return float(np.mean(predictions == test_ids))


def check(where: str, settings: ml_collections.ConfigDict) -> None:
  preprocess_ops.check_eval_pp(settings.pp, settings.crop_fraction, where=f'{where}.pp')
  if not settings.datasets:
    raise ValueError(f'{where}.datasets is empty: name at least one (dataset, train split, '
                     "test split), e.g. {'pets': ('oxford_iiit_pet', 'train', 'test')}.")
  for name, spec in dict(settings.datasets).items():
    if not isinstance(spec, (tuple, list)) or len(spec) != 3:
      raise ValueError(
          f'{where}.datasets[{name!r}] = {spec!r}; it must be a (dataset, train_split, '
          "test_split) tuple, e.g. ('cifar100', 'train', 'test').")
  if not settings.shots or any(int(k) < 1 for k in settings.shots):
    raise ValueError(f'{where}.shots={tuple(settings.shots)} must be positive counts.')
  if int(settings.num_seeds) < 1:
    raise ValueError(f'{where}.num_seeds={settings.num_seeds} must be >= 1.')


def data_splits(settings: ml_collections.ConfigDict, config) -> list[tuple[str, str, int]]:
  """Every (dataset, split, examples needed per class) of the probes.

  A train split needs the largest shot count of examples of a class (with
  fewer, that shot count is skipped for the class); a test split, any.
  """
  del config
  most_shots = max(settings.shots)
  splits = []
  for dataset, train_split, test_split in dict(settings.datasets).values():
    splits += [(dataset, train_split, most_shots), (dataset, test_split, 0)]
  return splits


class FewShotEvaluator:
  """The few-shot protocol on features from `embed_fn` and data from `data_fn`.

  Attributes:
    name: the evaluator's name, the prefix of its metrics.
    every_steps: its cadence (0: only at the end).
    datasets: name -> (dataset, train_split, test_split).
    shots: shot counts, e.g. (1, 5, 10, 25).
    l2_reg: ridge strength.
    num_seeds: selections averaged per shot count.
  """

  def __init__(self, name: str, settings: ml_collections.ConfigDict, embed_fn: EmbedFn,
               data_fn: DataFn):
    """Stores the configuration; loads nothing until `run`.

    Args:
      name: metric prefix.
      settings: the evaluator's settings (see DEFAULTS).
      embed_fn: `(params, batch) -> (features [n, D], labels [n, C], mask [n])`
        as host numpy arrays covering the global batch (gathered from all
        processes); rows with mask False are padding and are dropped.
      data_fn: `(dataset, split) -> iterable of batch dicts`, finite.
    """
    check(f'config.evals.{name}', settings)
    self.name = name
    self.every_steps = int(settings.every_steps)
    self.datasets = {key: tuple(spec) for key, spec in dict(settings.datasets).items()}
    self.shots = tuple(int(k) for k in settings.shots)
    self.l2_reg = float(settings.l2_reg)
    self.num_seeds = int(settings.num_seeds)
    self._embed_fn = embed_fn
    self._data_fn = data_fn

  def run(self, params: Any) -> dict[str, float]:
    """Returns `{'<name>/<dataset name>_<k>shot': mean accuracy over seeds}`.

    Shot counts that no class of a dataset's train split reaches are skipped
    with a warning (they would repeat the all-examples result under a wrong
    name).
    """
    features = {}  # (dataset, split) -> (x, class ids, C); only for this call.

    def embedded(dataset, split):
      if (dataset, split) not in features:
        features[dataset, split] = self._embed_split(params, dataset, split)
      return features[dataset, split]

    results = {}
    for name, (dataset, train_split, test_split) in self.datasets.items():
      train_x, train_ids, num_classes = embedded(dataset, train_split)
      test_x, test_ids, test_classes = embedded(dataset, test_split)
      if test_classes != num_classes:
        raise ValueError(f'Few-shot dataset {name!r}: labels of {train_split!r} have '
                         f'{num_classes} classes but {test_split!r} has {test_classes}.')
      counts = np.bincount(train_ids, minlength=num_classes)
      if (counts == 0).any():
        logging.warning('Few-shot %s: %d of %d classes have no example in %r.',
                        name, int((counts == 0).sum()), num_classes, train_split)
      for shots in self.shots:
        if shots > counts.max():
          logging.warning('Few-shot %s: skipping %d-shot, no class of %r has more than %d '
                          'examples.', name, shots, train_split, int(counts.max()))
          continue
        short = int(((counts > 0) & (counts < shots)).sum())
        if short:
          # As big_vision: such classes contribute all their examples.
          logging.warning('Few-shot %s %d-shot: %d classes have fewer examples; all of '
                          'theirs are used.', name, shots, short)
        accuracies = [self._accuracy(train_x, train_ids, test_x, test_ids, num_classes,
                                     shots, seed) for seed in range(self.num_seeds)]
        key = f'{self.name}/{name}_{shots}shot'
        results[key] = float(np.mean(accuracies))
        logging.info('Few-shot %s %d-shot: %.4f (seeds: %s)', name, shots, results[key],
                     ', '.join(f'{a:.4f}' for a in accuracies))
    return results

  def _accuracy(self, train_x, train_ids, test_x, test_ids, num_classes, shots, seed):
    idx = select_shots(train_ids, num_classes, shots, seed)
    weights, bias = fit_least_squares(train_x[idx], train_ids[idx], num_classes,
                                      self.l2_reg)
    return float(np.mean(scores(test_x, weights, bias).argmax(axis=1) == test_ids))

  def _embed_split(self, params, dataset, split):
    """Features `[n, D]`, class ids `[n]` and C of every real example of a split."""
    xs, ys = [], []
    for batch in self._data_fn(dataset, split):
      x, y, mask = self._embed_fn(params, batch)
      mask = np.asarray(mask).astype(bool)
      xs.append(np.asarray(x)[mask])
      ys.append(np.asarray(y)[mask])
    if not xs or not sum(len(x) for x in xs):
      raise ValueError(f'Few-shot: no examples in {dataset!r} split {split!r}; check '
                       f'config.evals.{self.name}.datasets and the data directory.')
    x = np.concatenate(xs).astype(np.float32, copy=False)
    ids, num_classes = class_ids_from_labels(np.concatenate(ys))
    return x, ids, num_classes


class Evaluator(FewShotEvaluator):
  """The trainer's few-shot evaluator: pre-logits of `setup.model`, data of `config`."""

  def __init__(self, name: str, settings: ml_collections.ConfigDict, config, setup):
    model, mesh = setup.model, setup.mesh
    prelogits = jax.jit(lambda params, images: model.apply(
        {'params': params}, images, train=False, return_prelogits=True))

    def embed_fn(params, local_batch):
      batch = sharding.put_local_batch(local_batch, mesh)
      outputs = (prelogits(params, batch['image']), batch['labels'], batch['mask'])
      return tuple(np.asarray(x) for x in sharding.gather_to_host(outputs))

    def data_fn(dataset, split):
      return input_pipeline.create_eval_iterator(
          config, dataset=dataset, split=split, pp=settings.pp,
          crop_fraction=settings.crop_fraction, batch_size=settings.batch_size)

    super().__init__(name, settings, embed_fn, data_fn)
