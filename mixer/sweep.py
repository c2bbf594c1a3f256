r"""`python -m mixer.sweep`: the paper's lr grid per task, selected on val, test reported.

  python -m mixer.sweep --list
  python -m mixer.sweep --config=configs/transfer.py:task=pets,variant=B_16 --workdir=ROOT
  python -m mixer.sweep --config=configs/transfer.py:variant=L_16 --tasks=vtab --workdir=ROOT
  ... --print_commands      one `python -m mixer.main` command per grid point (for a cluster)
  ... --config.data_dir=DIR any config override, passed on to every run
  ... --rehearse            each grid point through mixer.rehearse: fake data with the
                            task's splits and classes, tiny compute (a CPU check)

For each task (mixer.transfer_tasks) it runs every lr of the task's grid
through `mixer.train.train_and_evaluate`, one after the other, each in its own
workdir ROOT/<task>/lr<lr>, and reads the final step's 'val/accuracy' and
'test/accuracy' back from each run's metrics.jsonl. The best lr by val is
chosen (a tie goes to the earlier grid point) and its test accuracy reported,
as the paper does. VTAB-1k tasks then fine-tune once more with that lr on all
1,000 examples (ROOT/<task>/final_lr<lr>, config argument `final`) and report
that run's test accuracy.

A grid point whose metrics.jsonl already holds its last step is not run again,
and an interrupted one resumes from its checkpoint, so rerunning the same
command resumes a sweep (and collects what a cluster ran from the printed
commands). Results: ROOT/<task>/result.json per task, and ROOT/results.md with
one row per task and, for VTAB-1k tasks, the natural / specialized /
structured / overall averages (the paper's VTAB-1k column is the mean over the
19 tasks).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mixer import paths, transfer_tasks
from mixer.workdir import EXIT_PREEMPTED

RESULT_FILE = 'result.json'
TABLE_FILE = 'results.md'
RUN_FILE = 'sweep_run.json'  # What each grid point's workdir was made for.


class Stopped(Exception):
  """A run returned before its last step (SIGTERM, preemption): the sweep stops there."""


@dataclasses.dataclass(frozen=True)
class Runner:
  """How a grid point is trained and where its last step's metrics are.

  `train(config, workdir)` trains (None: print commands, train nothing);
  `subdir` is where under the workdir metrics.jsonl lands; `last_step(config)`
  is the step whose metrics count.
  """
  train: Callable[[Any, str], Any] | None
  subdir: str = ''
  last_step: Callable[[Any], int] = lambda config: config.total_steps


def rehearsal_runner() -> Runner:
  """Each grid point through `mixer.rehearse` (fake data, shrunk compute), for a CPU."""
  from mixer import rehearse  # pylint: disable=g-import-not-at-top

  def train(config, workdir):
    report = rehearse.rehearse(config, workdir)
    print(report['verdict'])
    if not report['passed']:
      raise ValueError(f"the rehearsal in {workdir} failed: {report['verdict']}")

  return Runner(train, subdir='run', last_step=lambda config: rehearse.STEPS)


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep."""
  task: str
  lr: float
  final: bool
  config_arg: str   # The --config value of the run (path:args).
  workdir: str

  def command(self, overrides: Sequence[str]) -> str:
    parts = ['python', '-m', 'mixer.main', f'--config={self.config_arg}',
             f'--workdir={self.workdir}', *overrides]
    return ' '.join(shlex.quote(p) for p in parts)


def _lr_name(lr: float) -> str:
  return f'lr{lr:g}'


def read_final_metrics(workdir: str, total_steps: int) -> dict[str, float] | None:
  """Metrics written at `total_steps` in `workdir`/metrics.jsonl, or None if not reached.

  Read as the trainer's own reader does (`reporting.read_metrics`): a bucket
  workdir's not yet merged parts count, a line cut by a crash is skipped.
  """
  from mixer import reporting  # pylint: disable=g-import-not-at-top  (TF: only to read runs)
  series = reporting.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  final = {name: value for name, points in series.items()
           for step, value in points if step == total_steps}
  return {'step': total_steps, **final} if final else None


def _write_text(path: str, text: str) -> None:
  paths.atomic_write(path, lambda f: f.write(text.encode('utf-8')))


