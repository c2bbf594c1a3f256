"""Reads, checks, adapts and writes model parameters.

Released-format `.npz` (this section): the layout of Google's released MLP-Mixer
weights (`https://storage.googleapis.com/mixer_models/...`). One array per
parameter, keyed by its `/`-joined path without any prefix, e.g.
`MixerBlock_0/token_mixing/Dense_0/kernel`, exactly the tree of
`mixer.models.MlpMixer`. `load_for_model` is the one call the trainer and
`mixer.predict` use: it reads a file, adapts it to the model's resolution
(the paper's Appendix C) and head, and checks it against the model.

Train-state checkpoints (second section): `TrainCheckpointer` wraps orbax's
`CheckpointManager` for the trainer (async, keep-N, preemption-safe, restore
into any mesh).

Every problem with a file or a tree is a `CheckpointError` that names the file
or parameter, what is wrong and how to fix it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import signal
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from mixer import models


class CheckpointError(ValueError):
  """A checkpoint file or parameter tree that cannot be used as asked."""


# =============================================================================
# Released-format .npz checkpoints
# =============================================================================

_RELEASED_URL = 'https://storage.googleapis.com/mixer_models/'
_BLOCK_RE = re.compile(r'^MixerBlock_(\d+)$')
_TOKEN_MIXING = 'token_mixing'


def _plain_tree(params: Any) -> dict[str, Any]:
  """Unboxes flax metadata (`nn.Partitioned`) and unwraps `{'params': ...}`."""
  params = models.unbox(params)
  if isinstance(params, Mapping) and set(params) == {'params'}:
    params = params['params']
  if not isinstance(params, Mapping):
    raise CheckpointError(
        f'Expected a parameter tree (nested dict), got {type(params).__name__}: '
        'pass the `params` collection of the model variables.')
  return params


def _flatten(params: Any) -> dict[str, Any]:
  """`{'a': {'b': x}}` -> `{'a/b': x}`, after unboxing."""
  return traverse_util.flatten_dict(_plain_tree(params), sep='/')


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict(dict(flat), sep='/')


def is_remote(path: str) -> bool:
  """gs://, s3://, ... paths: the trainer's workdir may live in a bucket."""
  return '://' in path


def _read_remote(path: str) -> io.BytesIO:
  # Imported here: only remote paths need it (it is part of the orbax/TFDS stack).
  from etils import epath  # pylint: disable=g-import-not-at-top
  remote = epath.Path(path)
  if not remote.exists():
    raise CheckpointError(f'{path}: no such file. Check the path (and your access to it).')
  return io.BytesIO(remote.read_bytes())


def _size(source: str | io.BytesIO) -> int:
  return source.getbuffer().nbytes if isinstance(source, io.BytesIO) else os.path.getsize(source)


