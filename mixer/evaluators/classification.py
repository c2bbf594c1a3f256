"""Top-1 accuracy and loss on an eval split (and ImageNet ReaL when the data has it).

The eval data is padded to the same number of batches on every process; padded
rows carry `mask=False` and are left out of every sum, so each example counts
exactly once whatever the number of hosts.

Top-1 is "precision@1": the top logit's class is one of the example's labels. For
single-label data that is ordinary accuracy; for multi-label data (ImageNet-21k,
JFT) it is the metric big_vision reports. ReaL accuracy uses the same rule with
the ReaL label sets and counts only images that have one.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp

from mixer import sharding


class ClassificationEvaluator:
  """`run(params)` returns `{prefix/loss, prefix/accuracy[, prefix/real_accuracy]}`."""

  def __init__(self, model, loss_fn: Callable, mesh, data: Iterable[dict], prefix: str = 'eval'):
    self.model = model
    self.mesh = mesh
    self.data = data
    self.prefix = prefix

    def batch_sums(params, batch):
      logits = model.apply({'params': params}, batch['image'], train=False)
      mask = batch['mask'].astype(jnp.float32)
      top1 = jnp.argmax(logits, axis=-1)
      correct = jnp.take_along_axis(batch['labels'], top1[:, None], axis=-1)[:, 0] > 0
      sums = {
          'loss': jnp.sum(loss_fn(logits, batch['labels']) * mask),
          'correct': jnp.sum(correct * mask),
          'count': jnp.sum(mask),
      }
      if 'real_labels' in batch:
        has_real = (jnp.sum(batch['real_labels'], axis=-1) > 0) * mask
        real_correct = jnp.take_along_axis(batch['real_labels'], top1[:, None], axis=-1)[:, 0] > 0
        sums['real_correct'] = jnp.sum(real_correct * has_real)
        sums['real_count'] = jnp.sum(has_real)
      return sums

    self._batch_sums = jax.jit(batch_sums, out_shardings=sharding.replicated(mesh))

  def run(self, params) -> dict[str, float]:
    totals = None
    for local_batch in self.data:
      sums = self._batch_sums(params, sharding.put_local_batch(local_batch, self.mesh))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
      raise ValueError(f'The {self.prefix} data yielded no batches: check config.eval_split.')
    totals = jax.device_get(totals)
    count = max(float(totals['count']), 1.0)
    results = {f'{self.prefix}/loss': float(totals['loss']) / count,
               f'{self.prefix}/accuracy': float(totals['correct']) / count}
    if 'real_count' in totals:
      results[f'{self.prefix}/real_accuracy'] = (
          float(totals['real_correct']) / max(float(totals['real_count']), 1.0))
    return results
