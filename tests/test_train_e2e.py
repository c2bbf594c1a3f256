"""End-to-end runs of the real trainer (`train_and_evaluate` and `python -m mixer.main`).

The slow ones (marked `slow`) train for real; `make test` runs them too.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from flax import traverse_util

from mixer import checkpoint, config_lib, evaluators, train, weights
from mixer.benchmarks import profile_bench
from tests import multidevice

REPO = multidevice.REPO


digits = config_lib.load_config_module(os.path.join(REPO, 'configs', 'digits.py'))


def tiny_config(eval_every=6, **overrides):
  """configs/digits.py shrunk to a fast smoke run (same data and pipeline)."""
  config = digits.get_config()
  config.model.update(hidden_dim=32, num_blocks=2, tokens_mlp_dim=16, channels_mlp_dim=64)
  config.update(image_size=16, batch_size=32, eval_batch_size=40, total_steps=12, warmup_steps=2,
                log_every=4, checkpoint_every=6)
  config.evals.eval.every_steps = eval_every
  config.model.patch_size = 4
  config.update(overrides)
  return config


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def main_command(workdir, *flags, config='configs/digits.py'):
  return [sys.executable, '-m', 'mixer.main', f'--config={config}', f'--workdir={workdir}',
          '--config.model.hidden_dim=32', '--config.model.num_blocks=2',
          '--config.model.tokens_mlp_dim=16', '--config.model.channels_mlp_dim=64',
          '--config.image_size=16', '--config.batch_size=32', '--config.eval_batch_size=40',
          '--config.warmup_steps=2', *flags]


def run_main(workdir, *flags, num_devices=1, timeout=600):
  result = subprocess.run(main_command(workdir, *flags), cwd=REPO, capture_output=True, text=True,
                          env=multidevice.subprocess_env(num_devices), timeout=timeout)
  assert result.returncode == 0, result.stderr[-5000:]
  return result


def test_smoke_run_writes_metrics_checkpoints_and_export(tmp_path, capsys):
  workdir = str(tmp_path)
  results = train.train_and_evaluate(tiny_config(profile_steps=(4, 6)), workdir)
  assert results['step'] == 12
  profiles = glob.glob(os.path.join(workdir, 'profile', 'plugins', 'profile', '*', '*.xplane.pb'))
  assert len(profiles) == 1  # The profiler window of config.profile_steps.
  # ... with the step's HLO beside it, which names the trace's ops: the command the trainer
  # logs sums them on the CPU too.
  categories, _ = profile_bench.read_step_ops(os.path.join(workdir, 'profile'))
  assert 'matmul' in categories.values()
  capsys.readouterr()  # What the run printed.
  assert profile_bench.main([], os.path.join(workdir, 'profile'), steps=2, top=3) == 0
  summary = capsys.readouterr().out.splitlines()
  assert summary[0].startswith("CPU time of the ops on XLA's threads: ") and 'matmul' in summary[0]
  assert len(summary) == 2 + 3
  records = read_metrics(workdir)
  train_records = [r for r in records if 'train/loss' in r]
  assert [r['step'] for r in train_records] == [4, 8, 12]
  for key in ('train/loss', 'train/learning_rate', 'train/grad_norm', 'perf/core_hours'):
    assert all(np.isfinite(r[key]) for r in train_records), key
  assert any('perf/img_per_sec_per_core' in r for r in train_records)
  evals = [r for r in records if 'eval/accuracy' in r]
  assert [r['step'] for r in evals] == [6, 12]
  assert all(0.0 <= r['eval/accuracy'] <= 1.0 and np.isfinite(r['eval/loss']) for r in evals)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['12', '6']
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  assert os.path.exists(os.path.join(workdir, 'training_curves.png'))
  params = weights.load_npz(os.path.join(workdir, 'final.npz'))
  assert params['stem']['kernel'].shape == (4, 4, 3, 32)
  assert params['head']['kernel'].shape == (32, 10)


@pytest.mark.slow
def test_digits_demo_reaches_95_percent(tmp_path):
  """Real learning: the `make demo` config on the embedded digits."""
  results = train.train_and_evaluate(digits.get_config(), str(tmp_path))
  assert results['eval/accuracy'] >= 0.95, results
  losses = [r['train/loss'] for r in read_metrics(str(tmp_path)) if 'train/loss' in r]
  assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
  flags = ('--config.total_steps=300', '--config.checkpoint_every=20',
           '--config.evals.eval.every_steps=1000', '--config.log_every=50',
           '--config.warmup_steps=10')
  reference = str(tmp_path / 'uninterrupted')
  assert 'Compiled the train step in' in run_main(reference, *flags).stderr

  killed = str(tmp_path / 'killed')
  process = subprocess.Popen(main_command(killed, *flags), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=multidevice.subprocess_env(1))
  committed = os.path.join(killed, 'checkpoints', '40')
  deadline = time.time() + 300
  while not os.path.isdir(committed) and time.time() < deadline and process.poll() is None:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert os.path.isdir(committed), 'the run ended before its step-40 checkpoint'
  assert not os.path.exists(os.path.join(killed, 'final.npz')), 'killed too late: run finished'

  resumed = run_main(killed, *flags)
  assert 'Resumed from step' in resumed.stderr
  # The killed run left its executable in the workdir's persistent cache; the log says so.
  assert 'Loaded the train step from the persistent compilation cache in' in resumed.stderr
  a = traverse_util.flatten_dict(weights.load_npz(os.path.join(reference, 'final.npz')),
                                 sep='/')
  b = traverse_util.flatten_dict(weights.load_npz(os.path.join(killed, 'final.npz')), sep='/')
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
def test_checkpoint_from_8_device_fsdp_mesh_restores_on_1_device(tmp_path):
  workdir = str(tmp_path)
  run_main(workdir, '--config.total_steps=10', '--config.checkpoint_every=5',
           '--config.mesh.fsdp=4', '--config.evals.eval.every_steps=10', num_devices=8)
  resumed = run_main(workdir, '--config.total_steps=20', '--config.checkpoint_every=5',
                     '--config.evals.eval.every_steps=10', num_devices=1)
  assert 'Resumed from step 10' in resumed.stderr
  steps = [r['step'] for r in read_metrics(workdir) if 'train/loss' in r]
  assert max(steps) == 20


@pytest.mark.slow
def test_two_processes_train_together_and_one_process_continues(tmp_path):
  workdir = str(tmp_path)
  port = 20000 + os.getpid() % 20000
  flags = ('--config.total_steps=30', '--config.checkpoint_every=10',
           '--config.evals.eval.every_steps=30', '--config.log_every=5', '--config.warmup_steps=2',
           '--config.lr=0.01')
  processes = [
      subprocess.Popen(
          main_command(workdir, *flags, f'--coordinator_address=127.0.0.1:{port}',
                       '--num_processes=2', f'--process_id={i}'),
          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
          env=multidevice.subprocess_env(4))
      for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-5000:]
  assert 'Process 1 of 2' in outputs[1][1]
  assert '8 x cpu in 2 processes; mesh data=8 fsdp=1 model=1' in outputs[0][1]
  losses = [r['train/loss'] for r in read_metrics(workdir) if 'train/loss' in r]
  assert len(losses) == 6 and losses[-1] < losses[0], losses
  resumed = run_main(workdir, '--config.total_steps=40', '--config.checkpoint_every=10',
                     '--config.evals.eval.every_steps=40', '--config.log_every=5',
                     '--config.warmup_steps=2')
  assert 'Resumed from step 30' in resumed.stderr
  assert max(r['step'] for r in read_metrics(workdir)) == 40


@pytest.fixture(scope='module')
def pretrained_npz(tmp_path_factory):
  """A released-format file from 60 steps at 16 px (about 70% test accuracy)."""
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  train.train_and_evaluate(tiny_config(total_steps=60, eval_every=60, checkpoint_every=60),
                           workdir)
  return os.path.join(workdir, 'final.npz')


@pytest.mark.slow
@pytest.mark.parametrize('image_size', [16, 32])
def test_finetune_from_released_format_npz(tmp_path, pretrained_npz, image_size):
  """Fine-tune from the 16 px file at 16 px and at 32 px (Appendix C, K=2), new zero head.

  40 SGD steps from the file must beat 40 steps from scratch at the same size by a wide
  margin: the (adapted) weights really carry what was learned.
  """
  def finetune_config(**overrides):
    config = tiny_config(optimizer='momentum', weight_decay=0.0, lr=0.03, decay_type='cosine',
                         total_steps=40, warmup_steps=5, eval_every=40, checkpoint_every=40,
                         image_size=image_size, **overrides)
    config.model.tokens_mlp_dim = 16 * (image_size // 16) ** 2  # D_S grows with the tokens.
    return config

  finetuned = train.train_and_evaluate(
      finetune_config(init_from=pretrained_npz, init_from_image_size=16),
      str(tmp_path / 'finetune'))
  scratch = train.train_and_evaluate(finetune_config(), str(tmp_path / 'scratch'))
  params = weights.load_npz(str(tmp_path / 'finetune' / 'final.npz'))
  tokens = (image_size // 4) ** 2
  assert params['MixerBlock_0']['token_mixing']['Dense_0']['kernel'].shape == (
      tokens, 16 * (image_size // 16) ** 2)
  assert finetuned['eval/accuracy'] > 0.4, finetuned
  assert finetuned['eval/accuracy'] > scratch['eval/accuracy'] + 0.15, (finetuned, scratch)


def test_workdir_with_another_models_checkpoint_is_refused(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(total_steps=6, checkpoint_every=6, eval_every=6), workdir)
  before = {f: os.path.getmtime(os.path.join(workdir, 'checkpoints', f))
            for f in os.listdir(os.path.join(workdir, 'checkpoints'))}
  other = tiny_config(total_steps=12)
  other.model.hidden_dim = 48
  with pytest.raises(ValueError, match='holds a checkpoint .* of another model.*hidden_dim'):
    train.train_and_evaluate(other, workdir)
  after = {f: os.path.getmtime(os.path.join(workdir, 'checkpoints', f))
           for f in os.listdir(os.path.join(workdir, 'checkpoints'))}
  assert before == after


def test_init_from_wrong_variant_is_a_clear_error(tmp_path):
  train.train_and_evaluate(tiny_config(total_steps=6, checkpoint_every=6, eval_every=6),
                           str(tmp_path / 'a'))
  config = tiny_config(init_from=str(tmp_path / 'a' / 'final.npz'))
  config.model.hidden_dim = 48
  with pytest.raises(weights.WeightsError, match='hidden'):
    train.train_and_evaluate(config, str(tmp_path / 'b'))
  assert not os.path.exists(tmp_path / 'b' / 'checkpoints' / '6')


def test_command_line_errors_are_clear(tmp_path):
  bad_key = subprocess.run(main_command(str(tmp_path), '--config.lerning_rate=1'), cwd=REPO,
                           capture_output=True, text=True, env=multidevice.subprocess_env(1))
  assert bad_key.returncode != 0
  assert "Unknown config key 'config.lerning_rate'" in bad_key.stderr
  assert 'warmup_steps' in bad_key.stderr  # Lists the valid keys.
  missing = subprocess.run(
      [sys.executable, '-m', 'mixer.main', '--config=configs/no_such_config.py',
       f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True,
      env=multidevice.subprocess_env(1))
  assert missing.returncode != 0
  assert "config file 'configs/no_such_config.py' does not exist" in missing.stderr


def test_batch_not_divisible_by_devices_is_refused_by_the_trainer(tmp_path):
  result = subprocess.run(main_command(str(tmp_path), '--config.batch_size=36'), cwd=REPO,
                          capture_output=True, text=True, env=multidevice.subprocess_env(8))
  assert result.returncode != 0
  assert 'is not divisible by the 8 data-parallel devices' in result.stderr


@pytest.mark.slow
def test_flagship_config_runs_locally_with_fewshot(tmp_path):
  """`configs/mixer_l16_i21k.py:runlocal`: the same recipe (sigmoid, RandAugment 20, mixup,
  stochastic depth, bf16 Adam moment, few-shot probes) on the embedded digits."""
  module = config_lib.load_config_module(os.path.join(REPO, 'configs', 'mixer_l16_i21k.py'))
  config = module.get_config('runlocal')
  assert config.input.randaug_magnitude == 20 and config.loss == 'sigmoid_xent'
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results['step'] == config.total_steps
  for shots in (1, 5):
    assert 0.0 < results[f'fewshot/digits_{shots}shot'] <= 1.0
  fewshot_steps = [r['step'] for r in read_metrics(str(tmp_path)) if 'fewshot/digits_5shot' in r]
  assert fewshot_steps == [15, 30]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes(tmp_path):
  workdir = str(tmp_path)
  flags = ('--config.total_steps=2000', '--config.checkpoint_every=1000',
           '--config.evals.eval.every_steps=5000', '--config.log_every=50')
  process = subprocess.Popen(main_command(workdir, *flags), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=multidevice.subprocess_env(1))
  deadline = time.time() + 300
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  while time.time() < deadline and process.poll() is None and not (
      os.path.exists(metrics_path) and os.path.getsize(metrics_path) > 0):
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)  # What a preemption / SLURM / Kubernetes sends first.
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 75, stderr[-3000:]  # EX_TEMPFAIL: preempted, checkpoint saved.
  assert 'Preemption at step' in stderr
  saved = [int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit()]
  assert len(saved) == 1 and 50 <= saved[0] < 1000  # Saved off-schedule, at the signal.
  assert not os.path.exists(os.path.join(workdir, 'final.npz'))
  resumed = run_main(workdir, '--config.total_steps=' + str(saved[0] + 20),
                     '--config.checkpoint_every=1000', '--config.evals.eval.every_steps=5000',
                     '--config.log_every=10')
  assert f'Resumed from step {saved[0]}' in resumed.stderr
  assert os.path.exists(os.path.join(workdir, 'final.npz'))


def test_tfds_imagenet_with_real_labels_through_the_trainer(tmp_path):
  """The TFDS source (mock data, offline) end to end, with the ReaL evaluator on."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = tiny_config(dataset='imagenet2012', train_split='train', num_classes=1000,
                       total_steps=4, eval_every=4, checkpoint_every=4, log_every=2,
                       batch_size=8, eval_batch_size=8)
  config.evals.eval.split = 'validation'
  config.evals.real = evaluators.settings('classification', dataset='imagenet2012_real',
                                          split='validation', label_field='real_label')
  with tfds.testing.mock_data(num_examples=12):
    results = train.train_and_evaluate(config, str(tmp_path))
  assert results['step'] == 4
  assert 0.0 <= results['eval/accuracy'] <= results['eval/top5_accuracy'] <= 1.0
  assert 0.0 <= results['real/accuracy'] <= 1.0


