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
zero), with a colour scale for that -1..1 range at the top right. The title
names the file and the block, the subtitle how many units of how many are
shown on what patch grid.

Layout, pixel-exact so each weight is a sharp square: cells of `g·scale`
pixels with `scale = ceil(64 / g)` (nearest-neighbour upscaling; 70 px for
g = 14), `columns = min(16, n + n % 2)` cells a row for n units (8 pairs),
`rows = ceil(n / columns)`. Dark separators: 2 px between the two units of a
pair, 10 px between pairs and between rows, and a 4 px frame around the grid.
The grid starts `MARGIN_PX` from the left and `TOP_PX` from the top of the PNG
(room for the title and the horizontal colour scale):
width = max(MIN_WIDTH_PX, grid width + 2·MARGIN_PX), height = TOP_PX + grid
height + MARGIN_PX, with grid width = columns·cell + (columns/2)·2 +
(columns/2 - 1)·10 + 2·4 and grid height = rows·cell + (rows - 1)·10 + 2·4.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from absl import app, flags

from mixer import weights as weights_lib

_MAX_COLUMNS = 16   # 8 pairs a row.
_CELL_TARGET_PX = 64
PAIR_GAP_PX = 2     # Between the two units of a pair.
GAP_PX = 10         # Between pairs and between rows.
FRAME_PX = 4       # Around the grid, so white cells at its edge keep their shape.
MARGIN_PX, TOP_PX = 16, 84
MIN_WIDTH_PX = 900  # Room for the title and the colour scale over a few units.
_DPI = 100
_SEPARATOR = '#3c3c3c'  # Dark, so units whose weights are near zero (white) stay distinct.
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


def grid_layout(num_units: int, grid: int) -> dict[str, int]:
  """Cell size, columns, rows and the grid's pixel size (see the module docstring)."""
  cell = grid * math.ceil(_CELL_TARGET_PX / grid)
  columns = min(_MAX_COLUMNS, num_units + num_units % 2)
  rows = math.ceil(num_units / columns)
  pairs = columns // 2
  width = columns * cell + pairs * PAIR_GAP_PX + (pairs - 1) * GAP_PX + 2 * FRAME_PX
  height = rows * cell + (rows - 1) * GAP_PX + 2 * FRAME_PX
  return {'cell': cell, 'columns': columns, 'rows': rows, 'width': width, 'height': height}


def _cell_origins(layout: dict[str, int]) -> tuple[list[int], list[int]]:
  """Pixel offsets in the grid of each column's and each row's first pixel."""
  cell, lefts, left = layout['cell'], [], FRAME_PX
  for column in range(layout['columns']):
    lefts.append(left)
    left += cell + (PAIR_GAP_PX if column % 2 == 0 else GAP_PX)
  tops = [FRAME_PX + row * (cell + GAP_PX) for row in range(layout['rows'])]
  return lefts, tops


def _mosaic(units: np.ndarray) -> np.ndarray:
  """The units, each scaled to [-1, 1] by its max |weight|, in one float image; NaN = separator."""
  num_units, grid, _ = units.shape
  layout = grid_layout(num_units, grid)
  scale = layout['cell'] // grid
  mosaic = np.full((layout['height'], layout['width']), np.nan)
  lefts, tops = _cell_origins(layout)
  for index, unit in enumerate(units):
    row, column = divmod(index, layout['columns'])
    values = unit / max(np.abs(unit).max(), 1e-30)  # In [-1, 1], zero stays white.
    values = np.repeat(np.repeat(values, scale, axis=0), scale, axis=1)
    top, left = tops[row], lefts[column]
    mosaic[top:top + layout['cell'], left:left + layout['cell']] = values
  return mosaic


