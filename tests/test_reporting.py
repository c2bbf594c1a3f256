"""What a run shows: progress lines, start-up summary, config/parameter files, hparams, curves."""

import json
import logging
import math
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from clu import metric_writers
from tensorboard.plugins.hparams import plugin_data_pb2

from mixer import config_lib, optim, reporting

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RATE = re.compile(r'\| ([0-9.e+-]+) steps/s \| ([0-9.e+-]+) img/s/core \| ETA (\S+)')


class _FakeClock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def test_first_progress_line_rate_is_within_2x_of_the_real_rate():
  """A fake step that sleeps a known time; the first step also 'compiles' for 10 steps' time."""
  step_seconds, log_every, total = 0.04, 5, 15
  lines = []
  progress = reporting.ProgressLogger(total, 0, batch_size=32, num_cores=2, log_every=log_every,
                                      log=lines.append)
  step = 0
  while step < total:
    time.sleep(step_seconds * (10 if step == 0 else 1))
    step += 1
    if progress.should_fetch(step):
      progress.finished(step, {'train/loss': 2.0})
  first = next(line for line in lines if 'steps/s' in line)
  assert first.startswith('step  5/15 |')
  steps_per_sec, img_per_sec_per_core, eta = _RATE.search(first).groups()
  real = 1 / step_seconds  # 25 steps/s; counting the slow first step would give ~8.
  assert real / 2 <= float(steps_per_sec) <= real * 2, first
  assert float(img_per_sec_per_core) == pytest.approx(float(steps_per_sec) * 32 / 2, rel=1e-3)
  assert re.fullmatch(r'\d+:\d\d:\d\d', eta)


def test_progress_lines_rates_eta_pauses_and_core_hours_on_a_fake_clock():
  clock, lines = _FakeClock(), []
  progress = reporting.ProgressLogger(100, 0, batch_size=64, num_cores=4, log_every=10,
                                      clock=clock, log=lines.append)
  clock.now += 30.0  # Start-up and the first step: no rate includes it.
  assert progress.should_fetch(1)
  assert progress.finished(1, {'train/loss': 2.3}) == {}
  assert not lines
  assert not progress.should_fetch(2) and progress.should_fetch(10)
  clock.now += 9 * 0.5  # Steps 2..10 at 2 steps/s.
  perf = progress.finished(10, {'train/loss': 1.2582260370254517, 'train/learning_rate': 2.143e-3,
                                'train/grad_norm': 0.87654321})
  assert lines[0] == ('step  10/100 | loss 1.258 | lr 0.002143 | grad 0.8765 | 2.000 steps/s | '
                      '32.00 img/s/core | ETA 0:00:45')
  assert lines[1].startswith('Expected: 0:00:45 more for steps 10..100 at 2.000 steps/s')
  assert perf['perf/img_per_sec_per_core'] == pytest.approx(32.0)
  assert perf['perf/core_hours'] == pytest.approx((30 + 4.5) * 4 / 3600)

  # An evaluation of 60 s between step 10 and 11 is excluded from the rate, not from the ETA.
  progress.pause(10)
  clock.now += 60.0
  progress.resume()
  clock.now += 10 * 0.25  # Steps 11..20 at 4 steps/s.
  progress.finished(20, {'train/loss': 0.9})
  steps_per_sec, _, eta = _RATE.search(lines[2]).groups()
  assert float(steps_per_sec) == pytest.approx(4.0)
  wall_per_step = (4.5 + 60 + 2.5) / (20 - 1)
  assert eta == reporting.format_duration(80 * wall_per_step)
  assert progress.core_hours == pytest.approx((30 + 4.5 + 2.5) * 4 / 3600)
  assert sum(line.startswith('Expected') for line in lines) == 1  # Said once.


def test_progress_last_step_is_always_reported():
  clock, lines = _FakeClock(), []
  progress = reporting.ProgressLogger(25, 20, batch_size=8, num_cores=1, log_every=10,
                                      clock=clock, log=lines.append)
  for step in range(21, 26):  # A resumed run: 20 -> 25, no multiple of 10 on the way.
    clock.now += 1.0
    if progress.should_fetch(step):
      progress.finished(step)
  assert len(lines) == 1 and lines[0].startswith('step 25/25 |') and lines[0].endswith('ETA done')
  assert '1.000 steps/s' in lines[0]


@pytest.mark.parametrize('value, text', [(1.2582260370254517, '1.258'), (0.002143, '0.002143'),
                                         (3e-5, '3e-05'), (98.1234, '98.12'), (0.0, '0'),
                                         (2.5e7, '2.5e+07'), (float('nan'), 'nan')])
