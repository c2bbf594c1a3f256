"""Plot of how cost grows with batch size, resolution and model size (docs/benchmarks.png).

  python -m mixer.benchmarks.plot --results=bench_sweep.jsonl --out=docs/benchmarks.png

Reads `forward`/`train` records of `mixer.benchmarks.run` and draws, in three
panels, milliseconds per image against batch size, against resolution, and
against model (with each model's analytic forward GFLOPs per image). The
resolution panel also draws the analytic FLOPs of Mixer at that resolution
with the token-mixing MLP kept at its width (linear in the token count) and
widened by the token ratio as in the paper's high-resolution fine-tuning
(Appendix C; token mixing then grows with the square of the token count).
"""

from __future__ import annotations

import collections
import json
import math

from absl import app, flags

from mixer import models


def _ms_per_image(record) -> float:
  """CPU-milliseconds per image where measured (robust to other load), else wall ms per image."""
  if record.get('cpu_ms_per_image'):
    return record['cpu_ms_per_image']
  return 1000.0 / record['img_per_sec_per_device']


def _series(records, vary: str, fixed: tuple[str, ...]):
  """{(mode, fixed values): sorted [(x, ms/image)]} over records that differ only in `vary`."""
  groups = collections.defaultdict(dict)
  for r in records:
    key = (r['benchmark'],) + tuple(r[f] for f in fixed)
    groups[key][r[vary]] = _ms_per_image(r)
  return {k: sorted(v.items()) for k, v in groups.items() if len(v) > 1}


def _forward_gflops(name: str, image_size: int, widen_tokens_mlp: bool = False) -> float:
  from mixer.benchmarks import model_bench  # pylint: disable=g-import-not-at-top
  model = models.get_model(name, num_classes=1000)
  if widen_tokens_mlp:  # Appendix C: D_S grows with the token count.
    ratio = (image_size // model.patch_size) ** 2 / (224 // model.patch_size) ** 2
    model = model.clone(tokens_mlp_dim=int(round(model.tokens_mlp_dim * ratio)))
  return model_bench.forward_flops(model, image_size) / 1e9


def _label_above(xs: list[float], ys: list[float]) -> list[bool]:
  """Whether each point of a log-log line is labelled above it (else below): above where the
  line bends down there (the point lies above the chord of its neighbours), so that models
  close in GFLOPs, one faster than the other (L/32 and B/16), keep their labels apart; an end
  point on the side its neighbour's label is not."""
  logs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys)]
  above = [None] * len(logs)
  for i in range(1, len(logs) - 1):
    (x0, y0), (x, y), (x1, y1) = logs[i - 1:i + 2]
    chord = y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else (y0 + y1) / 2
    above[i] = y >= chord
  if len(logs) > 1:
    above[0] = not above[1] if above[1] is not None else ys[0] >= ys[1]
    above[-1] = not above[-2] if above[-2] is not None else ys[-1] > ys[-2]
  return [bool(a) for a in above]


def plot(records: list[dict], out: str) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  records = [r for r in records if r.get('benchmark') in ('forward', 'train')]
  if not records:
    raise ValueError('No forward/train records to plot: run mixer.benchmarks.run first.')
  device = records[0]['device_kind']
  ylabel = ('CPU-ms per image (all threads of the process)' if records[0].get('cpu_ms_per_image')
            else 'ms per image (per device)')
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))

  ax = axes[0]
  for (mode, model, size, dtype), points in _series(
      records, 'batch_size', ('model', 'image_size', 'dtype')).items():
    xs, ys = zip(*points)
    ax.plot(xs, ys, 'o-', label=f'{mode} {model} @{size} {dtype}')
  ax.set(xscale='log', xlabel='global batch size', ylabel=ylabel,
         title='Batch size')
  ax.set_xticks(sorted({r['batch_size'] for r in records}))
  ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax.legend(fontsize=8)

  ax = axes[1]
  twin = ax.twinx()
  for (mode, model, batch, dtype), points in _series(
      records, 'image_size', ('model', 'batch_size', 'dtype')).items():
    xs, ys = zip(*points)
    ax.plot(xs, ys, 'o-', label=f'{mode} {model} batch {batch} {dtype} (measured)')
    grid = list(range(min(xs), max(xs) + 1, 16))
    twin.plot(grid, [_forward_gflops(model, s) for s in grid], ':', color='grey',
              label=f'{model} GFLOP/img, D_S fixed')
    twin.plot(grid, [_forward_gflops(model, s, widen_tokens_mlp=True) for s in grid], '--',
              color='grey', label=f'{model} GFLOP/img, D_S x tokens (App. C)')
  ax.set(xlabel='image size (px)', ylabel=ylabel,
         title='Resolution (tokens = (size / patch)^2)')
  twin.set_ylabel('analytic forward GFLOP per image')
  lines = ax.get_legend_handles_labels()
  twin_lines = twin.get_legend_handles_labels()
  ax.legend(lines[0] + twin_lines[0], lines[1] + twin_lines[1], fontsize=7, loc='upper left')

  ax = axes[2]
  by_model = collections.defaultdict(dict)
  for r in records:
    by_model[(r['benchmark'], r['image_size'], r['batch_size'], r['dtype'])][r['model']] = r
  for (mode, size, batch, dtype), chosen in by_model.items():
    if len(chosen) < 2:
      continue
    names = sorted(chosen, key=lambda n: chosen[n]['model_gflops_per_image'])
    xs = [chosen[n]['model_gflops_per_image'] for n in names]
    ax.plot(xs, [_ms_per_image(chosen[n]) for n in names], 'o-',
            label=f'{mode} @{size} batch {batch} {dtype}')
    ys = [_ms_per_image(chosen[n]) for n in names]
    for n, x, y, above in zip(names, xs, ys, _label_above(xs, ys)):
      ax.annotate(n.replace('Mixer-', ''), (x, y), fontsize=8, textcoords='offset points',
                  xytext=(0, 6 if above else -13), ha='center')
  ax.set(xscale='log', yscale='log', xlabel='model GFLOP per image (forward 1x, train 3x)',
         ylabel=ylabel, title='Model size')
  ax.margins(x=0.08, y=0.12)  # Room for the labels of the end points inside the frame.
  for axis in (ax.xaxis, ax.yaxis):
    axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
    # Minor ticks labelled at 2, 3 and 5 times a power of ten only: all nine crowd together.
    axis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda value, _: f'{value:g}' if f'{value:.0e}'[0] in '235' else ''))
  ax.legend(fontsize=8)

  fig.suptitle(f'Cost per image on {device} ({records[0]["devices"]} device)')
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def main(argv, results: str, out: str) -> None:
  del argv
  with open(results, encoding='utf-8') as f:
    records = [json.loads(line) for line in f if line.strip()]
  print(plot(records, out))


if __name__ == '__main__':
  # Defined here, not at import: `mixer.benchmarks.run` has an --out of its own.
  _RESULTS = flags.DEFINE_string('results', 'bench_results.jsonl',
                                 'JSON lines of benchmarks.run.')
  _OUT = flags.DEFINE_string('out', 'docs/benchmarks.png', 'Output PNG.')
  app.run(lambda argv: main(argv, _RESULTS.value, _OUT.value))
