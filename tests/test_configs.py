"""Every config in configs/ (and each documented variant) builds, validates and describes a model.

Configs are loaded by path, as `ml_collections.config_flags` loads them for
`python -m mixer.main --config=configs/x.py:arg`, so a config that only works
when imported some other way fails here. big_vision shipped configs whose
`runlocal` branch set keys nothing read; building every variant through
`config_lib.validate` is the guard against that.
"""

import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from mixer import config_lib, evaluators, models, trainer_setup

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / 'configs'
CONFIG_FILES = sorted(CONFIG_DIR.glob('*.py'))

_JFT_VARIANTS = ('S_32', 'S_16', 'B_32', 'B_16', 'L_32', 'L_16', 'H_14')

# The args each config documents. Files not listed (e.g. configs/digits.py) are
# still built with no arg, and with 'runlocal' when their docstring offers it.
DOCUMENTED_ARGS = {
    'mixer_b16_i1k.py': (None, 'runlocal', 'minival', 'real', 'minival,real,runlocal'),
    'mixer_l16_i1k.py': (None, 'runlocal', 'minival', 'real'),
    'mixer_b16_i21k.py': (None, 'runlocal'),
    'mixer_l16_i21k.py': (None, 'runlocal'),
    'mixer_jft.py': ((None, 'runlocal', 'variant=L_16,epochs=14',
                      'tfrecords=gs://bucket/jft/,variant=H_14')
                     + tuple(f'variant={v}' for v in _JFT_VARIANTS)
                     + tuple(f'variant={v},runlocal' for v in _JFT_VARIANTS)),
    'finetune_imagenet.py': (None, 'runlocal', 'res=448', 'res=448,runlocal',
                             'variant=L_16', 'variant=L_16,res=448', 'lr=0.01',
                             'init=/tmp/Mixer-B_16.npz', 'variant=L_16,res=448,runlocal'),
    'finetune_cifar10.py': (None, 'runlocal', 'variant=L_16', 'lr=0.06,runlocal'),
    # Every task of configs/transfer.py is built in tests/test_transfer.py.
    'transfer.py': (None, 'runlocal', 'task=imagenet,res=448', 'task=pets,variant=L_16',
                    'task=flowers,minival,runlocal'),
}

# Head-less parameter counts at 224 (paper Table 1; vision_transformer's models_test).
TABLE1_PARAMS = {
    'Mixer-S_32': 18_591_624, 'Mixer-S_16': 18_015_264, 'Mixer-B_32': 59_524_428,
    'Mixer-B_16': 59_111_472, 'Mixer-L_32': 205_914_264, 'Mixer-L_16': 207_171_168,
    'Mixer-H_14': 431_069_952,
}

_TFDS_NAMES = ('imagenet2012', 'imagenet2012_real', 'cifar10', 'cifar100',
               'oxford_iiit_pet', 'oxford_flowers102')


def load_module(path):
  return config_lib.load_config_module(str(path))


def args_for(path):
  if path.name in DOCUMENTED_ARGS:
    return DOCUMENTED_ARGS[path.name]
  doc = load_module(path).__doc__ or ''
  return (None, 'runlocal') if ':runlocal' in doc else (None,)


CASES = [pytest.param(path, arg, id=f'{path.stem}:{arg}' if arg else path.stem)
         for path in CONFIG_FILES for arg in args_for(path)]


def build(path, arg):
  config = load_module(path).get_config(arg)
  assert isinstance(config, ml_collections.ConfigDict)
  return config


def size_overrides(config):
  return {f: config.model[f] for f in models.ARCHITECTURE_FIELDS if config.model[f] is not None}


def make_model(config):
  return trainer_setup.build_model(config)


def test_configs_are_found():
  names = {p.name for p in CONFIG_FILES}
  assert set(DOCUMENTED_ARGS) <= names, f'missing configs: {set(DOCUMENTED_ARGS) - names}'


