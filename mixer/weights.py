"""Released-format `.npz` weights: read, write, and load for a model.

The layout of Google's released MLP-Mixer weights
(`https://storage.googleapis.com/mixer_models/...`): one array per parameter,
keyed by its `/`-joined path without any prefix, e.g.
`MixerBlock_0/token_mixing/Dense_0/kernel`, exactly the tree of
`mixer.models.MlpMixer`. `load_for_model` is the one call the trainer,
`mixer.predict` and the exporters use: it reads a file, adapts it to the
model's resolution (the paper's Appendix C, `mixer.surgery`) and head, and
checks it against the model.

Files this project writes also get a sidecar, `<name>.json` beside
`<name>.npz` (`write_sidecar`/`read_sidecar`): the model sizes, image size,
evaluation preprocessing, labels, loss and the config and step they came from,
so that predict and export need no flags (timm keeps the same facts in its
`pretrained_cfg`). The `.npz` itself stays exactly the released layout.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixer import models, param_layout, paths, surgery
from mixer.surgery import WeightsError

_RELEASED_URL = 'https://storage.googleapis.com/mixer_models/'
SIDECAR_VERSION = 1


def _read_remote(path: str) -> io.BytesIO:
  if not paths.exists(path):
    raise WeightsError(f'{path}: no such file. Check the path (and your access to it).')
  return io.BytesIO(paths.read_bytes(path))


def _size(source: str | io.BytesIO) -> int:
  return source.getbuffer().nbytes if isinstance(source, io.BytesIO) else os.path.getsize(source)


def load_npz(path: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads a released-format `.npz` into a nested dict of numpy arrays.

  Keys are split on `/` (`stem/kernel` -> `{'stem': {'kernel': ...}}`).
  `path` may be local or in a bucket (gs://...). Only plain numeric arrays are
  read: pickled objects are refused, as in vision_transformer's loader, because
  unpickling runs arbitrary code.

  Raises:
    WeightsError: the file does not exist, is not an npz (zip) archive, is
      truncated or corrupt, holds something other than numeric arrays, or has
      keys that do not form a tree.
  """
  path = os.fspath(path)
  if paths.is_remote(path):
    source = _read_remote(path)
  else:
    if not os.path.exists(path):
      raise WeightsError(
          f'{path}: no such file. Check the path; released weights are at '
          f'{_RELEASED_URL}<dataset>/<model>.npz (see docs/weights.md).')
    if os.path.isdir(path):
      raise WeightsError(
          f'{path}: is a directory, not an .npz file. Pass the .npz file itself.')
    source = path
  # The zip directory sits at the end of the file, so an interrupted download
  # (or an HTML error page saved under the .npz name) fails this test.
  if not zipfile.is_zipfile(source):
    raise WeightsError(
        f'{path}: not an .npz (zip) archive, or truncated ({_size(source)} bytes). '
        'Re-download the file, or write it with mixer.weights.save_npz.')
  flat = {}
  try:
    with np.load(source, allow_pickle=False) as archive:
      for key in archive.files:
        value = archive[key]
        if not isinstance(value, np.ndarray):
          raise WeightsError(
              f'{path}: member {key!r} is not a .npy array. The file is a zip archive but not a '
              'checkpoint; pass a released-format .npz.')
        if value.dtype.kind not in 'biuf':
          raise WeightsError(
              f'{path}: array {key!r} has dtype {value.dtype}, not a numeric type. '
              'Re-export the checkpoint with numeric arrays (mixer.weights.save_npz).')
        flat[key] = value
  except WeightsError:
    raise
  except ValueError as e:
    if 'allow_pickle' in str(e) or 'Object arrays' in str(e):
      raise WeightsError(
          f'{path}: holds pickled Python objects, which are not loaded because unpickling '
          'can run arbitrary code. Re-export it with plain arrays (mixer.weights.save_npz).'
      ) from e
    raise WeightsError(f'{path}: corrupt .npz ({e}). Re-download or re-export it.') from e
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as e:
    raise WeightsError(
        f'{path}: truncated or corrupt .npz ({type(e).__name__}: {e}). '
        'Re-download the file (compare its size with the source).') from e
  if not flat:
    raise WeightsError(f'{path}: holds no arrays. Pass a released-format .npz checkpoint.')
  try:
    return surgery.unflatten(flat)
  except ValueError as e:  # E.g. both 'head' and 'head/kernel'.
    raise WeightsError(
        f'{path}: its keys do not form a parameter tree ({e}). Released files use flat '
        "'/'-joined keys such as 'stem/kernel'.") from e