def test_format_number_has_4_significant_digits(value, text):
  assert reporting.format_number(value) == text


def test_format_duration_is_h_mm_ss():
  assert reporting.format_duration(50) == '0:00:50'  # Not '0m'.
  assert reporting.format_duration(3 * 3600 + 7 * 60 + 5.4) == '3:07:05'
  assert reporting.format_duration(None) == '?'


def _summary(**overrides):
  kwargs = dict(
      workdir='/runs/demo', model_name='Mixer-S_32',
      model_sizes=dict(patch_size=4, hidden_dim=64, num_blocks=4, tokens_mlp_dim=32,
                       channels_mlp_dim=256),
      image_size=32, num_classes=10, num_params=181_066, mesh_shape={'data': 2, 'fsdp': 1,
                                                                     'model': 1},
      device_kind='cpu', num_devices=2, num_processes=1, dataset='digits', train_size=1437,
      batch_size=128, total_steps=300, warmup_steps=30,
      evaluators={'eval': {'type': 'classification', 'every_steps': 100, 'dataset': None,
                           'split': 'test'},
                  'fewshot': {'type': 'fewshot', 'every_steps': 0,
                              'datasets': {'digits': ('digits', 'train', 'test')},
                              'shots': (1, 5)}},
      memory={'argument': 3 * 2**20, 'output': 3 * 2**20, 'temp': 8 * 2**20,
              'alias': 3 * 2**20, 'generated_code': 0, 'total': 11 * 2**20})
  kwargs.update(overrides)
  return reporting.startup_summary(**kwargs)


def test_startup_summary_fits_one_screen_with_the_facts():
  text = _summary()
  lines = text.splitlines()
  assert len(lines) <= 20 and max(map(len, lines)) <= 140
  for fact in ('Mixer-S_32', 'patch 4, hidden 64, 4 blocks', '181,066', '2 x cpu in 1 process;',
               'mesh data=2 fsdp=1 model=1', '1,437 training images', '10 classes',
               'batch 128 (128 per host)', '300 steps = 26.72 epochs', 'warm-up 30',
               'eval (classification: digits:test) every 100 steps and at the end',
               'fewshot (fewshot: digits, 1,5 shots) at the end', '11.00 MiB per device',
               'tensorboard --logdir /runs/demo --host localhost', 'from scratch'):
    assert fact in text, (fact, text)


def test_startup_summary_resumed_multihost_and_unknown_memory():
  text = _summary(start_step=200, num_processes=4, memory=None, train_size=None)
  assert 'resuming at step 200' in text and 'in 4 processes' in text
  assert 'batch 128 (32 per host)' in text and 'training size unknown' in text
  assert 'epochs' not in text and 'not reported by this backend' in text


def test_write_config_and_parameter_table(tmp_path):
  config = config_lib.base_config()
  config.model.hidden_dim = 48
  path = reporting.write_config(str(tmp_path), config)
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert path == str(tmp_path / 'config.json')
  assert saved['model']['hidden_dim'] == 48 and saved['lr'] == config.lr
  assert saved['sharding_rules'][0] == ['batch', ['data', 'fsdp']]

  params = {'stem': {'kernel': jax.ShapeDtypeStruct((4, 4, 3, 8), jnp.float32),
                     'bias': jax.ShapeDtypeStruct((8,), jnp.float32)}}
  reporting.write_parameter_table(str(tmp_path), params)
  table = (tmp_path / 'parameters.txt').read_text()
  assert 'stem/kernel' in table and '(4, 4, 3, 8)' in table and '392' in table  # 384 + 8.


def test_flatten_hparams_holds_nested_keys_tensorboard_accepts(tmp_path):
  config = config_lib.base_config()
  config.model.hidden_dim = 64
  hparams = reporting.flatten_hparams(config)
  assert hparams['model.hidden_dim'] == 64 and hparams['model.name'] == 'Mixer-S_16'
  assert hparams['mesh.data'] == -1 and hparams['input.flip'] is True and hparams['lr'] == 1e-3
  assert hparams['data_dir'] == 'None'
  assert isinstance(hparams['sharding_rules'], str)
  assert all(isinstance(v, (bool, int, float, str)) for v in hparams.values())
  assert not any(hasattr(v, 'items') for v in hparams.values())

  # TensorBoard's hparams plugin stores them all (it raises on a type it cannot hold).
  writer = metric_writers.SummaryWriter(str(tmp_path))
  writer.write_hparams(hparams)
  writer.close()
  (event_file,) = tf.io.gfile.glob(str(tmp_path / 'events.out.tfevents.*'))
  stored = {}
  for event in tf.compat.v1.train.summary_iterator(event_file):
    for value in event.summary.value:
      if value.metadata.plugin_data.plugin_name == 'hparams':
        data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
        stored.update(data.session_start_info.hparams)
  assert stored['model.hidden_dim'].number_value == 64
  assert stored['model.name'].string_value == 'Mixer-S_16'
  assert set(stored) == set(hparams)