@pytest.mark.parametrize('path, arg', CASES)
def test_config_is_valid(path, arg):
  config = build(path, arg)
  config_lib.validate(config)

  # validate() checked the enums, intervals and evaluator settings; what it
  # cannot know is that a paper config trains and evaluates.
  assert 0 <= config.warmup_steps < config.total_steps
  assert any(e.type == 'classification' for e in config.evals.values())
  if config.optimizer == 'momentum':
    assert config.weight_decay == 0.0, 'the paper fine-tunes without weight decay'
  dataset = config.dataset
  if dataset.startswith('tfrecord:'):
    assert '{split}' in dataset, 'a tfrecord glob needs a {split} placeholder'
  elif not dataset.startswith('imagefolder:'):
    assert dataset in _TFDS_NAMES + ('digits', 'imagenet21k'), dataset
  for evaluator in config.evals.values():
    if evaluator.type == 'fewshot' and 'runlocal' not in (arg or ''):
      assert evaluator.every_steps == 25_000  # big_vision's cadence, as the docstrings say.


@pytest.mark.parametrize('path, arg', CASES)
def test_config_builds_its_model(path, arg):
  config = build(path, arg)
  model = make_model(config)
  assert config.image_size % model.patch_size == 0
  images = jax.ShapeDtypeStruct((2, config.image_size, config.image_size, 3), jnp.float32)
  # eval_shape: the full-size models are traced, never allocated.
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  params = nn.unbox(variables['params'])  # Drop the logical-axis boxes.
  assert params['head']['kernel'].shape == (model.hidden_dim, config.num_classes)
  if config.image_size == 224 and not size_overrides(config):
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    head = model.hidden_dim * config.num_classes + config.num_classes
    assert total - head == TABLE1_PARAMS[config.model.name]


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.stem)
def test_runlocal_runs_a_step(path):
  """The tiny runlocal model does a real forward pass on a CPU in a blink."""
  if 'runlocal' not in args_for(path):
    pytest.skip('no runlocal variant')
  config = build(path, 'runlocal')
  assert config.dataset == 'digits'
  if path.name in DOCUMENTED_ARGS:  # The paper configs promise laptop-sized runs.
    assert config.batch_size <= 16 and config.total_steps <= 100
  model = make_model(config)
  images = jnp.zeros((2, config.image_size, config.image_size, 3))
  variables = model.init(jax.random.key(0), images)
  logits = model.apply(variables, images, train=True, rngs={'dropout': jax.random.key(1)})
  assert logits.shape == (2, config.num_classes)


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.stem)
def test_unknown_keys_are_rejected(path):
  config = build(path, None)
  config.lerning_rate = 1
  with pytest.raises(ValueError, match=r"'lerning_rate'.*Valid keys.*\blr\b"):
    config_lib.validate(config)

  config = build(path, None)
  config.input.foo = 1
  with pytest.raises(ValueError, match=r"'input\.foo'.*Valid keys.*shuffle_buffer"):
    config_lib.validate(config)


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.stem)
def test_docstring_has_launch_command(path):
  doc = load_module(path).__doc__ or ''
  assert 'python -m mixer.main' in doc
  assert path.name in doc, f'{path.name} docstring should name its own file in the command'


@pytest.mark.parametrize('path', [p for p in CONFIG_FILES if p.name in DOCUMENTED_ARGS],
                         ids=lambda p: p.stem)
def test_bad_args_are_rejected(path):
  with pytest.raises(ValueError, match='Unknown config argument'):
    build(path, 'runlcoal')


def _config(name, arg=None):
  return build(CONFIG_DIR / name, arg)


def test_step_arithmetic():
  # 300 epochs of TFDS 'train[:99%]' (1,268,355 of 1,281,167 images) at batch 4096.
  assert _config('mixer_b16_i1k.py').total_steps == 300 * 1_268_355 // 4096 == 92_897
  # 300 epochs of ImageNet-21k's 'train': ~99% of the 14,197,122 fall11 images.
  assert _config('mixer_l16_i21k.py').total_steps == 300 * 14_055_150 // 4096 == 1_029_429
  # Epochs of JFT-300M's 303M images at batch 4096 (paper Table 4).
  jft = {v: _config('mixer_jft.py', f'variant={v}').total_steps for v in _JFT_VARIANTS}
  assert jft['S_16'] == 5 * 303_000_000 // 4096
  assert jft['B_16'] == 7 * 303_000_000 // 4096 == 517_822
  assert jft['H_14'] == 14 * 303_000_000 // 4096
  assert _config('mixer_jft.py', 'variant=L_16,epochs=14').total_steps == jft['H_14']


