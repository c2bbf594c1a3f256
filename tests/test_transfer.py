"""The transfer suite: task registry, configs/transfer.py, VTAB labels and mixer.sweep.

Fast tests: every task's config builds and validates, the registry holds the
paper's protocol (19 VTAB tasks in 3 groups, 800 + 200 examples, the grids),
VTAB's derived labels on hand-made examples, the selection rule, the VTAB
averages table and the command line. Slow: a real sweep on the embedded
digits (a test-only registry entry, tiny model), resumed without retraining.
"""

import glob
import json
import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mixer import config_lib, paths, reporting, sweep, transfer_tasks
from mixer.datasets import vtab

CONFIG = pathlib.Path(__file__).resolve().parent.parent / 'configs' / 'transfer.py'


def _transfer(arg):
  return config_lib.load_config_module(str(CONFIG)).get_config(arg)


_CASES = [(name, final) for name, task in transfer_tasks.TASKS.items()
          for final in ((False, True) if task.is_vtab else (False,))]


@pytest.mark.parametrize('name, final', _CASES,
                         ids=[f'{n}{",final" if f else ""}' for n, f in _CASES])
def test_every_task_config_builds_and_validates(name, final):
  task = transfer_tasks.TASKS[name]
  config = _transfer(f'task={name}' + (',final' if final else ''))
  config_lib.validate(config)
  assert (config.dataset, config.num_classes) == (task.dataset, task.num_classes)
  assert (config.total_steps, config.warmup_steps) == (task.steps, task.warmup)
  assert config.image_size == task.res and config.image_size % 224 == 0
  assert config.optimizer == 'momentum' and config.weight_decay == 0.0
  assert config.init_from.endswith('imagenet21k/Mixer-B_16.npz')
  if final:
    assert config.train_split == task.final_train == f'train[:800]+{task.val}'
    assert set(config.evals) == {'test'} and config.evals.test.split == task.test
  else:
    assert config.train_split == task.train
    assert config.evals.val.split == task.val
    assert config.lr == (0.01 if task.is_vtab else 0.03)
    # VTAB reads its test split only in the final run; the others report test of the grid run.
    assert ('test' in config.evals) == (not task.is_vtab)
  if task.group == 'structured':  # Crops and flips would change counts, depths and poses.
    assert not config.input.inception_crop and not config.input.flip


def test_registry_follows_the_paper_protocol():
  groups = {g: [n for n in transfer_tasks.VTAB_TASKS if transfer_tasks.TASKS[n].group == g]
            for g in transfer_tasks.GROUPS}
  assert {g: len(v) for g, v in groups.items()} == {'natural': 7, 'specialized': 4,
                                                     'structured': 8}
  for name in transfer_tasks.VTAB_TASKS:
    task = transfer_tasks.TASKS[name]
    assert task.train == 'train[:800]' and task.lr_grid == (0.003, 0.01, 0.03)
    start, stop = _slice_bounds(task.val)
    assert stop - start == 200, (name, task.val)
    assert task.steps == 2_500
  for name in transfer_tasks.AVG5_TASKS:
    assert transfer_tasks.TASKS[name].lr_grid == (0.003, 0.01, 0.03, 0.06)
    assert transfer_tasks.TASKS[name].group == 'none'
  assert transfer_tasks.get('imagenet').expected_for('L_16', 448)[0] == 84.15
  assert transfer_tasks.get('cifar10').expected_for('H_14', 224) is None
  assert transfer_tasks.expand('vtab,imagenet')[-1] == 'imagenet'
  assert len(transfer_tasks.expand('vtab')) == 19
  with pytest.raises(ValueError, match="Unknown task 'cifar'.*cifar10"):
    transfer_tasks.get('cifar')


def _slice_bounds(split):
  """[start, stop) of 'name[a:b]' or 'name[:b]' (absolute counts only)."""
  inside = split[split.index('[') + 1:-1]
  start, stop = inside.split(':')
  return int(start or 0), int(stop)


def test_vtab_val200_offsets_are_task_adaptations_percentages():
  # task_adaptation: val200 starts at PERCENT * |train| // 100 (TFDS split sizes).
  sizes = {'caltech101': (3060, 90), 'vtab_cifar100': (50_000, 90), 'vtab_pets': (3680, 80),
           'svhn': (73_257, 90), 'eurosat': (27_000, 60), 'resisc45': (31_500, 60),
           'clevr_count': (70_000, 90), 'clevr_distance': (70_000, 90),
           'dsprites_location': (737_280, 80), 'dsprites_orientation': (737_280, 80)}
  for name, (size, percent) in sizes.items():
    assert _slice_bounds(transfer_tasks.TASKS[name].val)[0] == percent * size // 100, name


