"""Released (per-block) <-> scanned (stacked) layouts of Mixer parameters.

Google's released `.npz` files, and `MlpMixer(scan_blocks=False)`, hold one
subtree per block:

  MixerBlock_0/token_mixing/Dense_0/kernel   [S, D_S]
  ...
  MixerBlock_{L-1}/token_mixing/Dense_0/kernel

`MlpMixer(scan_blocks=True)` runs the blocks under `nn.scan` and holds the same
arrays stacked along a leading layer axis under one subtree:

  MixerBlocks/token_mixing/Dense_0/kernel    [L, S, D_S]

Everything outside the blocks (stem, pre_head_layer_norm, head) is the same in
both. The conversion only stacks and slices, so released -> scanned -> released
returns the very same values bit for bit. Every place that reads or writes the
released format (`.npz` load/save, init_from, resolution adaptation,
visualisation, export) converts at its boundary, so files never see the
scanned layout.

Leaves may be numpy arrays (host trees, e.g. from `.npz`) or jax arrays; numpy
stays numpy.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SCANNED = 'MixerBlocks'            # The scanned subtree (see mixer.models._ScanStep).
_RELEASED = re.compile(r'MixerBlock_(\d+)')


def is_scanned(params) -> bool:
  """Whether `params` holds the blocks stacked (scanned layout)."""
  return SCANNED in params


def _block_keys(params) -> list[str]:
  return sorted((k for k in params if _RELEASED.fullmatch(k)),
                key=lambda k: int(_RELEASED.fullmatch(k).group(1)))


def to_scanned(params: dict[str, Any], num_blocks: int | None = None) -> dict[str, Any]:
  """The released-layout tree `params` with its blocks stacked under `MixerBlocks`.

  `num_blocks` (when given) must match the blocks present: a checkpoint of
  another depth is an error, not a silently shorter model. A tree already in
  the scanned layout is returned as it is.
  """
  if is_scanned(params):
    return params
  keys = _block_keys(params)
  expected = [f'MixerBlock_{i}' for i in range(len(keys) if num_blocks is None else num_blocks)]
  if keys != expected or not keys:
    raise ValueError(
        f'Cannot stack the Mixer blocks: the tree has {keys or "no MixerBlock_<i> keys"}, '
        f'expected MixerBlock_0..MixerBlock_{len(expected) - 1}. Pass a released-layout '
        'param tree of the model (with num_blocks equal to the model\'s).')
  blocks = [params[k] for k in keys]
  structure = jax.tree.structure(blocks[0])
  for key, block in zip(keys, blocks):
    if jax.tree.structure(block) != structure:
      raise ValueError(f'{key} has the parameters {jax.tree.structure(block)}, '
                       f'{keys[0]} has {structure}: the blocks cannot be stacked.')
  stacked = jax.tree.map(lambda *xs: _stack(xs), *blocks)
  rest = {k: v for k, v in params.items() if k not in keys}
  return {**rest, SCANNED: stacked}


def to_released(params: dict[str, Any]) -> dict[str, Any]:
  """The scanned-layout tree `params` with `MixerBlocks` split into `MixerBlock_{i}`.

  A tree already in the released layout is returned as it is.
  """
  if not is_scanned(params):
    return params
  stacked = params[SCANNED]
  lengths = {x.shape[0] for x in jax.tree.leaves(stacked)}
  if len(lengths) != 1:
    raise ValueError(f'{SCANNED} leaves have different layer counts {sorted(lengths)}.')
  rest = {k: v for k, v in params.items() if k != SCANNED}
  for i in range(lengths.pop()):
    rest[f'MixerBlock_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return rest


def _stack(xs):
  if all(isinstance(x, np.ndarray) for x in xs):
    return np.stack(xs)
  return jnp.stack(xs)
