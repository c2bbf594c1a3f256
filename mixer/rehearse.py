r"""Rehearse a real run on a CPU: `python -m mixer.rehearse --config=<file[:args]> --workdir=DIR`.

It runs a config as it would run on the pod, with only the compute shrunk, so
the wiring that `:runlocal` swaps out (datasets, splits, class counts, few-shot
sets, sigmoid over 21843 classes, cadences, init_from + App. C) runs before a
slice is paid for:

  python -m mixer.rehearse --config=configs/mixer_l16_i21k.py --workdir=/tmp/rehearse_l16

What is shrunk (`shrink`): the model's width and depth (the variant keeps its
name; patch 8, width 32, 2 blocks), the image size (32 px at the 224 px
pre-training resolution, so a `res=448` fine-tuning keeps K=2: 64 px, its K^2
token growth and its widened token MLP), the batch (16), the steps (16), the
warmup in proportion, and every cadence in proportion, clamped so that the
run shows each at work: logging up to every step, checkpoints every 4 to 8
steps, every evaluator every 8 steps (0, "only at the end", stays 0), so it
runs once before the simulated preemption at step 9 and once at the end.

What is kept: every dataset name, split and class count (training set, every
classification evaluator, every few-shot set), the feature layout (ImageNet
ReaL's `real_label`, JFT's multi-labels), the loss and head bias,
augmentations, mixup, optimizer, schedule shape, dtypes, mesh and evaluators.
`init_from` becomes a fake released-format .npz of the shrunk model at the
shrunk pre-training resolution (with a 21843-class head, like the released
i21k files), so the resolution adaptation and head replacement run.

Where the data comes from: `mixer.datasets.fake_data` writes every dataset the
config reads, with its real specs, into `<workdir>/data` (TFDS builders,
imagenet21k from a generated archive, JFT-style TFRecords). TFDS refuses a
slice past the end of a split, so index slices ('train[:65000]') are scaled to
the fake splits; the report lists each one.

The run: `mixer.train.train_and_evaluate` in this process, in `<workdir>/run`;
a real SIGTERM to this process while the batch of step 9 of 16 is read (the
trainer's own handler: checkpoint at that step, stop, `preempted` in the
result; `python -m mixer.main` exits 75 there); then the same call again,
which must resume at that step and finish. The report lists every metric
(last value) and ends with one line, `REHEARSAL PASSED: ...` or
`REHEARSAL FAILED: ...`; the command exits 0 or 1.

From Python (the transfer-suite tests call this):

  from mixer import rehearse
  report = rehearse.rehearse(config, workdir)   # report['passed'], report['verdict'], ...
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
from typing import Any

if __name__ == '__main__':
  # The command line: the trainer's flags (--config, --workdir), parser and quiet
  # TensorFlow start-up, imported first. Not on import as a library, where those
  # flags would clash with the importer's own (e.g. mixer.sweep's --config).
  from mixer import main as main_lib  # pylint: disable=g-import-not-at-top

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,g-bad-import-order
import jax  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from mixer import compile_cache, input_pipeline, models, recipes, reporting, train, weights  # pylint: disable=g-import-not-at-top
from mixer.datasets import fake_data  # pylint: disable=g-import-not-at-top

STEPS = 16
BATCH = 16
# Image size at the pre-training resolution (recipes.PRETRAIN_SIZE): K*224 -> K*32.
IMAGE_SIZE = 32
MODEL = dict(patch_size=8, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16, channels_mlp_dim=64)
# Classes of the fake init_from head: the released i21k files' (their head is replaced).
INIT_CLASSES = 21843


def _scaled(every: int, old_total: int, low: int, high: int) -> int:
  """A cadence in proportion to STEPS/old_total, clamped to [low, high]; 0 stays 0."""
  if not every:
    return every
  return int(min(high, max(low, round(every * STEPS / max(old_total, 1)))))


def preemption_step(total_steps: int = STEPS) -> int:
  """Where the rehearsal sends SIGTERM: past the middle, off the checkpoint cadence."""
  return total_steps // 2 + 1


def shrink(config: ml_collections.ConfigDict, num_devices: int = 1) -> list[str]:
  """Shrinks the compute of `config` in place (see the module docstring); returns what changed."""
  changes = []
  base_size = config.init_from_image_size or recipes.PRETRAIN_SIZE
  k = config.image_size // base_size if config.image_size % base_size == 0 else 1
  unit = num_devices * config.grad_accum_steps
  batch = -(-BATCH // unit) * unit
  old_total = config.total_steps
  sizes = {f: config.model[f] or getattr(models.VARIANTS[config.model.name], f) for f in MODEL}
  config.model.update(MODEL, tokens_mlp_dim=MODEL['tokens_mlp_dim'] * k * k)
  changes.append(f'model {config.model.name} (patch, width, blocks, token MLP, channel MLP): '
                 f'{", ".join(str(config.model[f]) for f in MODEL)} '
                 f'(was {", ".join(str(sizes[f]) for f in MODEL)})')
  changes.append(f'image size {IMAGE_SIZE * k} (was {config.image_size}, K={k})')
  config.image_size = IMAGE_SIZE * k
  changes.append(f'batch {batch} (was {config.batch_size}), steps {STEPS} (was {old_total})')
  config.batch_size = config.eval_batch_size = batch
  config.total_steps = STEPS
  if config.warmup_steps:
    config.warmup_steps = _scaled(config.warmup_steps, old_total, 1, STEPS - 1)
  config.log_every = _scaled(config.log_every, old_total, 1, STEPS)
  config.checkpoint_every = _scaled(config.checkpoint_every, old_total, STEPS // 4, STEPS // 2)
  config.profile_steps = None
  cadences = [f'warmup {config.warmup_steps}', f'log every {config.log_every}',
              f'checkpoint every {config.checkpoint_every}']
  for name, settings in config.evals.items():
    # Once before the preemption, once after it: an evaluation costs more than 8 steps.
    settings.every_steps = _scaled(settings.every_steps, old_total, STEPS // 2, STEPS // 2)
    if settings.get('batch_size'):
      settings.batch_size = batch
    cadences.append(f'{name} every {settings.every_steps or "end"}')
  changes.append(', '.join(cadences))
  return changes


def write_fake_init(config: ml_collections.ConfigDict, path: str) -> str:
  """A released-format .npz of the shrunk model at the shrunk pre-training resolution."""
  classes = config.num_classes if config.init_head == 'keep' else INIT_CLASSES
  model = models.get_model(config.model.name, num_classes=classes, **MODEL)
  images = np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
  variables = jax.jit(lambda rng: model.init(rng, images, train=False))(jax.random.key(1))
  weights.save_npz(variables['params'], path)
  return path


def use_fake_data(config: ml_collections.ConfigDict, data_dir: str) -> list[str]:
  """Writes every dataset `config` reads into `data_dir` and points the config there."""
  plan = fake_data.plan(fake_data.dataset_splits(config))
  renames = fake_data.write_all(plan.sizes, data_dir, num_classes=config.num_classes,
                                tfrecord_dir=os.path.join(data_dir, 'tfrecords'))
  config.data_dir = data_dir
  notes = [f'{dataset}: fake {", ".join(f"{s}={n}" for s, n in splits.items())} examples'
           for dataset, splits in plan.sizes.items()]

  def read_as(dataset, split):
    if (dataset, split) in plan.splits:
      notes.append(f'{dataset} {split!r} read as {plan.splits[(dataset, split)]!r} '
                   '(example indices mapped onto the fake split)')
    return renames.get(dataset, dataset), plan.splits.get((dataset, split), split)

  config.dataset, config.train_split = read_as(config.dataset, config.train_split)
  for settings in config.evals.values():
    if settings.type == 'classification':
      dataset, settings.split = read_as(settings.dataset or config.dataset, settings.split)
      if settings.dataset:
        settings.dataset = dataset
    elif settings.type == 'fewshot':
      for name, (dataset, train_split, test_split) in list(settings.datasets.items()):
        new_dataset, train_split = read_as(dataset, train_split)
        settings.datasets[name] = (new_dataset, train_split, read_as(dataset, test_split)[1])
  return list(dict.fromkeys(notes))


def expected_metrics(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """Evaluator name -> the metric names it must write."""
  expected = {}
  for name, settings in config.evals.items():
    if settings.type == 'classification':
      expected[name] = [f'{name}/{m}' for m in ('loss', 'accuracy', 'top5_accuracy')]
    elif settings.type == 'fewshot':
      expected[name] = [f'{name}/{dataset}_{k}shot' for dataset in settings.datasets
                        for k in settings.shots]
  return expected


@contextlib.contextmanager
def sigterm_at(step: int):
  """Sends this process a real SIGTERM while the trainer reads the batch of `step`.

  The trainer's handler (installed for the run) sets its stop request: it
  finishes that step, saves a checkpoint there and returns. Refused where that
  handler cannot be installed (not the main thread), since the signal would
  then end this process.
  """
  if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
    raise RuntimeError('A rehearsal sends itself SIGTERM: run it in the main thread of a '
                       'single process.')
  create = input_pipeline.create_train_iterator

  def create_and_signal(config, start_step=0, **kwargs):
    batches = create(config, start_step=start_step, **kwargs)

    def iterate():
      for index, batch in enumerate(batches):
        if start_step + index + 1 == step:
          if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            raise RuntimeError('The trainer installed no SIGTERM handler: not sending it.')
          os.kill(os.getpid(), signal.SIGTERM)
        yield batch
    return iterate()

  input_pipeline.create_train_iterator = create_and_signal
  try:
    yield
  finally:
    input_pipeline.create_train_iterator = create


@contextlib.contextmanager
def _caller_compile_cache_restored():
  """The trainer turns the persistent cache on (in its run dir); afterwards the caller's is back."""
  previous = jax.config.jax_compilation_cache_dir
  try:
    yield
  finally:
    if previous:
      compile_cache.enable(previous)
    else:
      compile_cache.disable()


