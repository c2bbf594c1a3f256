"""Speed-of-light bounds: the step with an op made free, to see what fusing it away could give.

The H100 profile (docs/benchmarks.md) says the Mixer-B/16 train step spends more
time in memory-bound LayerNorms, biases + GELUs and transposes than in its
matmuls, and points at kernels that fuse them into the matmuls. Before anyone
writes such kernels, this measures the most they could give: the same step with
the op taken out, as if a fused kernel did it at no cost.

  python -m mixer.benchmarks.run --benchmarks=train --models=Mixer-B_16 --batch_sizes=256 \\
      --dtype=bfloat16 --ablate=none,gelu,layernorm,transpose,gelu+layernorm+transpose

  layernorm  every LayerNorm becomes the identity (its scale and bias go unused): a
             normalisation fused into the matmul that reads it
  gelu       each MLP's first dense layer's bias + GELU (forward, backward and bias
             gradient) becomes the identity: a matmul with a fused bias/GELU epilogue
  transpose  the [N, S, C] <-> [N, C, S] swaps around token mixing become reshapes: no
             data moves and the matmuls keep their shapes, as if token mixing read the
             layout it is given

An ablated model computes another function: its loss and gradients mean
nothing, only its time and memory do. The ops are swapped in `models` while the
step is traced and compiled (`ablated`), never in a training run.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from mixer import models


def _layer_norm_free(x, scale, bias):
  del scale, bias
  return x


def _bias_gelu_free(h, bias):
  del bias
  return h


def _swap_free(y):
  return y.reshape(y.shape[0], y.shape[2], y.shape[1])


# Each ablation: the `models` attributes it replaces, and with what.
ABLATIONS = {
    'layernorm': {'layer_norm': _layer_norm_free},
    'gelu': {'_bias_gelu': _bias_gelu_free, '_bias_gelu_recomputed': _bias_gelu_free},
    'transpose': {'swap_tokens_and_channels': _swap_free},
}
NONE = 'none'


def parse(text: str) -> tuple[str, ...]:
  """'none' -> (); 'gelu+layernorm' -> ('gelu', 'layernorm'). Raises ValueError on other names."""
  if text == NONE:
    return ()
  names = tuple(text.split('+'))
  unknown = [n for n in names if n not in ABLATIONS]
  if unknown or len(set(names)) != len(names):
    raise ValueError(f'--ablate takes {NONE} or names from {", ".join(ABLATIONS)} joined by +, '
                     f'each once (e.g. gelu+layernorm); got {text!r}.')
  return names


def label(names: tuple[str, ...]) -> str:
  """The record's `ablate` field: the names joined by '+', or 'none'."""
  return '+'.join(names) if names else NONE


@contextlib.contextmanager
def ablated(names: tuple[str, ...]) -> Iterator[None]:
  """Models traced inside lack the ops `names` (see `ABLATIONS`); restored on exit."""
  saved = {}
  try:
    for name in names:
      for attribute, replacement in ABLATIONS[name].items():
        saved.setdefault(attribute, getattr(models, attribute))
        setattr(models, attribute, replacement)
    yield
  finally:
    for attribute, original in saved.items():
      setattr(models, attribute, original)