def select(grid: Sequence[tuple[float, dict[str, float]]]) -> tuple[float, dict[str, float]]:
  """(lr, metrics) with the best 'val/accuracy'; the earliest of equal ones."""
  best = None
  for lr, metrics in grid:
    if 'val/accuracy' not in metrics:
      raise ValueError(f'The run at lr={lr:g} has no val/accuracy at its last step: its config '
                       "needs a 'val' evaluator (configs/transfer.py has one).")
    if best is None or metrics['val/accuracy'] > best[1]['val/accuracy']:
      best = (lr, metrics)
  return best


def vtab_averages(results: dict[str, dict[str, Any]]) -> dict[str, tuple[float | None, int, int]]:
  """Group -> (mean test accuracy in %, tasks done, tasks in the group); None until all are done.

  'overall' is the mean over all 19 tasks (the paper's VTAB-1k column).
  """
  out = {}
  for group in (*transfer_tasks.GROUPS, 'overall'):
    names = [n for n in transfer_tasks.VTAB_TASKS
             if group == 'overall' or transfer_tasks.TASKS[n].group == group]
    done = [results[n]['test_accuracy'] for n in names
            if n in results and results[n].get('test_accuracy') is not None]
    mean = 100 * sum(done) / len(done) if len(done) == len(names) else None
    out[group] = (mean, len(done), len(names))
  return out


def format_table(results: dict[str, dict[str, Any]], variant: str | None = None,
                 res: int | None = None) -> str:
  """The markdown results table: a row per task, then the VTAB-1k averages."""
  lines = ['| task | group | dataset | lr | val | test | expected | diff |',
           '|---|---|---|---|---|---|---|---|']

  def pct(x):
    return '–' if x is None else f'{100 * x:.2f}'

  for name, r in results.items():
    expected = r.get('expected')
    test = r.get('test_accuracy')
    diff = '–' if expected is None or test is None else f'{100 * test - expected[0]:+.2f}'
    lines.append(f"| {name} | {r['group']} | {r['dataset']} | "
                 f"{'–' if r.get('lr') is None else format(r['lr'], 'g')} | "
                 f"{pct(r.get('val_accuracy'))} | {pct(test)} | "
                 f"{'–' if expected is None else f'{expected[0]:.2f} ({expected[1]})'} | "
                 f'{diff} |')
  avg5 = [results[n].get('test_accuracy') for n in transfer_tasks.AVG5_TASKS if n in results]
  if len(avg5) == len(transfer_tasks.AVG5_TASKS):
    row = transfer_tasks.PAPER_ROWS.get(f'{variant}@{res or 224}', {})
    mean = '– (not all done)' if None in avg5 else f'{100 * sum(avg5) / len(avg5):.2f}'
    paper = f"{row['avg5']:.2f} ({row['source']})" if 'avg5' in row else '–'
    lines += ['', '| Avg. 5 (ImageNet, CIFAR-10, CIFAR-100, Pets, Flowers) | paper |',
              '|---|---|', f'| {mean} | {paper} |']
  if any(transfer_tasks.TASKS[n].is_vtab for n in results if n in transfer_tasks.TASKS):
    averages = vtab_averages(results)
    # Table 2's VTAB-1k column: each task at its BiT-HyperRule resolution (224 or 448).
    paper = transfer_tasks.PAPER_ROWS.get(f'{variant}@{res or 448}', {}).get('vtab')
    lines += ['', '| VTAB-1k | natural | specialized | structured | overall (19 tasks) |',
              '|---|---|---|---|---|']
    cells = []
    for group in (*transfer_tasks.GROUPS, 'overall'):
      mean, done, total = averages[group]
      cells.append(f'{mean:.2f}' if mean is not None else f'– ({done} of {total} done)')
    lines.append('| mean test top-1 | ' + ' | '.join(cells) + ' |')
    if paper is not None:
      lines.append(f'| paper (Mixer-{variant}, Table 2) | | | | {paper:.2f} |')
  return '\n'.join(lines) + '\n'