def _write_metrics(path, total=300, log_every=25, eval_every=100, schedule=None):
  lines = []
  for step in range(log_every, total + 1, log_every):
    lines.append(json.dumps({'step': step, 'train/loss': 2.3 * math.exp(-step / 40) + 0.01,
                             'train/learning_rate': float(schedule(step - 1)),
                             'train/grad_norm': 1.0, 'perf/img_per_sec_per_core': 30.0}))
    if step % eval_every == 0:
      lines.append(json.dumps({'step': step, 'eval/loss': 0.5 / step * 100,
                               'eval/accuracy': 0.9 + step / 1e4,
                               'eval/top5_accuracy': 0.99,
                               'fewshot/digits_1shot': 0.5, 'fewshot/digits_5shot': 0.8}))
  lines.insert(3, 'this line is not json')
  lines.insert(5, json.dumps({'event': 'restart'}))               # A foreign record.
  lines.insert(6, json.dumps({'step': 7, 'train/loss': 'high'}))  # A non-number.
  lines.append('{"step": 300, "train/lo')                          # Cut off by a crash.
  path.write_text('\n'.join(lines) + '\n')


def _config(tmp_path):
  config = config_lib.base_config()
  config.model.name, config.dataset = 'Mixer-S_32', 'digits'
  config.lr, config.warmup_steps, config.total_steps = 3e-3, 30, 300
  reporting.write_config(str(tmp_path), config)
  return config


def test_curves_figure_has_every_panel_log_loss_and_the_full_schedule(tmp_path, caplog):
  config = _config(tmp_path)
  schedule = optim.make_schedule(config)
  _write_metrics(tmp_path / 'metrics.jsonl', schedule=schedule)
  with caplog.at_level(logging.WARNING):
    series = reporting.read_metrics(str(tmp_path / 'metrics.jsonl'))
  assert [r.getMessage().split(' (')[0].split('/')[-1] for r in caplog.records] == [
      'metrics.jsonl line 4 skipped', "metrics.jsonl line 6 skipped",
      'metrics.jsonl line 7 skipped', 'metrics.jsonl: 1 more line skipped.']
  assert "no 'step'" in caplog.records[1].getMessage()
  fig = reporting.curves_figure(series, schedule, title='Mixer-S_32 on digits, step 300 of 300')
  axes = {ax.get_title(): ax for ax in fig.axes}
  assert list(axes) == ['Loss', 'Accuracy', 'Few-shot linear accuracy', 'Learning rate']
  assert fig._suptitle.get_text() == 'Mixer-S_32 on digits, step 300 of 300'

  loss = axes['Loss']
  assert loss.get_yscale() == 'log' and loss.get_xlabel() == 'step'
  assert [line.get_label() for line in loss.get_lines()] == ['train', 'eval']
  assert [line.get_label() for line in axes['Accuracy'].get_lines()] == ['eval top-1',
                                                                         'eval top-5']
  assert axes['Accuracy'].get_lines()[0].get_ydata()[-1] == pytest.approx(93.0)
  assert [line.get_label() for line in axes['Few-shot linear accuracy'].get_lines()] == [
      'digits 1-shot', 'digits 5-shot']

  curve, logged = axes['Learning rate'].get_lines()
  steps, rates = curve.get_xdata(), curve.get_ydata()
  assert len(steps) == 300 and steps[0] == 1 and steps[-1] == 300  # Every step, not every 25.
  assert steps[np.argmax(rates)] == 31 and rates.max() == pytest.approx(3e-3)  # Warm-up end.
  for x, y in zip(logged.get_xdata(), logged.get_ydata()):  # Logged values lie on the curve.
    assert rates[int(x) - 1] == pytest.approx(y, rel=1e-6)


