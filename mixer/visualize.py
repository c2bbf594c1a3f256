"""Draws the hidden units of a token-mixing MLP, as in the paper's Figure 5.

  python -m mixer.visualize --weights=imagenet21k/Mixer-B_16.npz --out=block0.png --block=0

Each hidden unit of `MixerBlock_{block}/token_mixing/Dense_0` has one weight
per input token, S = g×g of them (196 = 14×14 for /16 at 224 px). A unit's
column of the kernel, reshaped to the g×g patch grid in raster order, shows
which image positions it sums: the paper finds local detectors, global
detectors and opposite-phase pairs.

What is drawn: units are paired greedily, most anti-correlated first (the
paper pairs units "to highlight the emergence of kernels of opposing phase"),
and the pairs are sorted by spatial frequency (the power-weighted mean radial
frequency of the 2-D Fourier transform, low first; "pairs are sorted by
filter frequency"). Each unit is scaled by its own largest |weight| and
drawn with the diverging colormap RdBu_r (red positive, blue negative, white
zero); the two units of a pair sit side by side.

Image size: cells of `g·scale` pixels with `scale = ceil(32 / g)` (nearest-
neighbour upscaling; 42 px for g = 14), `columns = min(16, n + n % 2)` cells a
row for n units, `rows = ceil(n / columns)`, with 2-pixel light-grey gaps between
and around cells: width = columns·(g·scale + 2) + 2, height = rows·(g·scale + 2) + 2.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from absl import app, flags
from PIL import Image

from mixer import checkpoint

_MAX_COLUMNS = 16   # 8 pairs a row.
_CELL_TARGET_PX = 32
_GAP_PX = 2
_GAP_GREY = 200  # Not white, so cells whose weights are near zero stay distinct.
_COLORMAP = 'RdBu_r'
FLAGS = flags.FLAGS


def token_mixing_units(params: Mapping[str, Any], block: int = 0) -> np.ndarray:
  """The hidden units of block `block`'s first token-mixing layer, `[D_S, g, g]`.

  Raises:
    ValueError: no such block, or the token count is not a square grid.
  """
  blocks = params if isinstance(params, Mapping) else {}
  name = f'MixerBlock_{block}'
  if name not in blocks:
    num_blocks = sum(1 for key in blocks if key.startswith('MixerBlock_'))
    if not num_blocks:
      raise ValueError('The weights have no MixerBlock_* parameters: pass an MLP-Mixer '
                       'checkpoint in the released layout.')
    raise ValueError(f'block={block}: the checkpoint has blocks 0..{num_blocks - 1}; '
                     'pick one of those.')
  kernel = np.asarray(blocks[name]['token_mixing']['Dense_0']['kernel'], np.float64)
  num_tokens, num_units = kernel.shape
  grid = math.isqrt(num_tokens)
  if grid * grid != num_tokens:
    raise ValueError(f'{name} mixes {num_tokens} tokens, not a square grid; only square '
                     'images can be drawn.')
  return kernel.T.reshape(num_units, grid, grid)


def _mean_frequency(units: np.ndarray) -> np.ndarray:
  """Power-weighted mean radial frequency (cycles per patch) of each unit."""
  grid = units.shape[-1]
  freqs = np.fft.fftfreq(grid)
  radius = np.hypot(freqs[:, None], freqs[None, :])
  power = np.abs(np.fft.fft2(units)) ** 2
  return (power * radius).sum(axis=(1, 2)) / np.maximum(power.sum(axis=(1, 2)), 1e-30)


def paired_order(units: np.ndarray) -> list[int]:
  """Unit indices: opposite-phase pairs (greedy, most anti-correlated first), low frequencies
  first."""
  flat = units.reshape(len(units), -1)
  flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-30)
  correlation = flat @ flat.T
  first, second = np.triu_indices(len(units), k=1)
  paired = np.zeros(len(units), bool)
  pairs = []
  for idx in np.argsort(correlation[first, second], kind='stable'):
    i, j = first[idx], second[idx]
    if not paired[i] and not paired[j]:
      paired[i] = paired[j] = True
      pairs.append((int(i), int(j)))
      if 2 * len(pairs) >= len(units) - 1:
        break
  pairs += [(int(i),) for i in np.flatnonzero(~paired)]  # An odd unit out.
  frequency = _mean_frequency(units)
  pairs.sort(key=lambda pair: float(np.mean(frequency[list(pair)])))
  return [unit for pair in pairs for unit in pair]


def _render(units: np.ndarray) -> Image.Image:
  num_units, grid, _ = units.shape
  scale = math.ceil(_CELL_TARGET_PX / grid)
  cell = grid * scale
  columns = min(_MAX_COLUMNS, num_units + num_units % 2)
  rows = math.ceil(num_units / columns)
  canvas = np.full((rows * (cell + _GAP_PX) + _GAP_PX, columns * (cell + _GAP_PX) + _GAP_PX, 3),
                   _GAP_GREY, np.uint8)
  colormap = matplotlib.colormaps[_COLORMAP]
  for index, unit in enumerate(units):
    values = unit / max(np.abs(unit).max(), 1e-30)  # In [-1, 1], zero stays white.
    rgb = (colormap((values + 1) / 2)[..., :3] * 255).round().astype(np.uint8)
    rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    row, column = divmod(index, columns)
    top = _GAP_PX + row * (cell + _GAP_PX)
    left = _GAP_PX + column * (cell + _GAP_PX)
    canvas[top:top + cell, left:left + cell] = rgb
  return Image.fromarray(canvas)


def visualize(weights: str | os.PathLike[str] | Mapping[str, Any], out: str | os.PathLike[str],
              block: int = 0, num_units: int | None = None) -> str:
  """Writes the PNG described in the module docstring and returns its path.

  Args:
    weights: a released-format .npz (or a tree read by checkpoint.load_npz).
    out: the PNG to write (its directory is created).
    block: which MixerBlock's token-mixing MLP (the paper shows 0, 1 and 2).
    num_units: draw only the first units in paired, frequency-sorted order;
      None draws all D_S.

  Raises:
    ValueError: bad block or num_units; checkpoint.CheckpointError for a bad file.
  """
  params = weights if isinstance(weights, Mapping) else checkpoint.load_npz(weights)
  units = token_mixing_units(params, block)
  if num_units is not None and not 1 <= num_units <= len(units):
    raise ValueError(f'num_units={num_units}: the MLP has {len(units)} hidden units; '
                     f'pick 1..{len(units)} or leave it unset for all.')
  order = paired_order(units)[:num_units]
  out = os.fspath(out)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  _render(units[order]).save(out, format='PNG')
  return out


def _define_flags() -> None:
  """Defined only when run as a program, so importing this module defines no flags."""
  flags.DEFINE_string('weights', None, 'Released-format .npz.', required=True)
  flags.DEFINE_string('out', None, 'PNG file to write.', required=True)
  flags.DEFINE_integer('block', 0, 'Mixer block whose token-mixing MLP to draw.')
  flags.DEFINE_integer('num_units', None, 'Units to draw (default: all).')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}.')
  try:
    path = visualize(FLAGS.weights, FLAGS.out, block=FLAGS.block, num_units=FLAGS.num_units)
  except ValueError as e:  # Includes CheckpointError: the message says what to fix.
    raise SystemExit(f'error: {e}') from None
  print(f'Wrote {path}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
