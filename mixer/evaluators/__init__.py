"""Evaluators: self-describing plug-ins that the trainer only loops over.

`config.evals` maps a name of your choice to the settings of one evaluator
(as big_vision's `config.evals`):

  config.evals.eval = evaluators.settings('classification', every_steps=500, split='test')
  config.evals.real = evaluators.settings('classification', dataset='imagenet2012_real',
                                          split='validation', label_field='real_label')
  config.evals.fewshot = evaluators.settings('fewshot', every_steps=25_000, datasets={...})

Every type is a module here with `DEFAULTS` (its fields and their defaults,
documented there), `check(where, settings)`, `data_splits(settings, config)`
(the (dataset, split, examples needed per class) it reads: the splits are
checked before any state is built, and a rehearsal's fake data is sized by the
counts) and an
`Evaluator(name, settings, config, setup)` class. An evaluator builds its own data and reads its
class count from *its* source, never from the training config; it runs every
`every_steps` (0: only at the end) and at the last step, and its `run(params)`
returns `{'<name>/<metric>': float}`, the same on every process. Adding a type
means adding a module and a line to `TYPES`: `mixer.train` does not change.

- `classification`: loss, top-1 and top-5 accuracy on a split (ImageNet
  validation, ReaL with `label_field='real_label'`, ImageNet-v2, minival...).
- `fewshot`: the paper's few-shot linear evaluation on frozen pre-logits.
"""

from __future__ import annotations

from typing import Any, Protocol

import ml_collections

from mixer.evaluators import classification, fewshot

# type name -> module holding DEFAULTS, check() and Evaluator.
TYPES = {'classification': classification, 'fewshot': fewshot}


class Evaluator(Protocol):
  name: str
  every_steps: int

  def run(self, params: Any) -> dict[str, float]:
    """`{'<name>/<metric>': value}` for `params`, identical on every process."""


def settings(type: str, **overrides) -> ml_collections.ConfigDict:  # pylint: disable=redefined-builtin
  """The full settings of an evaluator of `type`: its DEFAULTS with `overrides`."""
  if type not in TYPES:
    raise ValueError(f'Unknown evaluator type {type!r}; known types: {sorted(TYPES)}.')
  values = dict(TYPES[type].DEFAULTS, type=type)
  unknown = set(overrides) - set(values)
  if unknown:
    raise ValueError(f'Unknown field(s) {sorted(unknown)} for a {type!r} evaluator; its '
                     f'fields: {sorted(values)}.')
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def check_settings(name: str, entry: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming `config.evals.<name>` for a bad type, field or value."""
  where = f'config.evals.{name}'
  if not isinstance(entry, (ml_collections.ConfigDict, dict)) or 'type' not in entry:
    raise ValueError(f"{where} must be a dict with a 'type' (one of {sorted(TYPES)}), e.g. "
                     "evaluators.settings('classification', split='test').")
  if entry['type'] not in TYPES:
    raise ValueError(f'{where}.type={entry["type"]!r}: use one of {sorted(TYPES)}.')
  module = TYPES[entry['type']]
  unknown = set(entry.keys()) - set(module.DEFAULTS) - {'type'}
  if unknown:
    raise ValueError(f'{where} has unknown field(s) {sorted(unknown)}; a {entry["type"]!r} '
                     f'evaluator has: {sorted(module.DEFAULTS)}.')
  full = _full_settings(entry)
  every = full.every_steps
  if not isinstance(every, int) or every < 0:
    raise ValueError(f'{where}.every_steps={every!r}: use a step count >= 1, or 0 to evaluate '
                     'only at the end of training.')
  module.check(where, full)


def _full_settings(entry) -> ml_collections.ConfigDict:
  """An evaluator's settings with its type's DEFAULTS filled in (entry: dict or ConfigDict)."""
  return ml_collections.ConfigDict(dict(TYPES[entry['type']].DEFAULTS, **dict(entry)))


def examples_per_class(config: ml_collections.ConfigDict) -> dict[tuple[str, str], int]:
  """{(dataset, split): examples of a class needed} over the evaluators of `config.evals`.

  In order, once each; the count is the most any evaluator needs of that split.
  """
  needed = {}
  for entry in config.evals.values():
    for dataset, split, count in TYPES[entry.type].data_splits(_full_settings(entry), config):
      needed[dataset, split] = max(count, needed.get((dataset, split), 0))
  return needed


def data_splits(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """Every (dataset, split) that the evaluators of `config.evals` read, in order, once each."""
  return list(examples_per_class(config))


def create(config: ml_collections.ConfigDict, setup) -> list[Evaluator]:
  """One evaluator per `config.evals` entry; each opens its data now (fail fast)."""
  built = []
  for name, entry in config.evals.items():
    check_settings(name, entry)
    built.append(TYPES[entry.type].Evaluator(name, _full_settings(entry), config, setup))
  return built


def is_due(evaluator: Evaluator, step: int, total_steps: int) -> bool:
  """Whether `evaluator` runs after `step`: on its cadence, and always at the last step."""
  return step == total_steps or bool(evaluator.every_steps and step % evaluator.every_steps == 0)