def test_preemption_notice_saves_and_returns_the_step(tmp_path, monkeypatch):
  """What a pod's preemption sync point does, in process: save at that step, stop, no export."""
  monkeypatch.setattr(checkpoint.TrainCheckpointer, 'reached_preemption',
                      lambda self, step: step == 5)
  results = train.train_and_evaluate(tiny_config(total_steps=12), str(tmp_path))
  assert results['step'] == 5
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['5']
  assert not os.path.exists(tmp_path / 'final.npz')


def _write_image_folder(root, num_classes, per_class):
  """A tiny `imagefolder:` dataset: noisy images whose mean colour is the class."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for label in range(num_classes):
      folder = root / split / f'class_{label}'
      folder.mkdir(parents=True)
      for i in range(per_class):
        pixels = np.clip(rng.normal(60 + 70 * label, 20, (12, 12, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f'{i}.png')
  return f'imagefolder:{root}'


def test_evaluators_have_their_own_data_classes_and_cadences(tmp_path):
  """The few-shot set has 3 classes while training has 10 (the flagship configs' case:
  1000-class ImageNet probes on a 21843-class model); each evaluator keeps its cadence."""
  probe = _write_image_folder(tmp_path / 'probe', num_classes=3, per_class=6)
  config = tiny_config(total_steps=12, eval_every=10, checkpoint_every=12)
  config.evals.fewshot = evaluators.settings(
      'fewshot', every_steps=4, datasets={'probe': (probe, 'train', 'test')}, shots=(1, 5),
      num_seeds=1)
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir)
  rows = read_metrics(workdir)
  assert [r['step'] for r in rows if 'eval/accuracy' in r] == [10, 12]
  assert [r['step'] for r in rows if 'fewshot/probe_5shot' in r] == [4, 8, 12]
  assert 0.0 <= results['fewshot/probe_1shot'] <= 1.0
  assert 'eval/top5_accuracy' in results
  sidecar = json.loads((tmp_path / 'run' / 'final.json').read_text())
  assert sidecar['image_size'] == 16 and sidecar['num_classes'] == 10
  assert sidecar['preprocessing']['pp'] == 'resize' and sidecar['step'] == 12
  assert sidecar['model']['hidden_dim'] == 32 and sidecar['labels'] == [str(i) for i in range(10)]
  # The persistent compilation cache (default: in the workdir) holds the compiled steps.
  assert os.listdir(os.path.join(workdir, 'compile_cache'))


def test_missing_evaluator_dataset_fails_before_any_state(tmp_path, monkeypatch):
  def no_model(*args, **kwargs):
    raise AssertionError('the model was built before the data was checked')

  monkeypatch.setattr(train.trainer_setup, 'build', no_model)
  config = tiny_config()
  config.evals.fewshot = evaluators.settings(
      'fewshot', datasets={'gone': (f'imagefolder:{tmp_path}/nowhere', 'train', 'test')})
  with pytest.raises(ValueError, match=r"Dataset 'imagefolder:.*nowhere', split 'train'"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  config = tiny_config()
  config.evals.eval.dataset = 'cifar100'
  config.data_dir = str(tmp_path / 'tfds')
  with pytest.raises(ValueError, match='python -m mixer.datasets.prepare cifar100'):
    train.train_and_evaluate(config, str(tmp_path / 'run2'))


def test_evaluate_only_on_a_finished_workdir_and_on_an_init_file(tmp_path):
  workdir = str(tmp_path / 'run')
  finished = train.train_and_evaluate(tiny_config(total_steps=6, checkpoint_every=6), workdir)
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  npz_before = (tmp_path / 'run' / 'final.npz').read_bytes()
  again = train.train_and_evaluate(tiny_config(total_steps=0, warmup_steps=0), workdir)
  assert again['step'] == 6
  assert again['eval/accuracy'] == pytest.approx(finished['eval/accuracy'], abs=1e-6)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before
  assert (tmp_path / 'run' / 'final.npz').read_bytes() == npz_before  # Nothing else changed.

  from_file = train.train_and_evaluate(
      tiny_config(total_steps=0, warmup_steps=0, init_from=os.path.join(workdir, 'final.npz'),
                  init_head='keep'), str(tmp_path / 'eval_only'))
  assert from_file['step'] == 0
  assert from_file['eval/accuracy'] == pytest.approx(finished['eval/accuracy'], abs=1e-6)
  assert not os.path.exists(tmp_path / 'eval_only' / 'final.npz')
  with pytest.raises(ValueError, match='evaluate-only'):
    train.train_and_evaluate(tiny_config(total_steps=0, warmup_steps=0),
                             str(tmp_path / 'nothing'))
