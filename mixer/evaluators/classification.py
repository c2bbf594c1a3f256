"""Loss, top-1 and top-5 accuracy of the classification head on one split.

Settings (`DEFAULTS`):
  every_steps   run every N steps (0: only at the end) and at the last step.
  dataset       a config.dataset-style name; None = the training set. Its class
                count must equal the head's (e.g. imagenet_v2 or
                imagenet2012_real for an ImageNet-1k head).
  split         split spec ('validation', 'train[99%:]' for minival, ...).
  pp            eval preprocessing, one of preprocess_ops.EVAL_PP.
  crop_fraction crop side over resize side for the '*_crop' modes (224/256).
  label_field   'label', or 'real_label' for ImageNet ReaL (Beyer et al. 2020;
                as big_vision's `evals.real`): images without a ReaL label
                count nowhere.
  batch_size    global eval batch; None = config.eval_batch_size.

Metrics: `<name>/loss`, `<name>/accuracy`, `<name>/top5_accuracy`.

The eval data is padded to the same number of batches on every process; padded
rows carry `mask=False` and are left out of every sum, so each example counts
exactly once whatever the number of hosts. Top-k is "precision@k": one of the k
top logits' classes is among the example's labels. For single-label data that
is ordinary accuracy; for multi-label data (ImageNet-21k, JFT, ReaL) it is the
metric big_vision reports.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from mixer import input_pipeline, preprocess_ops, sharding

DEFAULTS = {
    'every_steps': 0,
    'dataset': None,
    'split': 'test',
    'pp': 'resize',
    'crop_fraction': 0.875,
    'label_field': 'label',
    'batch_size': None,
}
LABEL_FIELDS = ('label', 'real_label')
TOP_K = 5


def check(where: str, settings: ml_collections.ConfigDict) -> None:
  preprocess_ops.check_eval_pp(settings.pp, settings.crop_fraction, where=f'{where}.pp')
  if settings.label_field not in LABEL_FIELDS:
    raise ValueError(f'{where}.label_field={settings.label_field!r}: use one of {LABEL_FIELDS}.')
  if not isinstance(settings.split, str) or not settings.split:
    raise ValueError(f"{where}.split={settings.split!r}: name a split, e.g. 'validation'.")


def data_splits(settings: ml_collections.ConfigDict, config) -> list[tuple[str, str, int]]:
  """The (dataset, split, examples needed per class) this evaluator reads: any count will do."""
  return [(settings.dataset or config.dataset, settings.split, 0)]


def batch_sums(model, loss_fn, params, batch):
  """Masked sums of loss, top-1 and top-k hits and the example count over one batch."""
  logits = model.apply({'params': params}, batch['image'], train=False)
  mask = batch['mask'].astype(jnp.float32)
  labels = batch['labels']
  k = min(TOP_K, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  hits = jnp.take_along_axis(labels, top, axis=-1) > 0  # [b, k]
  return {
      'loss': jnp.sum(loss_fn(logits, labels) * mask),
      'correct': jnp.sum(hits[:, 0] * mask),
      'correct_top5': jnp.sum(jnp.any(hits, axis=-1) * mask),
      'count': jnp.sum(mask),
  }


class ClassificationEvaluator:
  """`run(params)` -> `{<name>/loss, <name>/accuracy, <name>/top5_accuracy}` over `data`.

  `data` is any re-iterable of local batches {'image', 'labels' (multi-hot),
  'mask'}; rows with mask False count nowhere.
  """

  def __init__(self, name: str, every_steps: int, model, loss_fn, mesh, data):
    self.name = name
    self.every_steps = int(every_steps)
    self.mesh = mesh
    self.data = data
    self._batch_sums = jax.jit(
        lambda params, batch: batch_sums(model, loss_fn, params, batch),
        out_shardings=sharding.replicated(mesh))

  def run(self, params) -> dict[str, float]:
    totals = None
    for local_batch in self.data:
      sums = self._batch_sums(params, sharding.put_local_batch(local_batch, self.mesh))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    count = 0.0 if totals is None else float(jax.device_get(totals['count']))
    if not count:
      raise ValueError(f'config.evals.{self.name}: its split has no labelled examples; '
                       'check the split and the data directory.')
    totals = jax.device_get(totals)
    return {f'{self.name}/loss': float(totals['loss']) / count,
            f'{self.name}/accuracy': float(totals['correct']) / count,
            f'{self.name}/top5_accuracy': float(totals['correct_top5']) / count}


class Evaluator(ClassificationEvaluator):
  """The trainer's classification evaluator: its own data, checked against the head."""

  def __init__(self, name: str, settings: ml_collections.ConfigDict, config, setup):
    data = input_pipeline.create_eval_iterator(
        config, dataset=settings.dataset, split=settings.split, pp=settings.pp,
        crop_fraction=settings.crop_fraction, label_field=settings.label_field,
        batch_size=settings.batch_size)
    if data.num_classes != setup.model.num_classes:
      raise ValueError(
          f'config.evals.{name}: dataset {settings.dataset or config.dataset!r} has '
          f'{data.num_classes} classes but the model head has {setup.model.num_classes}. '
          'A classification evaluator needs the same label set; use a fewshot evaluator for '
          'other datasets.')
    sharding.check_batch_size(data.local_batch_size * jax.process_count(), setup.mesh,
                              f'config.evals.{name}.batch_size')
    super().__init__(name, settings.every_steps, setup.model, setup.loss_fn, setup.mesh, data)