def figure(units: np.ndarray, title: str, subtitle: str):
  """The matplotlib Figure: title, subtitle, the units (pixel-exact) and a colour scale."""
  matplotlib.use('Agg')  # Files only, also on machines without a display.
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import cm, colors  # pylint: disable=g-import-not-at-top

  mosaic = _mosaic(units)
  grid_height, grid_width = mosaic.shape
  width = max(MIN_WIDTH_PX, grid_width + 2 * MARGIN_PX)
  height = TOP_PX + grid_height + MARGIN_PX
  fig = plt.figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
  ax = fig.add_axes((MARGIN_PX / width, MARGIN_PX / height, grid_width / width,
                     grid_height / height))
  colormap = matplotlib.colormaps[_COLORMAP].with_extremes(bad=_SEPARATOR)
  norm = colors.Normalize(vmin=-1.0, vmax=1.0)
  ax.imshow(np.ma.masked_invalid(mosaic), cmap=colormap, norm=norm, interpolation='nearest',
            aspect='auto', resample=False)
  ax.set_axis_off()
  fig.text(MARGIN_PX / width, 1 - 12 / height, title, fontsize=14, fontweight='bold', va='top')
  fig.text(MARGIN_PX / width, 1 - 42 / height, subtitle, fontsize=9.5, va='top', color='#333333')
  # The colour scale: horizontal, top right, above the grid whatever its height.
  bar_width = 180
  cax = fig.add_axes(((width - MARGIN_PX - bar_width) / width, 1 - 26 / height,
                      bar_width / width, 10 / height))
  bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=colormap), cax=cax,
                     orientation='horizontal', ticks=[-1, 0, 1])
  cax.xaxis.set_ticks_position('bottom')
  bar.ax.tick_params(labelsize=8)
  bar.ax.set_xticklabels(['-1', '0', '+1'])
  cax.set_title('weight / max |weight| of its unit', fontsize=8, pad=3)
  return fig


def _display_name(weights: Any) -> str:
  """'imagenet21k/Mixer-B_16.npz': the file and its folder (two releases share a name)."""
  if isinstance(weights, Mapping):
    return 'weights in memory'
  parts = os.path.normpath(os.fspath(weights)).split(os.sep)
  return '/'.join(parts[-2:])


def visualize(weights: str | os.PathLike[str] | Mapping[str, Any], out: str | os.PathLike[str],
              block: int = 0, num_units: int | None = None) -> str:
  """Writes the PNG described in the module docstring and returns its path.

  Args:
    weights: a released-format .npz (or a tree read by weights_lib.load_npz).
    out: the PNG to write (its directory is created).
    block: which MixerBlock's token-mixing MLP (the paper shows 0, 1 and 2).
    num_units: draw only the first units in paired, frequency-sorted order;
      None draws all D_S.

  Raises:
    ValueError: bad block or num_units; weights_lib.WeightsError for a bad file.
  """
  params = weights if isinstance(weights, Mapping) else weights_lib.load_npz(weights)
  units = token_mixing_units(params, block)
  if num_units is not None and not 1 <= num_units <= len(units):
    raise ValueError(f'num_units={num_units}: the MLP has {len(units)} hidden units; '
                     f'pick 1..{len(units)} or leave it unset for all.')
  order = paired_order(units)[:num_units]
  grid = units.shape[-1]
  title = f'{_display_name(weights)}: MixerBlock_{block} token-mixing units'
  subtitle = (f'{len(order)} of {len(units)} hidden units, each over the {grid}x{grid} patch '
              'grid; opposite-phase pairs side by side, low spatial frequency first')
  # Files this project wrote carry a sidecar: name the model and how it was trained.
  sidecar = None if isinstance(weights, Mapping) else weights_lib.read_sidecar(weights)
  if sidecar:
    subtitle = (f"{sidecar['model']['name']} at {sidecar['image_size']} px, step "
                f"{sidecar['step']} on {sidecar.get('dataset', '?')}. " + subtitle)
  fig = figure(units[order], title, subtitle)
  out = os.fspath(out)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.savefig(out, format='png', dpi=_DPI)
  plt.close(fig)
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