def test_plot_curves_writes_png_titled_from_config_and_tolerates_junk(tmp_path):
  config = _config(tmp_path)
  _write_metrics(tmp_path / 'metrics.jsonl', schedule=optim.make_schedule(config))
  out = reporting.plot_curves(str(tmp_path), optim.make_schedule(config))
  assert out == str(tmp_path / 'training_curves.png')
  assert (tmp_path / 'training_curves.png').read_bytes()[:4] == b'\x89PNG'
  facts = reporting._run_facts(str(tmp_path))
  assert facts == {'model': 'Mixer-S_32', 'dataset': 'digits', 'total_steps': 300}
  assert reporting._title(str(tmp_path), 300, facts) == (
      f'Mixer-S_32 on digits, step 300 of 300 ({tmp_path.name})')


def test_curves_mid_run_span_the_whole_run_with_the_schedule_to_come(tmp_path):
  config = _config(tmp_path)
  schedule = optim.make_schedule(config)
  _write_metrics(tmp_path / 'metrics.jsonl', total=100, schedule=schedule)
  fig = reporting.curves_figure(reporting.read_metrics(str(tmp_path / 'metrics.jsonl')),
                                schedule, total_steps=300)
  axes = {ax.get_title(): ax for ax in fig.axes}
  assert all(ax.get_xlim()[1] >= 300 for ax in fig.axes)
  done, to_come, logged = axes['Learning rate'].get_lines()
  assert done.get_xdata()[-1] == 100 and logged.get_xdata()[-1] == 100
  assert to_come.get_label() == 'to come' and to_come.get_linestyle() == '--'
  assert to_come.get_xdata()[0] == 100 and to_come.get_xdata()[-1] == 300
  assert to_come.get_ydata()[-1] == pytest.approx(float(schedule(299)))


def test_curves_without_evaluations_or_schedule(tmp_path):
  records = [{'step': 5, 'train/loss': 2.0}, {'step': 10, 'train/loss': 1.5},
             {'step': 5, 'train/loss': 1.9}]  # A resumed run rewrote step 5.
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  series = reporting.read_metrics(str(tmp_path / 'metrics.jsonl'))
  assert series == {'train/loss': [(5, 1.9), (10, 1.5)]}
  fig = reporting.curves_figure(series)
  assert [ax.get_title() for ax in fig.axes] == ['Loss']
  (tmp_path / 'metrics.jsonl').write_text('garbage\n')
  assert reporting.plot_curves(str(tmp_path)) is None


def test_command_line_start_up_prints_no_tf_or_xla_chatter():
  """`python -m mixer.main` imports TF and starts jax without oneDNN/absl/TPU notes."""
  snippet = ('from absl import logging; logging.set_verbosity("info"); logging.use_absl_handler()\n'
             'import mixer.main, jax, sys; jax.devices()\n'
             'print("real error", file=sys.stderr)\n')
  env = {k: v for k, v in os.environ.items() if k not in ('TF_CPP_MIN_LOG_LEVEL', 'JAX_PLATFORMS')}
  completed = subprocess.run([sys.executable, '-c', snippet], cwd=_REPO, env=env,
                             capture_output=True, text=True, timeout=300, check=False)
  assert completed.returncode == 0, completed.stderr
  for noise in ('oneDNN', 'absl::InitializeLog', "Unable to initialize backend 'tpu'",
                'cpu_feature_guard'):
    assert noise not in completed.stderr, completed.stderr
  assert completed.stderr.strip().splitlines()[-1] == 'real error'  # Other output still shows.


@pytest.mark.parametrize('command', [
    ['mixer.compile_check', '--config=configs/digits.py', '--topology=local'],
    ['mixer.predict', '--help'], ['mixer.export', '--help'], ['mixer.visualize', '--help']])
def test_every_command_starts_without_tf_chatter(command):
  """Not only `mixer.main`: every `python -m mixer.<command>` loads TF quietly (tf_startup)."""
  env = {k: v for k, v in os.environ.items() if k not in ('TF_CPP_MIN_LOG_LEVEL', 'JAX_PLATFORMS')}
  completed = subprocess.run([sys.executable, '-m', *command], cwd=_REPO, env=env,
                             capture_output=True, text=True, timeout=300, check=False)
  if command[-1] == '--help':  # absl prints the flags and exits with 1.
    assert 'Try --helpfull' in completed.stdout, completed.stderr
  else:
    assert completed.returncode == 0, completed.stderr
  for noise in ('oneDNN', 'absl::InitializeLog', "Unable to initialize backend 'tpu'",
                'cpu_feature_guard'):
    assert noise not in completed.stderr, completed.stderr