def run_task(task_name: str, *, root: str, make_arg: Callable[[str, float, bool], str],
             build: Callable[[str], Any], runner: Runner, print_fn=print,
             variant: str | None = None, res: int | None = None
             ) -> tuple[dict[str, Any], list[Run]]:
  """Sweeps one task. With `runner.train=None` nothing is trained: returns the runs to do.

  Returns (result dict, runs not finished).
  """
  task = transfer_tasks.get(task_name)
  task_root = os.path.join(root, task.name)
  pending: list[Run] = []

  def finished(run: Run):
    config = build(run.config_arg)
    marker = os.path.join(run.workdir, RUN_FILE)
    if paths.exists(marker):
      made_for = json.loads(paths.read_bytes(marker)).get('config')
      if made_for != run.config_arg:
        raise ValueError(f'{run.workdir} holds a run of --config={made_for}, not of '
                         f'{run.config_arg}: give this sweep another --workdir.')
    metrics_dir = os.path.join(run.workdir, runner.subdir)
    metrics = read_final_metrics(metrics_dir, runner.last_step(config))
    if metrics is None and runner.train is not None:
      _write_text(marker, json.dumps({'config': run.config_arg}))
      print_fn(f'[{task.name}] training lr={run.lr:g}{" (final)" if run.final else ""} in '
               f'{run.workdir}')
      runner.train(config, run.workdir)
      metrics = read_final_metrics(metrics_dir, runner.last_step(config))
      if metrics is None:
        raise Stopped(f'{run.workdir} stopped before step {runner.last_step(config)} (its '
                      'checkpoint is kept): rerun the same sweep command to resume.')
    if metrics is None:
      pending.append(run)
    return metrics

  def make_run(lr, final):
    name = ('final_' if final else '') + _lr_name(lr)
    return Run(task.name, lr, final, make_arg(task.name, lr, final),
               os.path.join(task_root, name))

  grid = [(lr, finished(make_run(lr, False))) for lr in task.lr_grid]
  result: dict[str, Any] = {
      'task': task.name, 'group': task.group, 'dataset': task.dataset,
      'grid': {format(lr, 'g'): m and {k: m.get(k) for k in ('val/accuracy', 'test/accuracy')}
               for lr, m in grid},
      'lr': None, 'val_accuracy': None, 'test_accuracy': None,
      'expected': task.expected_for(variant, res or task.res) if variant else None,
  }
  if all(m is not None for _, m in grid):
    lr, metrics = select(grid)
    result.update(lr=lr, val_accuracy=metrics['val/accuracy'])
    if task.final_train is None:
      result['test_accuracy'] = metrics.get('test/accuracy')
    else:
      final = finished(make_run(lr, True))
      if final is not None:
        result['test_accuracy'] = final.get('test/accuracy')
  if result['test_accuracy'] is not None:
    _write_text(os.path.join(task_root, RESULT_FILE), json.dumps(result, indent=1))
  return result, pending


def sweep(task_names: Sequence[str], *, root: str, make_arg, build, runner: Runner,
          print_fn=print, variant=None, res=None) -> tuple[dict[str, dict], list[Run]]:
  """Sweeps every task in order; writes ROOT/results.md. Returns (results, runs not done)."""
  results, pending = {}, []
  for name in task_names:
    results[name], todo = run_task(name, root=root, make_arg=make_arg, build=build,
                                   runner=runner, print_fn=print_fn, variant=variant,
                                   res=res)
    pending += todo
    # Written after each task, so a long sweep shows its progress.
    _write_text(os.path.join(root, TABLE_FILE), format_table(results, variant, res))
  return results, pending


def list_tasks() -> str:
  """One line per task: name, TFDS dataset, classes, group."""
  width = max(len(n) for n in transfer_tasks.TASKS)
  tfds_width = max(len(t.tfds) for t in transfer_tasks.TASKS.values())
  return '\n'.join(f'{t.name:<{width}}  {t.tfds:<{tfds_width}}  {t.num_classes:>5}  {t.group}'
                   for t in transfer_tasks.TASKS.values())


def _apply_override(config, key: str, text: str) -> None:
  """`--config.a.b=text` on `config`, the value typed like ml_collections' flags."""
  node, parts = config, key.split('.')
  for depth, part in enumerate(parts):
    if part not in node:
      where = '.'.join(['config'] + parts[:depth])
      raise ValueError(f'--config.{key}: {where} has no key {part!r}; valid keys: '
                       f'{", ".join(sorted(node.keys()))}.')
    if depth < len(parts) - 1:
      node = node[part]
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text  # A bare string: a path, a split, a dtype name.
  if isinstance(node[parts[-1]], bool) and text.lower() in ('true', 'false'):
    value = text.lower() == 'true'
  node[parts[-1]] = value