def test_alias_configs_are_transfer_entries():
  for alias, task in (('finetune_imagenet.py', 'imagenet'), ('finetune_cifar10.py', 'cifar10')):
    module = config_lib.load_config_module(str(CONFIG.parent / alias))
    for arg in (None, 'lr=0.01,minival', 'variant=L_16,runlocal'):
      expected = _transfer(f'task={task}' + (f',{arg}' if arg else ''))
      assert module.get_config(arg).to_dict() == expected.to_dict(), (alias, arg)
  assert 'test' not in _transfer('task=imagenet,minival').evals
  with pytest.raises(ValueError, match="'final' is for VTAB-1k"):
    _transfer('task=pets,final')


def _example(**features):
  return {k: tf.constant(v) for k, v in features.items()}


def test_vtab_derived_labels():
  def label(task, **features):
    return int(vtab.LABELS[task](_example(**features)))

  objects = lambda n: {'size': np.zeros(n, np.int64)}  # noqa: E731
  assert int(vtab.LABELS['clevr_count']({'objects': _example(**objects(5))})) == 2
  assert int(vtab.LABELS['clevr_count']({'objects': _example(**objects(10))})) == 7
  coords = np.array([[0, 0, 9.7], [0, 0, 8.7], [0, 0, 12.0]], np.float32)
  assert int(vtab.LABELS['clevr_distance']({'objects': _example(pixel_coords=coords)})) == 2
  far = np.array([[0, 0, 50.0]], np.float32)
  assert int(vtab.LABELS['clevr_distance']({'objects': _example(pixel_coords=far)})) == 5
  # KITTI: only cars, vans and trucks (type < 3) count; no vehicle is the last bin.
  location = np.array([[0, 0, 15.0], [0, 0, 3.0]], np.float32)
  kitti = {'objects': _example(type=np.array([0, 5]), location=location)}
  assert int(vtab.LABELS['kitti_distance'](kitti)) == 1
  kitti = {'objects': _example(type=np.array([4, 5]), location=location)}
  assert int(vtab.LABELS['kitti_distance'](kitti)) == 3
  assert label('dsprites_location', label_x_position=31) == 15
  assert label('dsprites_location', label_x_position=2) == 1
  assert label('dsprites_orientation', label_orientation=39) == 15
  assert label('dsprites_orientation', label_orientation=5) == 2
  assert label('smallnorb_elevation', label_elevation=8) == 8