def load_npz(path: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads a released-format `.npz` into a nested dict of numpy arrays.

  Keys are split on `/` (`stem/kernel` -> `{'stem': {'kernel': ...}}`).
  `path` may be local or in a bucket (gs://...). Only plain numeric arrays are
  read: pickled objects are refused, as in vision_transformer's loader, because
  unpickling runs arbitrary code.

  Raises:
    CheckpointError: the file does not exist, is not an npz (zip) archive, is
      truncated or corrupt, holds something other than numeric arrays, or has
      keys that do not form a tree.
  """
  path = os.fspath(path)
  if is_remote(path):
    source = _read_remote(path)
  else:
    if not os.path.exists(path):
      raise CheckpointError(
          f'{path}: no such file. Check the path; released weights are at '
          f'{_RELEASED_URL}<dataset>/<model>.npz (see docs/weights.md).')
    if os.path.isdir(path):
      raise CheckpointError(
          f'{path}: is a directory, not an .npz file. Pass the .npz file itself.')
    source = path
  # The zip directory sits at the end of the file, so an interrupted download
  # (or an HTML error page saved under the .npz name) fails this test.
  if not zipfile.is_zipfile(source):
    raise CheckpointError(
        f'{path}: not an .npz (zip) archive, or truncated ({_size(source)} bytes). '
        'Re-download the file, or write it with mixer.checkpoint.save_npz.')
  flat = {}
  try:
    with np.load(source, allow_pickle=False) as archive:
      for key in archive.files:
        value = archive[key]
        if not isinstance(value, np.ndarray):
          raise CheckpointError(
              f'{path}: member {key!r} is not a .npy array. The file is a zip archive but not a '
              'checkpoint; pass a released-format .npz.')
        if value.dtype.kind not in 'biuf':
          raise CheckpointError(
              f'{path}: array {key!r} has dtype {value.dtype}, not a numeric type. '
              'Re-export the checkpoint with numeric arrays (mixer.checkpoint.save_npz).')
        flat[key] = value
  except CheckpointError:
    raise
  except ValueError as e:
    if 'allow_pickle' in str(e) or 'Object arrays' in str(e):
      raise CheckpointError(
          f'{path}: holds pickled Python objects, which are not loaded because unpickling '
          'can run arbitrary code. Re-export it with plain arrays (mixer.checkpoint.save_npz).'
      ) from e
    raise CheckpointError(f'{path}: corrupt .npz ({e}). Re-download or re-export it.') from e
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as e:
    raise CheckpointError(
        f'{path}: truncated or corrupt .npz ({type(e).__name__}: {e}). '
        'Re-download the file (compare its size with the source).') from e
  if not flat:
    raise CheckpointError(f'{path}: holds no arrays. Pass a released-format .npz checkpoint.')
  try:
    return _unflatten(flat)
  except ValueError as e:  # E.g. both 'head' and 'head/kernel'.
    raise CheckpointError(
        f'{path}: its keys do not form a parameter tree ({e}). Released files use flat '
        "'/'-joined keys such as 'stem/kernel'.") from e


def _as_saveable(key: str, value: Any) -> np.ndarray:
  try:
    array = np.asarray(jax.device_get(value))
  except Exception as e:  # Anything np.asarray cannot turn into an array.
    raise CheckpointError(
        f'Cannot save parameter {key!r}: {type(value).__name__} is not an array ({e}). '
        'Pass a tree of jax or numpy arrays.') from e
  if array.dtype.kind in 'biuf':
    return array
  # bfloat16 & co. (ml_dtypes) are floats that plain numpy readers cannot load.
  if jnp.issubdtype(array.dtype, jnp.floating):
    return array.astype(np.float32)
  raise CheckpointError(
      f'Cannot save parameter {key!r}: dtype {array.dtype} is not numeric '
      f'(value of type {type(value).__name__}). Pass a tree of jax or numpy arrays.')


def _current_umask() -> int:
  umask = os.umask(0o022)  # Reading the umask means setting it; restore it at once.
  os.umask(umask)
  return umask


def save_npz(params: Any, path: str | os.PathLike[str]) -> None:
  """Writes `params` in the released flat layout, atomically.

  `params` may be boxed (straight from `model.init`) or plain, with jax or
  numpy leaves; `{'params': tree}` is unwrapped. The file is readable by plain
  `np.load` (and so by the vision_transformer, big_vision and timm converters).
  The arrays go to a temporary file in the same directory, which is fsync'ed
  and then renamed over `path`, so an existing file is either kept whole or
  replaced whole, never left half-written. Bucket paths (gs://...) are written
  in one upload, which is atomic too.

  Raises:
    CheckpointError: a leaf is not a numeric array (nothing is written).
  """
  path = os.fspath(path)
  flat = {key: _as_saveable(key, value) for key, value in _flatten(params).items()}
  if is_remote(path):
    # Bucket objects appear only once fully uploaded, so one write is atomic.
    from etils import epath  # pylint: disable=g-import-not-at-top
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    epath.Path(path).write_bytes(buffer.getvalue())
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(
      dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      # mkstemp makes the file private (0600); give it the mode open() would.
      os.fchmod(f.fileno(), 0o666 & ~_current_umask())
      # Given a file object, np.savez writes exactly there (no '.npz' suffix added).
      np.savez(f, **flat)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp_path)
    raise
  # Makes the rename itself durable; some filesystems refuse to fsync a directory.
  with contextlib.suppress(OSError):
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)


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
    return {'num_classes': self.num_classes, 'patch_size': self.patch_size,
            'hidden_dim': self.hidden_dim, 'num_blocks': self.num_blocks,
            'tokens_mlp_dim': self.tokens_mlp_dim, 'channels_mlp_dim': self.channels_mlp_dim}

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
    CheckpointError: the tree lacks the stem or the first block's MLPs.
  """
  tree = _plain_tree(params)
  stem = _shape(tree, 'stem', 'kernel')
  token_in = _shape(tree, 'MixerBlock_0', _TOKEN_MIXING, 'Dense_0', 'kernel')
  channel_in = _shape(tree, 'MixerBlock_0', 'channel_mixing', 'Dense_0', 'kernel')
  if stem is None or len(stem) != 4 or token_in is None or channel_in is None:
    raise CheckpointError(
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
    CheckpointError: any key or shape differs.
  """
  found_flat, expected_flat = _flatten(params), _flatten(expected)
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
  except CheckpointError:
    hint = ('Fix: the keys must be exactly those of mixer.models.MlpMixer (released layout, '
            "flat '/'-joined, no prefix).")
  if not hint:
    hint = ('Fix: export the checkpoint from the same model definition '
            '(mixer.checkpoint.save_npz), or rename its keys to the released layout.')
  raise CheckpointError(
      f'Parameters do not match the model ({len(problems)} problem(s)):\n  '
      + '\n  '.join(shown) + f'\n{hint}')


# -----------------------------------------------------------------------------
# Adapting a tree: resolution (paper App. C) and head
# -----------------------------------------------------------------------------


def _resolution_factor(from_size: int, to_size: int, patch_size: int) -> int:
  for name, size in (('from_size', from_size), ('to_size', to_size)):
    if size <= 0 or size % patch_size:
      raise CheckpointError(
          f'{name}={size} is not a positive multiple of the patch size {patch_size}: '
          'use image sizes that are whole numbers of patches.')
  if to_size % from_size:
    raise CheckpointError(
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
    CheckpointError: K is not an integer, the sizes are not multiples of the
      patch size, or the tree's token count does not match from_size.
  """
  factor = _resolution_factor(from_size, to_size, patch_size)
  flat = {key: np.asarray(value) for key, value in _flatten(params).items()}
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
      raise CheckpointError(
          f'{prefix} lacks {e.args[0]!r}: adapt_to_resolution needs the full released layout.'
      ) from e
    if w_in.shape[0] != grid * grid:
      raise CheckpointError(
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
  return _unflatten(adapted)


def replace_head(params: Any, num_classes: int, bias: float = 0.0) -> dict[str, Any]:
  """Returns `params` with a new zero head for `num_classes` (none if 0).

  The kernel is zeros, as in the paper's fine-tuning and `MlpMixer`'s init,
  and the bias is filled with `bias` (e.g. -log(num_classes) or big_vision's
  -10 for sigmoid losses over many classes).
  """
  tree = dict(_plain_tree(params))
  hidden = _shape(tree, 'pre_head_layer_norm', 'scale')
  if hidden is None:
    raise CheckpointError(
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


def load_for_model(path: str | os.PathLike[str] | Mapping[str, Any],
                   model: models.MlpMixer, image_size: int, *,
                   from_image_size: int | None = None, head: str = 'replace',
                   head_bias: float = 0.0) -> dict[str, Any]:
  """Loads a released-format checkpoint for `model` at `image_size` px.

  Steps: read the file (`path` may also be a tree already read by load_npz);
  take the resolution it was trained at from `from_image_size`, or else from
  its token count S and patch p (sqrt(S)·p, e.g. 196 tokens at patch 16 ->
  224 px); if that differs from `image_size`, adapt_to_resolution (the model
  must then have tokens_mlp_dim multiplied by K², see adapted_tokens_mlp_dim);
  with head='replace' put a zero head for `model.num_classes` with bias
  `head_bias` (head='keep' keeps the file's head, which must then match); a
  model with num_classes=0 gets no head either way. Finally check the tree
  against the model's `jax.eval_shape` init.

  Returns:
    A nested dict of numpy arrays, unboxed, with exactly the model's keys,
    shapes and dtypes (float32): `model.apply({'params': tree}, ...)`.

  Raises:
    CheckpointError: the file is unreadable, is another variant, has a
      resolution that cannot be adapted, or (head='keep') another head.
    ValueError: `head` is neither 'replace' nor 'keep'.
  """
  if head not in ('replace', 'keep'):
    raise ValueError(f"head={head!r}: use 'replace' (new zero head) or 'keep' (the file's).")
  source = os.fspath(path) if not isinstance(path, Mapping) else 'the given tree'
  params = load_npz(path) if not isinstance(path, Mapping) else _plain_tree(path)
  expected = model_param_shapes(model, image_size)
  found = infer_architecture(params)
  if found.grid_size is None:
    raise CheckpointError(
        f'{source}: its token-mixing MLP takes {found.num_tokens} tokens, not a square '
        'grid. Only square images are supported; re-export the checkpoint from a square model.')
  inferred_size = found.image_size
  if from_image_size is None:
    from_image_size = inferred_size
  elif from_image_size != inferred_size:
    raise CheckpointError(
        f'{source}: from_image_size={from_image_size} (config.init_from_image_size) means '
        f'{(from_image_size // found.patch_size) ** 2} tokens at patch {found.patch_size}, '
        f'but the file has {found.num_tokens} tokens ({inferred_size} px). Set it to '
        f'{inferred_size} or leave it unset to infer it from the file.')
  if from_image_size != image_size and found.patch_size == model.patch_size:
    try:
      params = adapt_to_resolution(params, from_image_size, image_size, found.patch_size)
    except CheckpointError as e:
      raise CheckpointError(f'{source} (trained at {from_image_size} px): {e}') from None
  if model.num_classes == 0 or head == 'replace':
    params = replace_head(params, model.num_classes, head_bias)
  try:
    check_params(params, expected)
  except CheckpointError as e:
    raise CheckpointError(f'{source} at {image_size} px: {e}') from None
  flat_expected = _flatten(expected)
  return _unflatten({key: np.asarray(value, dtype=flat_expected[key].dtype)
                     for key, value in _flatten(params).items()})


# =============================================================================
# Train-state checkpoints (orbax): async saves, keep-N, preemption, resume
# =============================================================================

class TrainCheckpointer:
  """Saves and restores the whole train state under `<workdir>/checkpoints/<step>`.

  - Saves are asynchronous (training goes on while the arrays are written) and
    atomic: orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it only when
    every process has finished, so a run killed mid-save resumes from the last
    complete step.
  - A save happens every `every` steps and whenever a preemption is signalled:
    on multi-host TPU/GPU through JAX's preemption sync point (all hosts agree on
    the step), in a single process on SIGTERM.
  - The newest `keep` checkpoints are kept.
  - Each checkpoint stores `meta` (JSON): the model description and the run's
    bookkeeping (core-hours so far), so a workdir holding another model's
    checkpoint is refused before anything is written.
  """

  def __init__(self, workdir: str, every: int, keep: int):
    self.directory = os.path.join(workdir, 'checkpoints')  # Local or e.g. gs://.
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(max(int(every), 1)),
            policies.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=policies.LatestN(max(int(keep), 1)),
        enable_async_checkpointing=True,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'meta'))
    self._sigterm = threading.Event()
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      # Multi-process runs get preemption notices from JAX's coordination service.
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint at the next step, then stopping.')
    self._sigterm.set()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def read_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored['meta'])

  def restore(self, step: int, abstract_state):
    """Restores `state` into the shardings of `abstract_state` (any mesh or device count)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['meta'])

  def reached_preemption(self, step: int) -> bool:
    return self._sigterm.is_set() or self._manager.reached_preemption(step)

  def maybe_save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    """Saves if the policy (interval or preemption) says so, or if `force`."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(json.loads(json.dumps(meta))))
    saved = self._manager.save(step, args=args, force=force or self._sigterm.is_set())
    if saved:
      logging.info('Checkpoint of step %d started (async) in %s', step, self.directory)
    return saved

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
    if hasattr(self, '_previous_handler'):
      signal.signal(signal.SIGTERM, self._previous_handler)
