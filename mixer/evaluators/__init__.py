"""Evaluators the trainer runs periodically on the current parameters.

- `mixer.evaluators.classification`: top-1 accuracy (and loss) of the
  classification head on an eval split (ImageNet validation, ReaL, ...).
- `mixer.evaluators.fewshot`: the paper's few-shot linear evaluation: closed-form
  l2-regularised least squares on frozen pre-logits, 1/5/10/25 shots
  (`FewShotEvaluator`, configured by `config.fewshot`).

Each evaluator is built by the trainer with a model-running function it
supplies, and its `run(params)` returns a flat `{metric_name: float}` dict that
is the same on every process, ready for the metric writers.
"""
