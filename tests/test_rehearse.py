"""`python -m mixer.rehearse`: fake data with the real specs, the shrink, and a rehearsal of
every config in configs/ (slow: each trains, is preempted by SIGTERM and resumes)."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mixer import config_lib, datasets, evaluators, rehearse
from mixer.datasets import fake_data, imagenet21k
from tests import multidevice

REPO = multidevice.REPO


def load(spec):
  path, _, arg = spec.partition(':')
  module = config_lib.load_config_module(os.path.join(REPO, 'configs', path))
  return module.get_config(arg) if arg else module.get_config()


def test_plan_maps_index_slices_in_order_and_keeps_partitions():
  plan = fake_data.plan([('uc_merced', 'train[:1000]', 60), ('uc_merced', 'train[1000:]', 24),
                         ('imagenet2012', 'train[:99%]', 24), ('imagenet2012', 'train[99%:]', 24),
                         ('imagenet2012', 'validation', 24), ('cifar10', 'test', 24),
                         ('clevr', 'train[:800]', 24), ('clevr', 'train[63000:63200]', 24)])
  assert plan.sizes == {'uc_merced': {'train': 120}, 'cifar10': {'test': 24},
                        'imagenet2012': {'train': fake_data.PERCENT_SLICE_EXAMPLES,
                                         'validation': 24}, 'clevr': {'train': 96}}
  assert plan.splits == {
      ('uc_merced', 'train[:1000]'): 'train[:60]',  # Still a partition of the fake split.
      ('uc_merced', 'train[1000:]'): 'train[60:]',
      ('clevr', 'train[:800]'): 'train[:24]',
      ('clevr', 'train[63000:63200]'): 'train[48:72]'}  # A window far in stays a window.
  with pytest.raises(ValueError, match='Cannot parse split'):
    fake_data.plan([('cifar10', 'train[:5', 24)])


def test_fake_labels_cover_the_label_range_and_every_shot_count():
  labels = [fake_data.fake_label(i, 21843) for i in range(60)]
  assert sorted(set(labels)) == [0, 21843 // 2, 21842]
  assert labels.count(0) >= 25  # 25-shot, the largest of the paper's shot counts.


def test_shrink_keeps_data_recipe_and_scales_compute():
  config = load('mixer_l16_i21k.py')
  before = config.to_dict()
  changes = rehearse.shrink(config, num_devices=1)
  assert changes and config.total_steps == rehearse.STEPS
  for key in ('dataset', 'train_split', 'num_classes', 'loss', 'init_head_bias', 'optimizer',
              'lr', 'weight_decay', 'decay_type', 'model_dtype', 'mu_dtype', 'input'):
    assert config[key] == before[key] or config[key].to_dict() == before[key], key
  assert config.model.name == 'Mixer-L_16' and config.model.stoch_depth == 0.1
  assert config.image_size == 32 and config.batch_size == 16
  assert 1 <= config.warmup_steps < config.total_steps
  preempt = rehearse.preemption_step()
  for settings in config.evals.values():  # Once before the preemption, once at the end.
    assert settings.every_steps <= preempt and config.total_steps % settings.every_steps == 0
  assert preempt % config.checkpoint_every  # The SIGTERM save is off the schedule.
  assert set(config.evals.fewshot.datasets) == set(before['evals']['fewshot']['datasets'])


def test_shrink_keeps_the_resolution_factor_of_a_448_finetuning():
  config = load('finetune_imagenet.py:variant=L_16,res=448')
  rehearse.shrink(config)
  assert config.image_size == 2 * rehearse.IMAGE_SIZE
  assert config.model.tokens_mlp_dim == 4 * rehearse.MODEL['tokens_mlp_dim']  # App. C's K^2.
  assert config.init_from_image_size == 224  # use_fake_data / rehearse point it at 32 px.


def test_shrink_makes_the_batch_a_multiple_of_devices_and_accumulation():
  config = load('finetune_cifar10.py')
  config.grad_accum_steps = 8
  rehearse.shrink(config, num_devices=3)
  assert config.batch_size % 24 == 0 and config.batch_size >= rehearse.BATCH


def test_fake_tfds_datasets_have_the_real_features_and_class_counts(tmp_path):
  plan = fake_data.plan([('imagenet2012_real', 'validation', 24),
                         ('cars196:2.1.0', 'train', 24), ('cifar100', 'test', 24)])
  fake_data.write_all(plan.sizes, str(tmp_path), num_classes=1000, tfrecord_dir=str(tmp_path))
  real = datasets.get_source('imagenet2012_real', data_dir=str(tmp_path))
  assert real.num_classes == 1000 and real.has_real_labels
  assert real.num_examples('validation') == 24
  assert datasets.get_source('cars196:2.1.0', data_dir=str(tmp_path)).num_classes == 196
  cifar = datasets.get_source('cifar100', data_dir=str(tmp_path))
  assert cifar.num_classes == 100  # 'label', not the 20-class 'coarse_label'.
  labels = sorted({int(e['label'][0]) for e in cifar.read('test').as_numpy_iterator()})
  assert labels == [0, 50, 99]
  datasets.check_available('cars196:2.1.0', 'train', str(tmp_path))
  with pytest.raises(ValueError, match="split 'validation'"):
    datasets.check_available('cars196:2.1.0', 'validation', str(tmp_path))


def test_fake_imagenet21k_goes_through_its_builder_from_an_archive(tmp_path):
  fake_data.write_imagenet21k({'train': 8, 'validation': 4}, str(tmp_path))
  assert os.path.exists(tmp_path / 'downloads' / 'manual' / 'fall11_whole.tar')
  source = datasets.get_source('imagenet21k', data_dir=str(tmp_path))
  assert source.num_classes == imagenet21k.RELEASED_NUM_CLASSES
  assert source.num_examples('train') == 8 and source.num_examples('validation') == 4
  labels = {int(e['label'][0]) for e in source.read('train').as_numpy_iterator()}
  assert 21842 in labels and 0 in labels  # The released order's first and last synsets.


def test_fake_tfrecords_are_multilabel_jft_shards(tmp_path):
  pattern = str(tmp_path / '{split}-*.tfrecord')
  fake_data.write_tfrecord_dataset(pattern, {'train': 12}, num_classes=18291)
  assert len(glob.glob(str(tmp_path / 'train-*.tfrecord'))) == 2
  source = datasets.get_source(f'tfrecord:{pattern}', num_classes=18291)
  labels = [e['label'] for e in source.read('train').as_numpy_iterator()]
  assert len(labels) == 12 and max(len(label) for label in labels) > 1
  assert all(0 <= i < 18291 for label in labels for i in label)
  with pytest.raises(ValueError, match='-\\*.tfrecord'):
    fake_data.tfrecord_prefix('/data/jft/{split}.rec', 'train')


def test_a_used_workdir_is_refused_in_one_line(tmp_path):
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'metrics.jsonl').write_text('{}\n')
  result = subprocess.run(
      [sys.executable, '-m', 'mixer.rehearse', '--config=configs/digits.py',
       f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True,
      env=multidevice.subprocess_env(1), timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(f'error: {tmp_path}/run is not empty')


def test_a_broken_config_fails_the_rehearsal_with_the_cause(tmp_path):
  """A rehearsal can fail: here a few-shot set whose folder does not exist."""
  config = load('digits.py')
  config.evals.fewshot = evaluators.settings(
      'fewshot', every_steps=8, shots=(1,), num_seeds=1,
      datasets={'gone': (f'imagefolder:{tmp_path}/nowhere', 'train', 'test')})
  report = rehearse.rehearse(config, str(tmp_path / 'rehearsal'))
  assert not report['passed'] and not report['metrics']
  assert report['verdict'].startswith(f'REHEARSAL FAILED: {config.model.name}: ')
  assert 'nowhere' in report['verdict']


# Every config in configs/ (and the arguments that change its data: ReaL, minival,
# 448 px). Each is a full rehearsal: fake data, train, SIGTERM, resume, checks. The
# flagship config is rehearsed through the command line (the last test).
FLAGSHIP = 'mixer_l16_i21k.py'
REHEARSED = sorted(
    [os.path.basename(p) for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
     if os.path.basename(p) != FLAGSHIP] +
    ['finetune_imagenet.py:variant=L_16,res=448', 'mixer_b16_i1k.py:real,minival'])


def test_every_config_is_rehearsed():
  files = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))}
  assert files <= {spec.partition(':')[0] for spec in REHEARSED} | {FLAGSHIP}


@pytest.mark.slow
@pytest.mark.parametrize('spec', REHEARSED)
def test_rehearsal_passes(spec, tmp_path):
  config = load(spec)
  report = rehearse.rehearse(config, str(tmp_path), name=spec)
  assert report['passed'], rehearse.format_report(report)
  rehearsed = report['config']
  assert rehearsed.num_classes == config.num_classes and rehearsed.loss == config.loss
  for name, settings in config.evals.items():
    if settings.type == 'fewshot':
      for dataset in settings.datasets:
        for shots in settings.shots:
          assert np.isfinite(report['metrics'][f'{name}/{dataset}_{shots}shot'])
    else:
      assert 0.0 <= report['metrics'][f'{name}/accuracy'] <= 1.0
  rows = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl',
                                            encoding='utf-8')]
  steps = [r['step'] for r in rows if 'train/loss' in r]
  assert steps == sorted(set(steps)) and steps[-1] == rehearse.STEPS  # No repeated step.


@pytest.mark.slow
def test_command_line_rehearsal_of_the_flagship_config_exits_0(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'mixer.rehearse', f'--config=configs/{FLAGSHIP}',
       f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True,
      env=multidevice.subprocess_env(1), timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  last = result.stdout.strip().splitlines()[-1]
  assert last.startswith(f'REHEARSAL PASSED: configs/{FLAGSHIP}: ')
  assert 'imagenet21k (21843 classes)' in last and '7 few-shot set(s)' in last
  for name in ('fewshot/imagenet_5shot', 'fewshot/uc_merced_25shot', 'eval/accuracy'):
    assert f'  {name} ' in result.stdout
  report = json.loads((tmp_path / 'rehearsal.json').read_text())
  assert report['passed'] and report['preempted_at'] == rehearse.preemption_step()