def _as_saveable(key: str, value: Any) -> np.ndarray:
  try:
    array = np.asarray(jax.device_get(value))
  except Exception as e:  # Anything np.asarray cannot turn into an array.
    raise WeightsError(
        f'Cannot save parameter {key!r}: {type(value).__name__} is not an array ({e}). '
        'Pass a tree of jax or numpy arrays.') from e
  if array.dtype.kind in 'biuf':
    return array
  # bfloat16 & co. (ml_dtypes) are floats that plain numpy readers cannot load.
  if jnp.issubdtype(array.dtype, jnp.floating):
    return array.astype(np.float32)
  raise WeightsError(
      f'Cannot save parameter {key!r}: dtype {array.dtype} is not numeric '
      f'(value of type {type(value).__name__}). Pass a tree of jax or numpy arrays.')


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
    WeightsError: a leaf is not a numeric array (nothing is written).
  """
  path = os.fspath(path)
  # Files are always in the released per-block layout, whatever the model's scan_blocks.
  released = param_layout.to_released(surgery.plain_tree(params))
  flat = {key: _as_saveable(key, value) for key, value in surgery.flatten(released).items()}
  # Given a file object, np.savez writes exactly there (no '.npz' suffix added).
  paths.atomic_write(path, lambda f: np.savez(f, **flat))


def sidecar_path(npz_path: str) -> str:
  """`DIR/final.npz` -> `DIR/final.json`."""
  root, _ = os.path.splitext(os.fspath(npz_path))
  return root + '.json'


def write_sidecar(npz_path: str, info: Mapping[str, Any]) -> str:
  """Writes `info` (JSON-able) as the sidecar of `npz_path`, atomically; returns its path."""
  path = sidecar_path(npz_path)
  text = json.dumps({'sidecar_version': SIDECAR_VERSION, **info}, indent=1, sort_keys=True,
                    default=str)
  paths.atomic_write(path, lambda f: f.write(text.encode()))
  return path


def read_sidecar(npz_path: str) -> dict[str, Any] | None:
  """The sidecar of `npz_path`, or None where there is none (e.g. Google's released files)."""
  path = sidecar_path(npz_path)
  if not paths.exists(path):
    return None
  try:
    info = json.loads(paths.read_bytes(path))
  except (ValueError, UnicodeDecodeError) as e:
    raise WeightsError(
        f'{path}: not a valid sidecar ({e}). Delete it to fall back to the released-file '
        'defaults, or re-export the weights.') from e
  if not isinstance(info, dict):
    raise WeightsError(f'{path}: not a JSON object. Delete it or re-export the weights.')
  return info


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
    WeightsError: the file is unreadable, is another variant, has a
      resolution that cannot be adapted, or (head='keep') another head.
    ValueError: `head` is neither 'replace' nor 'keep'.
  """
  if head not in ('replace', 'keep'):
    raise ValueError(f"head={head!r}: use 'replace' (new zero head) or 'keep' (the file's).")
  source = os.fspath(path) if not isinstance(path, Mapping) else 'the given tree'
  params = load_npz(path) if not isinstance(path, Mapping) else surgery.plain_tree(path)
  # Surgery happens in the released layout; a scanned model gets its blocks stacked at the end.
  scanned = bool(getattr(model, 'scan_blocks', False))
  if scanned:
    model = model.clone(scan_blocks=False)
  expected = surgery.model_param_shapes(model, image_size)
  found = surgery.infer_architecture(params)
  if found.grid_size is None:
    raise WeightsError(
        f'{source}: its token-mixing MLP takes {found.num_tokens} tokens, not a square '
        'grid. Only square images are supported; re-export the checkpoint from a square model.')
  inferred_size = found.image_size
  if from_image_size is None:
    from_image_size = inferred_size
  elif from_image_size != inferred_size:
    raise WeightsError(
        f'{source}: from_image_size={from_image_size} (config.init_from_image_size) means '
        f'{(from_image_size // found.patch_size) ** 2} tokens at patch {found.patch_size}, '
        f'but the file has {found.num_tokens} tokens ({inferred_size} px). Set it to '
        f'{inferred_size} or leave it unset to infer it from the file.')
  if from_image_size != image_size and found.patch_size == model.patch_size:
    try:
      params = surgery.adapt_to_resolution(params, from_image_size, image_size, found.patch_size)
    except WeightsError as e:
      raise WeightsError(f'{source} (trained at {from_image_size} px): {e}') from None
  if model.num_classes == 0 or head == 'replace':
    params = surgery.replace_head(params, model.num_classes, head_bias)
  try:
    surgery.check_params(params, expected)
  except WeightsError as e:
    raise WeightsError(f'{source} at {image_size} px: {e}') from None
  flat_expected = surgery.flatten(expected)
  params = surgery.unflatten({key: np.asarray(value, dtype=flat_expected[key].dtype)
                              for key, value in surgery.flatten(params).items()})
  return param_layout.to_scanned(params, model.num_blocks) if scanned else params