def _metrics(workdir, step, **values):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.write(json.dumps({'step': step // 2, 'val/accuracy': 0.99}) + '\n')  # Not the last step.
    f.write(json.dumps({'step': step, 'train/loss': 0.1}) + '\n')
    f.write(json.dumps({'step': step, **values}) + '\n')


@pytest.mark.parametrize('task', ['dsprites_orientation', 'smallnorb_azimuth'])
def test_vtab_source_reads_the_tasks_label_of_each_tfds_example(task):
  """TFDS's mock examples (made from the dataset's features) through VtabSource.read."""
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    source = vtab.VtabSource(task, None)
    assert source.name == source.task.tfds and source.num_classes == source.task.num_classes
    examples = list(source.read('train').as_numpy_iterator())
    raw = list(tfds.builder(source.task.tfds).as_dataset(
        split='train', shuffle_files=False, decoders={'image': tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(add_tfds_id=True)).as_numpy_iterator())
  assert len(examples) == len(raw) == 6
  for example, original in zip(examples, raw):
    assert example['source_id'] == original['tfds_id']
    expected = min(int(vtab.LABELS[task](original)), source.num_classes - 1)
    assert example['label'].tolist() == [expected]
    pixels = tf.io.decode_png(example['image']).numpy()
    if task.startswith('dsprites'):  # Real dSprites pixels are 0/1: they become 0/255.
      original_pixels = tf.io.decode_png(original['image']).numpy()
      assert np.array_equal(pixels, np.minimum(original_pixels, 1) * 255)


def test_selection_is_by_val_not_test():
  grid = [(0.003, {'val/accuracy': 0.80, 'test/accuracy': 0.95}),
          (0.01, {'val/accuracy': 0.90, 'test/accuracy': 0.85}),
          (0.03, {'val/accuracy': 0.90, 'test/accuracy': 0.99})]
  assert sweep.select(grid) == grid[1]  # Best val; the tie goes to the earlier grid point.
  with pytest.raises(ValueError, match="needs a 'val' evaluator"):
    sweep.select([(0.01, {'test/accuracy': 0.5})])


def test_final_metrics_come_from_the_last_step(tmp_path):
  _metrics(str(tmp_path), 100, **{'val/accuracy': 0.5, 'test/accuracy': 0.4})
  assert sweep.read_final_metrics(str(tmp_path), 100) == {
      'step': 100, 'train/loss': 0.1, 'val/accuracy': 0.5, 'test/accuracy': 0.4}
  assert sweep.read_final_metrics(str(tmp_path), 200) is None  # Not finished: run (or resume).


def test_final_metrics_skip_a_line_cut_by_a_crash(tmp_path):
  _metrics(str(tmp_path), 100, **{'val/accuracy': 0.5, 'test/accuracy': 0.4})
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 100, "val/accur')  # A kill in the middle of a write.
  assert sweep.read_final_metrics(str(tmp_path), 100)['val/accuracy'] == 0.5


def test_final_metrics_of_a_bucket_run_include_its_unmerged_parts(tmp_path, monkeypatch):
  """A gs:// run's last lines sit in `.part-` objects until it closes its writer."""
  monkeypatch.setattr(paths, 'is_remote', lambda path: True)  # Local files through tf.io.gfile.
  monkeypatch.setattr(reporting, '_REMOTE_FLUSH_SECONDS', 0.0)
  path = str(tmp_path / 'metrics.jsonl')
  writer = reporting.JsonlWriter(path)
  writer.write_scalars(50, {'val/accuracy': 0.3})
  writer.write_scalars(100, {'val/accuracy': 0.5, 'test/accuracy': 0.4})
  assert glob.glob(path + '.part-*')
  assert sweep.read_final_metrics(str(tmp_path), 100) == {
      'step': 100, 'val/accuracy': 0.5, 'test/accuracy': 0.4}
  writer.close()


def test_vtab_table_from_collected_runs(tmp_path):
  """Runs done elsewhere (e.g. from --print_commands) are collected; averages per group."""
  rng = np.random.default_rng(0)
  accuracy = {}
  for name in transfer_tasks.VTAB_TASKS:
    task = transfer_tasks.TASKS[name]
    vals = rng.uniform(0.2, 0.9, len(task.lr_grid))
    for lr, val in zip(task.lr_grid, vals):
      _metrics(str(tmp_path / name / f'lr{lr:g}'), task.steps, **{'val/accuracy': float(val)})
    best = task.lr_grid[int(np.argmax(vals))]
    accuracy[name] = float(rng.uniform(0.3, 0.95))
    _metrics(str(tmp_path / name / f'final_lr{best:g}'), task.steps,
             **{'test/accuracy': accuracy[name]})

  def fail(*_):
    raise AssertionError('a finished run was trained again')

  results, pending = sweep.sweep(
      transfer_tasks.VTAB_TASKS, root=str(tmp_path),
      make_arg=lambda t, lr, final: f'configs/transfer.py:task={t},lr={lr:g}'
      + (',final' if final else ''),
      build=lambda arg: _transfer(arg.partition(':')[2]), runner=sweep.Runner(fail),
      variant='L_16')
  assert not pending
  for name in transfer_tasks.VTAB_TASKS:
    assert results[name]['test_accuracy'] == accuracy[name]
  averages = sweep.vtab_averages(results)
  for group in transfer_tasks.GROUPS:
    names = [n for n in accuracy if transfer_tasks.TASKS[n].group == group]
    assert averages[group][0] == pytest.approx(100 * np.mean([accuracy[n] for n in names]))
  assert averages['overall'][0] == pytest.approx(100 * np.mean(list(accuracy.values())))
  table = (tmp_path / 'results.md').read_text()
  assert f"{averages['structured'][0]:.2f}" in table and '| 74.95 |' in table
  assert json.loads((tmp_path / 'dmlab' / 'result.json').read_text())['task'] == 'dmlab'

  # One task missing: its group and the overall mean are not reported, the others are.
  del results['svhn']
  averages = sweep.vtab_averages(results)
  assert averages['natural'][0] is None and averages['natural'][1:] == (6, 7)
  assert averages['overall'][0] is None and averages['specialized'][0] is not None
  assert '– (6 of 7 done)' in sweep.format_table(results, 'L_16')


def test_a_run_stopped_early_stops_the_sweep(tmp_path):
  """A SIGTERM'd run returns with a checkpoint but no last step: do not go on to the next."""
  calls = []
  with pytest.raises(sweep.Stopped, match='rerun the same sweep command to resume'):
    sweep.sweep(['pets'], root=str(tmp_path),
                make_arg=lambda t, lr, final: f'configs/transfer.py:task={t},lr={lr:g}',
                build=lambda arg: _transfer(arg.partition(':')[2]),
                runner=sweep.Runner(lambda config, workdir: calls.append(workdir)))
  assert calls == [str(tmp_path / 'pets' / 'lr0.003')]


def test_avg5_row_of_the_table():
  accuracy = dict(zip(transfer_tasks.AVG5_TASKS, (0.80, 0.97, 0.87, 0.90, 0.99)))
  results = {n: {'group': 'none', 'dataset': transfer_tasks.TASKS[n].dataset, 'lr': 0.01,
                 'val_accuracy': a, 'test_accuracy': a} for n, a in accuracy.items()}
  table = sweep.format_table(results, 'B_16', 224)
  assert '| 90.60 | 92.50 (Table 3) |' in table  # mean(80, 97, 87, 90, 99) beside the paper.
  results['pets']['test_accuracy'] = None
  assert '| – (not all done) | 92.50 (Table 3) |' in sweep.format_table(results, 'B_16', 224)


def test_command_line_lists_and_prints_commands(tmp_path, capsys):
  assert sweep.main(['--list']) == 0
  lines = capsys.readouterr().out.strip().split('\n')
  assert len(lines) == len(transfer_tasks.TASKS) == 24
  assert lines[-1].split() == ['smallnorb_elevation', 'smallnorb', '9', 'structured']

  assert sweep.main([f'--config={CONFIG}:task=pets,variant=L_16', f'--workdir={tmp_path}',
                     '--print_commands', '--config.data_dir=/data/tfds']) == 0
  out = capsys.readouterr().out
  commands = [line for line in out.split('\n') if line.startswith('python -m mixer.main')]
  assert len(commands) == 4
  assert f'--config={CONFIG}:task=pets,variant=L_16,lr=0.06' in commands[-1]
  assert commands[-1].endswith(f'--workdir={tmp_path}/pets/lr0.06 --config.data_dir=/data/tfds')
  assert '| pets | none | oxford_iiit_pet |' in out

  with pytest.raises(SystemExit):
    sweep.main([f'--config={CONFIG}', '--tasks=vtab,nope', f'--workdir={tmp_path}'])
  err = capsys.readouterr().err
  assert err.startswith("error: Unknown task 'nope'") and err.count('\n') == 1
  with pytest.raises(SystemExit):
    sweep.main([f'--config={CONFIG.parent / "finetune_cifar10.py"}', '--tasks=pets',
                f'--workdir={tmp_path}'])
  assert "builds the 'cifar10' task only" in capsys.readouterr().err
  assert sweep.main([f'--config={CONFIG}:task=pets', f'--workdir={tmp_path}',
                     '--config.nope=1', '--print_commands']) == 2
  assert "--config.nope: config has no key 'nope'" in capsys.readouterr().err


def _tiny(config):
  """The task's data, splits, classes, optimizer and evaluators; a model that runs in seconds."""
  config.image_size = 16
  config.model.update(patch_size=4, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16,
                      channels_mlp_dim=64)
  config.model_dtype = 'float32'
  config.init_from = None
  config.batch_size = config.eval_batch_size = 40
  config.total_steps, config.warmup_steps = 30, 3
  config.log_every = config.checkpoint_every = 15
  config.input.inception_crop = config.input.flip = False  # Digits: orientation matters.
  return config


@pytest.mark.slow
def test_sweep_on_digits_selects_by_val_and_resumes(tmp_path, monkeypatch):
  """Real runs on the embedded digits through the registry: grid, selection, VTAB final stage."""
  common = dict(dataset='digits', tfds='digits', num_classes=10, steps=30, warmup=3,
                lr_grid=(1e-4, 0.3))
  monkeypatch.setitem(transfer_tasks.TASKS, 'digits', transfer_tasks.Task(
      name='digits', train='train[:1000]', val='train[1000:]', test='test', eval_pp='resize',
      **common))
  monkeypatch.setitem(transfer_tasks.TASKS, 'digits_1k', transfer_tasks.Task(
      name='digits_1k', train='train[:800]', val='train[800:1000]', test='test',
      final_train='train[:1000]', group='natural', eval_pp='resize', **common))

  from mixer import train  # pylint: disable=g-import-not-at-top
  trained = []

  def train_fn(config, workdir):
    trained.append(os.path.basename(workdir))
    return train.train_and_evaluate(config, workdir)

  def make_arg(task, lr, final):
    return f'transfer:task={task},lr={lr:g}' + (',final' if final else '')

  def build(arg):
    args = dict(t.partition('=')[::2] for t in arg.partition(':')[2].split(','))
    return _tiny(transfer_tasks.build_config(args['task'], lr=float(args['lr']),
                                             final='final' in args))

  results, pending = sweep.sweep(['digits', 'digits_1k'], root=str(tmp_path),
                                 make_arg=make_arg, build=build, runner=sweep.Runner(train_fn))
  assert not pending
  final = f"final_lr{results['digits_1k']['lr']:g}"
  assert trained == ['lr0.0001', 'lr0.3', 'lr0.0001', 'lr0.3', final]
  for name in ('digits', 'digits_1k'):
    runs = {lr: sweep.read_final_metrics(str(tmp_path / name / f'lr{lr:g}'), 30)
            for lr in common['lr_grid']}
    best = max(runs, key=lambda lr: runs[lr]['val/accuracy'])
    assert results[name]['lr'] == best == 0.3, runs  # 30 steps at lr 1e-4 learn ~nothing.
    assert results[name]['val_accuracy'] == runs[best]['val/accuracy']
  assert results['digits']['test_accuracy'] == runs_test(tmp_path / 'digits' / 'lr0.3')
  assert results['digits_1k']['test_accuracy'] == runs_test(tmp_path / 'digits_1k' / final)
  assert results['digits']['test_accuracy'] > 0.5

  def fail(*_):
    raise AssertionError('a finished run was trained again')

  again, _ = sweep.sweep(['digits', 'digits_1k'], root=str(tmp_path), make_arg=make_arg,
                         build=build, runner=sweep.Runner(fail))
  assert again == results


def runs_test(workdir):
  return sweep.read_final_metrics(str(workdir), 30)['test/accuracy']


# One task per VTAB group (camelyon in its final stage), and an "Avg. 5" task: each
# with its real class count and splits, on fake data, through mixer.rehearse.
_REHEARSED = [('pets', False), ('dtd', False), ('camelyon', True), ('clevr_count', False)]


@pytest.mark.slow
@pytest.mark.parametrize('name, final', _REHEARSED,
                         ids=[f'{n}{",final" if f else ""}' for n, f in _REHEARSED])
def test_rehearsal_with_real_classes_and_splits(tmp_path, name, final):
  from mixer import rehearse  # pylint: disable=g-import-not-at-top
  task = transfer_tasks.TASKS[name]
  config = transfer_tasks.build_config(name, final=final)
  report = rehearse.rehearse(config, str(tmp_path))
  assert report['passed'], report['verdict']
  rehearsed = report['config']
  assert rehearsed.num_classes == task.num_classes
  assert rehearsed.dataset == task.dataset
  assert f'({task.num_classes} classes)' in report['verdict']
  evaluated = {'test'} if final else ({'val'} if task.is_vtab else {'val', 'test'})
  assert set(rehearsed.evals) == evaluated
  for evaluator in evaluated:
    assert 0.0 <= report['metrics'][f'{evaluator}/accuracy'] <= 1.0
  # The same splits are read: index slices scaled to the fake split, percent slices as written.
  def bases(split):
    return [part.split('[')[0] for part in split.split('+')]

  assert bases(rehearsed.train_split) == bases(config.train_split)
  for evaluator in evaluated:
    assert bases(rehearsed.evals[evaluator].split) == bases(config.evals[evaluator].split)
    if '%' in config.evals[evaluator].split:
      assert rehearsed.evals[evaluator].split == config.evals[evaluator].split
