"""Model surgery on parameter trees: what a tree is, and fitting it to a model.

- `infer_architecture`: the MlpMixer fields a tree's shapes imply.
- `check_params`: every missing, unexpected or wrong-shaped key against a
  model, with the most likely fix.
- `adapt_to_resolution`: the paper's Appendix C (fine-tuning at K times the
  pre-training resolution), `replace_head`: a new zero head.

Trees are nested dicts in the released layout (`mixer.models.MlpMixer`'s own
tree); `mixer.weights` reads and writes them as `.npz` files. Every problem is
a `WeightsError` that names the parameter, what is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mixer import models


class WeightsError(ValueError):
  """A weights file or parameter tree that cannot be used as asked."""


_BLOCK_RE = re.compile(r'^MixerBlock_(\d+)$')
_TOKEN_MIXING = 'token_mixing'


def plain_tree(params: Any) -> dict[str, Any]:
  """Unboxes flax metadata (`nn.Partitioned`) and unwraps `{'params': ...}`."""
  params = models.unbox(params)
  if isinstance(params, Mapping) and set(params) == {'params'}:
    params = params['params']
  if not isinstance(params, Mapping):
    raise WeightsError(
        f'Expected a parameter tree (nested dict), got {type(params).__name__}: '
        'pass the `params` collection of the model variables.')
  return params


def flatten(params: Any) -> dict[str, Any]:
  """`{'a': {'b': x}}` -> `{'a/b': x}`, after unboxing."""
  return traverse_util.flatten_dict(plain_tree(params), sep='/')


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict(dict(flat), sep='/')


# -----------------------------------------------------------------------------
# What a parameter tree holds, and checks against a model
# -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Architecture:
  """The MlpMixer fields a parameter tree implies (read from its shapes)."""
  patch_size: int
  hidden_dim: int
  num_blocks: int
  num_tokens: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  num_classes: int  # 0 when the tree has no head.

  @property
  def grid_size(self) -> int | None:
    """Patches per side, or None if the token count is not a square."""
    side = math.isqrt(self.num_tokens)
    return side if side * side == self.num_tokens else None

  @property
  def image_size(self) -> int | None:
    """Square image side (px) the token count corresponds to."""
    return None if self.grid_size is None else self.grid_size * self.patch_size

  @property
  def variant(self) -> str | None:
    """The paper's variant name (e.g. 'Mixer-B_16') with these sizes, if any.

    The token-mixing width is ignored: it is the one field that adaptation to
    a higher resolution changes.
    """
    for name, v in models.VARIANTS.items():
      if (v.patch_size, v.hidden_dim, v.num_blocks, v.channels_mlp_dim) == (
          self.patch_size, self.hidden_dim, self.num_blocks, self.channels_mlp_dim):
        return name
    return None

  def model_kwargs(self) -> dict[str, int]:
    """Keyword arguments that build an `MlpMixer` matching this tree."""
    return {'num_classes': self.num_classes,
            **{field: getattr(self, field) for field in models.ARCHITECTURE_FIELDS}}

  def describe(self) -> str:
    size = f'{self.image_size} px' if self.image_size else 'non-square grid'
    name = self.variant or 'no paper variant'
    return (f'{name}: hidden {self.hidden_dim}, {self.num_blocks} blocks, patch '
            f'{self.patch_size}, {self.num_tokens} tokens ({size}), token MLP '
            f'{self.tokens_mlp_dim}, channel MLP {self.channels_mlp_dim}, '
            f'{self.num_classes or "no"} classes')


def _shape(tree: Mapping[str, Any], *path: str) -> tuple[int, ...] | None:
  node = tree
  for part in path:
    if not isinstance(node, Mapping) or part not in node:
      return None
    node = node[part]
  return tuple(node.shape) if hasattr(node, 'shape') else None


def infer_architecture(params: Any) -> Architecture:
  """Reads patch size, widths, depth, token count and classes from the shapes.

  Works on arrays and on `jax.eval_shape` results alike.

  Raises:
    WeightsError: the tree lacks the stem or the first block's MLPs.
  """
  tree = plain_tree(params)
  stem = _shape(tree, 'stem', 'kernel')
  token_in = _shape(tree, 'MixerBlock_0', _TOKEN_MIXING, 'Dense_0', 'kernel')
  channel_in = _shape(tree, 'MixerBlock_0', 'channel_mixing', 'Dense_0', 'kernel')
  if stem is None or len(stem) != 4 or token_in is None or channel_in is None:
    raise WeightsError(
        'Not an MLP-Mixer parameter tree: it lacks stem/kernel or MixerBlock_0/'
        '{token,channel}_mixing/Dense_0/kernel (top-level keys: '
        f'{sorted(tree)[:8]}). Pass a released-format Mixer checkpoint.')
  head = _shape(tree, 'head', 'kernel')
  num_blocks = sum(1 for key in tree if _BLOCK_RE.match(key))
  return Architecture(
      patch_size=stem[0], hidden_dim=stem[3], num_blocks=num_blocks,
      num_tokens=token_in[0], tokens_mlp_dim=token_in[1],
      channels_mlp_dim=channel_in[1], num_classes=head[1] if head else 0)


def _natural_key(key: str) -> list[Any]:
  """Sorts 'MixerBlock_2' before 'MixerBlock_10'."""
  return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', key)]


def _mismatch_hint(found: Architecture, expected: Architecture) -> str:
  """The most likely fix when the shapes of two Mixer trees disagree."""
  if (found.patch_size, found.hidden_dim, found.num_blocks, found.channels_mlp_dim) != (
      expected.patch_size, expected.hidden_dim, expected.num_blocks, expected.channels_mlp_dim):
    return (
        f'The checkpoint is a different model: it looks like {found.describe()}; the model '
        f'is {expected.describe()}. Fix: build the model the checkpoint was trained as '
        f"(config.model.name='{found.variant or '...'}', --model), or pick the "
        'checkpoint of this variant.')
  hints = []
  if found.num_tokens != expected.num_tokens:
    def where(a):
      return f'{a.image_size} px at patch {a.patch_size}' if a.image_size else 'non-square'
    k = (expected.grid_size or 0) / (found.grid_size or 1)
    width = ''
    if k == int(k) and k > 1:
      width = (f' The adapted model needs tokens_mlp_dim = {int(k) ** 2} x '
               f'{found.tokens_mlp_dim} = {int(k) ** 2 * found.tokens_mlp_dim} '
               '(adapted_tokens_mlp_dim).')
    hints.append(
        f'The checkpoint has {found.num_tokens} tokens ({where(found)}), the model '
        f'{expected.num_tokens} ({where(expected)}). Fix: use adapt_to_resolution '
        f'(load_for_model(..., from_image_size={found.image_size}), '
        f'config.init_from_image_size={found.image_size}), which needs the model image '
        f'size to be an integer multiple of {found.image_size}, or use image size '
        f'{found.image_size}.{width}')
  elif found.tokens_mlp_dim != expected.tokens_mlp_dim:
    hints.append(
        f'The token-mixing width differs (checkpoint {found.tokens_mlp_dim}, model '
        f'{expected.tokens_mlp_dim}) at the same token count. Fix: build the model with '
        f'tokens_mlp_dim={found.tokens_mlp_dim}.')
  if found.num_classes != expected.num_classes:
    hints.append(
        f'The head differs (checkpoint {found.num_classes or "none"}, model '
        f'{expected.num_classes or "none"} classes). Fix: use replace_head '
        "(load_for_model(..., head='replace'), config.init_head='replace') for a new "
        f'label set, or build the model with num_classes={found.num_classes}.')
  return ' '.join(hints)


def check_params(params: Any, expected: Any) -> None:
  """Raises unless `params` has exactly the keys and shapes of `expected`.

  `expected` is typically `jax.eval_shape` of the model's init (boxed or not).
  Every missing key, unexpected key and wrong shape is listed with its path,
  followed by the most likely fix: a different variant, a different
  resolution (adapt_to_resolution) or a different head (replace_head).

  Raises:
    WeightsError: any key or shape differs.
  """
  found_flat, expected_flat = flatten(params), flatten(expected)
  problems = []
  for key in sorted(set(expected_flat) - set(found_flat), key=_natural_key):
    problems.append(f'missing key {key} (expected shape {tuple(expected_flat[key].shape)})')
  for key in sorted(set(found_flat) - set(expected_flat), key=_natural_key):
    problems.append(f'unexpected key {key} (shape {tuple(np.shape(found_flat[key]))}, '
                    'which the model does not have)')
  for key in sorted(set(found_flat) & set(expected_flat), key=_natural_key):
    found_shape = tuple(np.shape(found_flat[key]))
    expected_shape = tuple(expected_flat[key].shape)
    if found_shape != expected_shape:
      problems.append(f'wrong shape for {key}: expected {expected_shape}, found {found_shape}')
  if not problems:
    return
  shown = problems[:12]
  if len(problems) > len(shown):
    shown.append(f'... and {len(problems) - len(shown)} more')
  try:
    hint = _mismatch_hint(infer_architecture(params), infer_architecture(expected))
  except WeightsError:
    hint = ('Fix: the keys must be exactly those of mixer.models.MlpMixer (released layout, '
            "flat '/'-joined, no prefix).")
  if not hint:
    hint = ('Fix: export the checkpoint from the same model definition '
            '(mixer.weights.save_npz), or rename its keys to the released layout.')
  raise WeightsError(
      f'Parameters do not match the model ({len(problems)} problem(s)):\n  '
      + '\n  '.join(shown) + f'\n{hint}')


# -----------------------------------------------------------------------------
# Adapting a tree: resolution (paper App. C) and head
# -----------------------------------------------------------------------------


def _resolution_factor(from_size: int, to_size: int, patch_size: int) -> int:
  for name, size in (('from_size', from_size), ('to_size', to_size)):
    if size <= 0 or size % patch_size:
      raise WeightsError(
          f'{name}={size} is not a positive multiple of the patch size {patch_size}: '
          'use image sizes that are whole numbers of patches.')
  if to_size % from_size:
    raise WeightsError(
        f'Cannot adapt from {from_size} px to {to_size} px: the paper\'s block-diagonal '
        f'scheme (App. C) needs to_size = K x from_size with an integer K >= 1, but '
        f'{to_size}/{from_size} = {to_size / from_size:.4g}. Use an image size that is a '
        f'multiple of {from_size} (e.g. {from_size * max(2, round(to_size / from_size))}).')
  return to_size // from_size


def adapted_tokens_mlp_dim(tokens_mlp_dim: int, from_size: int, to_size: int,
                           patch_size: int) -> int:
  """Token-mixing width of the model after `adapt_to_resolution`: K² times wider."""
  return tokens_mlp_dim * _resolution_factor(from_size, to_size, patch_size) ** 2


def _window_major_index(grid: int, factor: int) -> np.ndarray:
  """For each token in raster order over the (K·g)² grid, its window-major index.

  Window-major order lists the K×K spatially contiguous g×g windows one after
  the other (windows in raster order, tokens within a window in raster order):
  the order in which the block-diagonal matrix of App. C is a plain Kronecker
  product. The model keeps raster order, so the weights are permuted instead.
  """
  big = grid * factor
  rows, cols = np.divmod(np.arange(big * big), big)
  window_row, row_in_window = np.divmod(rows, grid)
  window_col, col_in_window = np.divmod(cols, grid)
  window = window_row * factor + window_col
  return window * grid * grid + row_in_window * grid + col_in_window


def adapt_to_resolution(params: Any, from_size: int, to_size: int,
                        patch_size: int) -> dict[str, Any]:
  """Adapts a Mixer tree trained at `from_size` px to `to_size` px (paper App. C).

  With K = to_size / from_size (an integer), every token-mixing MLP becomes
  block-diagonal with K² copies of the trained one: K² times more tokens and a
  K² times wider hidden layer, biases tiled. Each copy sees one of the K×K
  spatially contiguous windows of the larger image (not a strided sub-grid),
  so right after adaptation the model treats each window exactly as the
  original model treated a from_size image, and its logits are the mean of
  the original model's logits over the K×K crops.

  The model's tokens stay in raster order; the rows of `Dense_0/kernel` and
  the columns of `Dense_1/kernel` (and entries of `Dense_1/bias`) are permuted
  to match, so the result loads into the same `MlpMixer` at `to_size` with
  `tokens_mlp_dim` multiplied by K² (see `adapted_tokens_mlp_dim`). Other
  parameters are unchanged.

  Returns:
    A new nested dict of numpy arrays (the input is not modified).

  Raises:
    WeightsError: K is not an integer, the sizes are not multiples of the
      patch size, or the tree's token count does not match from_size.
  """
  factor = _resolution_factor(from_size, to_size, patch_size)
  flat = {key: np.asarray(value) for key, value in flatten(params).items()}
  grid = from_size // patch_size
  num_windows = factor * factor
  order = _window_major_index(grid, factor)
  adapted = dict(flat)
  for block in sorted({k.split('/')[0] for k in flat if _BLOCK_RE.match(k.split('/')[0])}):
    prefix = f'{block}/{_TOKEN_MIXING}'
    try:
      w_in = flat[f'{prefix}/Dense_0/kernel']
      b_in = flat[f'{prefix}/Dense_0/bias']
      w_out = flat[f'{prefix}/Dense_1/kernel']
      b_out = flat[f'{prefix}/Dense_1/bias']
    except KeyError as e:
      raise WeightsError(
          f'{prefix} lacks {e.args[0]!r}: adapt_to_resolution needs the full released layout.'
      ) from e
    if w_in.shape[0] != grid * grid:
      raise WeightsError(
          f'{prefix}/Dense_0/kernel has {w_in.shape[0]} tokens, but from_size={from_size} at '
          f'patch {patch_size} means {grid * grid}: pass the size the checkpoint was trained '
          'at (or leave from_image_size unset in load_for_model to infer it).')
    eye = np.eye(num_windows, dtype=w_in.dtype)
    # In window-major order the new MLP is kron(I, W); rows (tokens in) and
    # columns (tokens out) are then picked in raster order.
    adapted[f'{prefix}/Dense_0/kernel'] = np.kron(eye, w_in)[order, :]
    adapted[f'{prefix}/Dense_0/bias'] = np.tile(b_in, num_windows)
    adapted[f'{prefix}/Dense_1/kernel'] = np.kron(eye, w_out)[:, order]
    adapted[f'{prefix}/Dense_1/bias'] = np.tile(b_out, num_windows)[order]
  return unflatten(adapted)


def replace_head(params: Any, num_classes: int, bias: float = 0.0) -> dict[str, Any]:
  """Returns `params` with a new zero head for `num_classes` (none if 0).

  The kernel is zeros, as in the paper's fine-tuning and `MlpMixer`'s init,
  and the bias is filled with `bias` (e.g. -log(num_classes) or big_vision's
  -10 for sigmoid losses over many classes).
  """
  tree = dict(plain_tree(params))
  hidden = _shape(tree, 'pre_head_layer_norm', 'scale')
  if hidden is None:
    raise WeightsError(
        'Cannot size a new head: the tree has no pre_head_layer_norm/scale. Pass a full '
        'Mixer parameter tree.')
  tree.pop('head', None)
  if num_classes:
    tree['head'] = {
        'kernel': np.zeros((hidden[0], num_classes), np.float32),
        'bias': np.full((num_classes,), bias, np.float32),
    }
  return tree


def model_param_shapes(model: models.MlpMixer, image_size: int) -> dict[str, Any]:
  """Shapes and dtypes of `model`'s params at `image_size` (no memory, no compute)."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), images)
  return models.unbox(variables['params'])