def _check_run(config, run_dir: str, first: dict, second: dict, preempt: int) -> list[str]:
  """What is wrong with the two legs of the run (empty when nothing is)."""
  problems = []
  if not first.get(train.PREEMPTED) or first.get('step') != preempt:
    problems.append(f'the SIGTERM at step {preempt} did not stop the run there '
                    f'(first leg returned step {first.get("step")})')
  if second.get(train.PREEMPTED) or second.get('step') != config.total_steps:
    problems.append(f'the resumed run did not reach step {config.total_steps} '
                    f'(returned step {second.get("step")})')
  for name in ('final.npz', 'final.json'):
    if not os.path.exists(os.path.join(run_dir, name)):
      problems.append(f'no {name} was exported')
  series = reporting.read_metrics(os.path.join(run_dir, reporting.METRICS_FILE))
  losses = series.get('train/loss', [])
  if not losses or not all(math.isfinite(v) for _, v in losses):
    problems.append(f'train/loss is missing or not finite: {losses}')
  elif not (min(s for s, _ in losses) <= preempt < max(s for s, _ in losses) ==
            config.total_steps):
    problems.append(f'train/loss was not logged on both sides of step {preempt}')
  for evaluator, names in expected_metrics(config).items():
    for name in names:
      steps = [s for s, v in series.get(name, []) if math.isfinite(v)]
      if config.total_steps not in steps:
        problems.append(f'{name} was not written at the last step (written at {steps})')
      elif config.evals[evaluator].every_steps and not any(s <= preempt for s in steps):
        problems.append(f'{name} did not run before the preemption (written at {steps})')
  if os.path.exists(weights.sidecar_path(os.path.join(run_dir, 'final.npz'))):
    sidecar = weights.read_sidecar(os.path.join(run_dir, 'final.npz'))
    if sidecar['num_classes'] != config.num_classes:
      problems.append(f'final.json has {sidecar["num_classes"]} classes, the config '
                      f'{config.num_classes}')
  return problems