def test_paper_recipes():
  b_i21k, l_i21k = _config('mixer_b16_i21k.py'), _config('mixer_l16_i21k.py')
  assert (b_i21k.input.randaug_magnitude, b_i21k.input.mixup_p) == (10, 0.2)
  assert (l_i21k.input.randaug_magnitude, l_i21k.input.mixup_p) == (20, 0.5)
  for config in (b_i21k, l_i21k, _config('mixer_b16_i1k.py'), _config('mixer_l16_i1k.py')):
    assert (config.lr, config.weight_decay, config.warmup_steps) == (1e-3, 0.1, 10_000)
    assert (config.batch_size, config.model.stoch_depth, config.grad_clip_norm) == (4096, 0.1, 1.0)
  assert _config('mixer_jft.py', 'variant=S_32').lr == 3e-3
  assert _config('mixer_jft.py', 'variant=H_14').lr == 1e-3
  assert _config('mixer_jft.py').weight_decay == 0.03
  with pytest.raises(ValueError, match='Unknown JFT variant'):
    _config('mixer_jft.py', 'variant=S_8')


def test_finetune_at_448_widens_token_mlp():
  """App. C: 224 -> 448 is K=2, so S and D_S grow 4x and the init is block-diagonal."""
  config = _config('finetune_imagenet.py', 'variant=L_16,res=448')
  assert (config.image_size, config.init_from_image_size) == (448, 224)
  assert config.model.tokens_mlp_dim == 4 * 512
  assert config.evals.val.pp == config.evals.test.pp == 'resize_crop'
  assert config.init_from.endswith('imagenet21k/Mixer-L_16.npz')
  assert config.init_head == 'replace'
  assert _config('finetune_imagenet.py').model.tokens_mlp_dim is None
  with pytest.raises(ValueError, match='multiple of 224'):
    _config('finetune_imagenet.py', 'res=384')


def _digits(**overrides):
  config = _config('digits.py')
  config.update(overrides)
  return config


@pytest.mark.parametrize('overrides, match', [
    ({'log_every': 0}, 'log_every'),
    ({'checkpoint_every': 0}, 'checkpoint_every'),
    ({'lr': -1e-3}, 'lr'),
    ({'lr': float('nan')}, 'lr'),
    ({'warmup_steps': 300}, 'warmup_steps'),
    ({'batch_size': 128, 'grad_accum_steps': 3}, 'grad_accum_steps'),
    ({'loss': 'hinge'}, 'loss'),
    ({'optimizer': 'lamb'}, 'optimizer'),
    ({'decay_type': 'rsqrt'}, 'decay_type'),
    ({'model_dtype': 'float16'}, 'model_dtype'),
    ({'model': {'residual_dtype': 'float16'}},
     r"config.model.residual_dtype='float16': use one of \['float32', 'bfloat16'\]"),
    ({'image_size': 30}, 'patch size'),
])
def test_validate_rejects_bad_values(overrides, match):
  with pytest.raises(ValueError, match=match):
    config_lib.validate(_digits(**overrides))


def test_validate_checks_every_evaluator():
  config = _digits()
  config.evals.eval.every_steps = -1
  with pytest.raises(ValueError, match='config.evals.eval.every_steps'):
    config_lib.validate(config)
  config = _digits()
  config.evals.eval.pp = 'center'
  with pytest.raises(ValueError, match='config.evals.eval.pp'):
    config_lib.validate(config)
  config = _digits()
  config.evals.probe = {'type': 'knn'}
  with pytest.raises(ValueError, match=r"config.evals.probe.type='knn'.*classification"):
    config_lib.validate(config)
  config = _digits()
  config.evals.few = {'type': 'fewshot', 'datasets': {'d': ('digits', 'train', 'test')},
                      'shot': 5}
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['shot'\]"):
    config_lib.validate(config)
  with pytest.raises(ValueError, match='fields'):
    evaluators.settings('fewshot', shot=5)


def test_evaluate_only_mode_is_valid():
  config_lib.validate(_digits(total_steps=0))


def test_evaluator_types_describe_themselves():
  for name, module in evaluators.TYPES.items():
    settings = evaluators.settings(name)
    assert settings.type == name and 'every_steps' in settings
    assert set(settings) == set(module.DEFAULTS) | {'type'}