def _parse(argv):
  parser = argparse.ArgumentParser(
      prog='python -m mixer.sweep', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog='Any --config.KEY=VALUE override is passed on to every run.')
  parser.add_argument('--list', action='store_true', help='list the tasks and exit')
  parser.add_argument('--config', help='configs/transfer.py[:task=NAME,variant=...,res=...]')
  parser.add_argument('--tasks', default='',
                      help="comma-separated task names, or 'vtab' (19 tasks), 'avg5', 'all'")
  parser.add_argument('--workdir', help='root directory: one workdir per task and lr below it')
  parser.add_argument('--print_commands', action='store_true',
                      help='print one mixer.main command per grid point still to run; train '
                           'nothing')
  parser.add_argument('--rehearse', action='store_true',
                      help='run each grid point through mixer.rehearse (fake data with the '
                           "task's real splits and classes, tiny compute): the sweep's "
                           'wiring and the results table on a CPU, with no data or weights')
  args, rest = parser.parse_known_args(argv)
  for token in rest:
    if not token.startswith('--config.') or '=' not in token:
      _fail(f'unknown argument {token!r}; config overrides are --config.KEY=VALUE '
            '(python -m mixer.sweep --help).')
  return args, rest


def _fail(message: str):
  """Bad input: one `error: ...` line naming the problem and the fix, exit status 2."""
  print(f'error: {message}', file=sys.stderr)
  raise SystemExit(2)


def _takes_task(module, task: str) -> bool:
  """Whether the config file takes `task=` (configs/transfer.py) or is one task's alias."""
  try:
    module.get_config(f'task={task}')
  except ValueError as e:
    if 'Unknown config argument' in str(e):
      return False
    raise
  return True


def main(argv=None) -> int:
  args, overrides = _parse(sys.argv[1:] if argv is None else argv)
  if args.list:
    print(list_tasks())
    return 0
  if not args.config or not args.workdir:
    _fail('--config and --workdir are required, e.g. --config=configs/transfer.py:task=pets '
          '--workdir=DIR (or --list).')
  path, _, arg = args.config.partition(':')
  path = os.path.normpath(path)  # One spelling per config file in commands and workdir markers.
  if not os.path.exists(path):
    _fail(f'config file {path!r} does not exist; e.g. --config=configs/transfer.py.')
  from mixer import config_lib  # pylint: disable=g-import-not-at-top  (tf, jax)
  module = config_lib.load_config_module(path)
  tokens = [t.strip() for t in arg.split(',') if t.strip()]
  named = dict(t.split('=', 1) for t in tokens if '=' in t)
  base = [t for t in tokens if t.split('=', 1)[0] not in ('task', 'lr', 'final')]
  try:
    if args.tasks:
      names = transfer_tasks.expand(args.tasks)
    else:
      names = [transfer_tasks.get(named.get('task') or getattr(module, 'TASK', '')).name]
  except ValueError as e:
    _fail(str(e))
  takes_task = _takes_task(module, names[0])
  if not takes_task and names != [module.TASK]:
    _fail(f'{path} builds the {module.TASK!r} task only; use '
          f'--config=configs/transfer.py with --tasks={args.tasks or names[0]}.')

  def make_arg(task, lr, final):
    parts = ([f'task={task}'] if takes_task else []) + base + [f'lr={lr:g}']
    return f'{path}:' + ','.join(parts + (['final'] if final else []))

  def build(config_arg):
    config = module.get_config(config_arg.partition(':')[2])
    for token in overrides:
      key, _, value = token[len('--config.'):].partition('=')
      _apply_override(config, key, value)
    return config

  variant = named.get('variant', 'B_16')
  res = int(named.get('res', 0)) or None  # None: each task's default resolution.
  if args.print_commands:
    runner = Runner(None)
  elif args.rehearse:
    runner = rehearsal_runner()
  else:
    from mixer import train  # pylint: disable=g-import-not-at-top
    runner = Runner(train.train_and_evaluate)
  try:
    results, pending = sweep(names, root=args.workdir, make_arg=make_arg, build=build,
                             runner=runner, variant=variant, res=res)
  except Stopped as e:
    print(f'Stopped: {e}', file=sys.stderr)
    return EXIT_PREEMPTED
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for run in pending:
    print(run.command(overrides))
  if pending:
    print(f'# {len(pending)} run(s) to go; VTAB final runs are listed once their grid is done. '
          'Rerun this sweep to collect.', file=sys.stderr)
  print(paths.read_bytes(os.path.join(args.workdir, TABLE_FILE)).decode('utf-8'), end='')
  return 0


if __name__ == '__main__':
  sys.exit(main())