def rehearse(config: ml_collections.ConfigDict, workdir: str, *,
             name: str | None = None) -> dict[str, Any]:
  """Rehearses `config` (not modified) in `workdir` (new or empty); see the module docstring.

  Returns a report: 'passed', 'verdict' (the one line), 'problems', 'metrics'
  (every metric's last value), 'changes' (what was shrunk, and the fake data),
  'preempted_at', 'seconds', 'config' (the rehearsed config).
  """
  start = time.perf_counter()
  name = name or config.model.name
  workdir = os.path.abspath(workdir)
  run_dir, data_dir = os.path.join(workdir, 'run'), os.path.join(workdir, 'data')
  if os.path.exists(run_dir) and os.listdir(run_dir):
    raise FileExistsError(f'{run_dir} is not empty: a rehearsal needs a fresh run. Pass a new '
                          '--workdir, or delete that folder.')
  config = copy.deepcopy(config)
  dataset = config.dataset  # Named in the verdict (the fake data may live elsewhere).
  changes = shrink(config, jax.device_count())
  os.makedirs(data_dir, exist_ok=True)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  changes += use_fake_data(config, data_dir)
  if config.init_from:
    changes.append(f'init_from {config.init_from}: a fake released-format .npz of the shrunk '
                   f'model at {IMAGE_SIZE} px, loaded at {config.image_size} px')
    config.init_from = write_fake_init(config, os.path.join(data_dir, 'init.npz'))
    if config.init_from_image_size:
      config.init_from_image_size = IMAGE_SIZE
  for line in changes:
    logging.info('Rehearsal: %s', line)

  preempt = preemption_step(config.total_steps)
  problems, first, second = [], {}, {}
  try:
    # The resumed leg loads the first leg's executables from the run dir's
    # persistent cache instead of compiling them again, as a restarted pod run does.
    with _caller_compile_cache_restored():
      with sigterm_at(preempt):
        first = train.train_and_evaluate(config, run_dir)
      second = train.train_and_evaluate(config, run_dir)
    problems = _check_run(config, run_dir, first, second, preempt)
  except Exception as error:  # pylint: disable=broad-except  (the rehearsal reports it)
    traceback.print_exc()
    problems = [f'{type(error).__name__}: {" ".join(str(error).split())}']
  metrics_path = os.path.join(run_dir, reporting.METRICS_FILE)
  series = reporting.read_metrics(metrics_path) if os.path.exists(metrics_path) else {}
  # Natural order: fewshot/cars_1shot, _5shot, _10shot, _25shot.
  natural = lambda key: [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', key)]  # noqa: E731
  metrics = {k: series[k][-1][1] for k in sorted(series, key=natural) if series[k]}
  seconds = time.perf_counter() - start
  fewshot_sets = sum(len(s.datasets) for s in config.evals.values() if s.type == 'fewshot')
  if problems:
    verdict = f'REHEARSAL FAILED: {name}: {problems[0]}'
    if len(problems) > 1:
      verdict += f' (and {len(problems) - 1} more problem(s), listed above)'
  else:
    verdict = (f'REHEARSAL PASSED: {name}: {config.total_steps} steps on {dataset} '
               f'({config.num_classes} classes), SIGTERM at step {preempt}, resumed to '
               f'{config.total_steps}; {len(config.evals)} evaluator(s), {fewshot_sets} '
               f'few-shot set(s), {len(metrics)} metrics; {seconds:.0f} s.')
  return {'passed': not problems, 'verdict': verdict, 'problems': problems,
          'metrics': metrics, 'changes': changes, 'preempted_at': preempt,
          'seconds': seconds, 'config': config}


def format_report(report: dict[str, Any]) -> str:
  """The report as the command prints it: what changed, every metric, problems, verdict."""
  lines = ['', 'Rehearsal (only the compute is shrunk):']
  lines += [f'  {line}' for line in report['changes']]
  lines.append(f'Metrics (last value of each, {len(report["metrics"])}):')
  width = max((len(k) for k in report['metrics']), default=0)
  lines += [f'  {k:<{width}}  {v:.6g}' for k, v in report['metrics'].items()]
  if len(report['problems']) > 1:
    lines.append('Problems:')
    lines += [f'  - {p}' for p in report['problems']]
  lines.append(report['verdict'])
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_logger().addFilter(main_lib._QuietLibraries())  # pylint: disable=protected-access
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # tf.data runs on the host.
  config_arg = next((a.split('=', 1)[1] for a in sys.argv if a.startswith('--config=')), None)
  try:
    report = rehearse(flags.FLAGS.config, flags.FLAGS.workdir, name=config_arg)
  except (FileExistsError, ValueError) as error:  # Bad workdir or config: one line.
    sys.stderr.write(f'error: {" ".join(str(error).split())}\n')
    sys.exit(1)
  print(format_report(report), flush=True)
  with open(os.path.join(flags.FLAGS.workdir, 'rehearsal.json'), 'w', encoding='utf-8') as f:
    json.dump({k: v for k, v in report.items() if k != 'config'}, f, indent=1)
  sys.exit(0 if report['passed'] else 1)


if __name__ == '__main__':
  app.run(main, flags_parser=main_lib._parse_flags)  # pylint: disable=protected-access
