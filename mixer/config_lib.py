"""The keys every training config has, their defaults, and the check that rejects unknown keys.

A config file in `configs/` calls `base_config()`, sets what its paper setting
needs, and returns it. `validate(config)` is called by the trainer (and by the
config tests) so that a misspelt key is an error naming the valid keys, not a
silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

import ml_collections

from mixer import models

# The MlpMixer fields a config may set under `config.model` (besides `name`),
# read off the model itself: the variant's sizes (`models.ARCHITECTURE_FIELDS`)
# and the training choices (dropout, stochastic depth, scan, remat, ...). None
# keeps the variant's (or the module's) default.
_FIELD_TYPES = {'int': int, 'float': float, 'bool': bool, 'str': str}
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(models.MlpMixer)
                     if f.name not in ('parent', 'name', 'num_classes', 'dtype'))
MODEL_DTYPES = ('float32', 'bfloat16')
INIT_HEADS = ('replace', 'keep')


def _model_field_type(name: str):
  annotation = {f.name: f.type for f in dataclasses.fields(models.MlpMixer)}[name]
  return _FIELD_TYPES[annotation if isinstance(annotation, str) else annotation.__name__]


def base_config() -> ml_collections.ConfigDict:
  """All keys a training config has, with defaults for a small local run."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # --- Data (mixer.input_pipeline) ---
  # 'digits', any TFDS name ('imagenet2012', 'cifar10', ...), 'imagenet21k',
  # 'imagefolder:<root>' or 'tfrecord:<file glob>'.
  c.dataset = 'digits'
  c.train_split = 'train'
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.image_size = 32
  c.num_classes = 10
  c.batch_size = 128           # Global, over all processes and devices.
  c.eval_batch_size = 128      # Global.
  c.input = ml_collections.ConfigDict(dict(
      shuffle_buffer=10_000,   # Examples (encoded) held for shuffling, per process.
      prefetch=2,              # Batches prepared ahead, per process.
      threadpool_size=0,       # tf.data private threadpool; 0 = TF's default.
      max_intra_op_parallelism=1,
      cache_raw=False,         # Cache the encoded split in host RAM (small datasets only).
      inception_crop=True,     # Random resized crop, `min_area`..100% of the area.
      min_area=0.05,
      flip=True,
      randaug_layers=2,
      randaug_magnitude=0,     # 0 = no RandAugment; the paper uses 10, 15 or 20.
      mixup_p=0.0,             # Mixup Beta(p, p) concentration; 0 = no mixup.
      # Undecodable training records are replaced by a blank example; above this
      # share of them (or if nothing decodes) the run stops: input_pipeline.
      max_bad_fraction=0.01,
  ))

  # --- Model (mixer.models.get_model) ---
  c.model = ml_collections.ConfigDict()
  c.model.name = 'Mixer-S_16'
  for field in MODEL_FIELDS:
    c.model[field] = ml_collections.FieldReference(None, field_type=_model_field_type(field))
  # Compute dtype ('bfloat16' for mixed precision); params always stay float32.
  c.model_dtype = 'float32'
  c.init_from = ml_collections.FieldReference(None, field_type=str)  # Released-format .npz.
  c.init_from_image_size = ml_collections.FieldReference(None, field_type=int)  # Default: 224.
  c.init_head = 'replace'      # 'replace' (zero head) or 'keep' (same label set).
  c.init_head_bias = 0.0       # E.g. -10 for sigmoid over 21843 classes (big_vision).

  # --- Optimisation (mixer.optim) ---
  c.loss = 'softmax_xent'      # 'softmax_xent' | 'sigmoid_xent'.
  c.optimizer = 'adam'         # 'adam' (pre-training) | 'momentum' (fine-tuning).
  c.lr = 1e-3
  c.weight_decay = 0.0         # Paper's lr-coupled value; see mixer/optim.py.
  c.warmup_steps = 100
  c.total_steps = 1000
  c.decay_type = 'linear'      # 'linear' | 'cosine'.
  c.linear_end = 1e-5
  c.grad_clip_norm = 1.0
  c.momentum = 0.9
  c.mu_dtype = ml_collections.FieldReference(None, field_type=str)  # 'bfloat16' halves Adam's mu.
  c.grad_accum_steps = 1

  # --- Mesh and sharding (mixer.sharding) ---
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  c.dcn_mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, model=1))  # Across slices.
  # Logical axis -> mesh axes; see mixer/sharding.py for what each does.
  c.sharding_rules = [
      ('batch', ('data', 'fsdp')),
      ('embed', 'fsdp'),
      ('channel_mlp', 'model'),
      ('token_mlp', 'model'),
      ('layers', None),        # The stacked block axis of scan_blocks: never split.
  ]

  # --- Loop ---
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.profile_steps = ml_collections.FieldReference(None, field_type=tuple)  # (start, stop)
  # JAX's persistent compilation cache (mixer.compile_cache): a restarted or
  # resumed run loads its compiled steps instead of compiling again. None:
  # `<workdir>/compile_cache` (local or gs://); 'off': no cache.
  c.compilation_cache_dir = ml_collections.FieldReference(None, field_type=str)

  # --- Evaluators (mixer.evaluators) ---
  # name -> settings; each runs every `every_steps` (0: only at the end) and at
  # the last step, and writes `<name>/<metric>`. Fields a setting leaves out
  # take the defaults of its type (mixer.evaluators.<type>.DEFAULTS).
  from mixer import evaluators  # pylint: disable=g-import-not-at-top  (imports tf)
  c.evals = ml_collections.ConfigDict()
  c.evals.eval = evaluators.settings('classification', every_steps=500, split='test',
                                     pp='resize')
  return c


def load_config_module(path: str):
  """Imports a config file (configs/*.py) by path; it defines `get_config(arg=None)`."""
  name = '_mixer_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config argument 'flag,key=value' (the text after ':' in --config).

  Values are typed by `defaults`; a bool default makes a flag (`runlocal` or
  `runlocal=false`). An unknown argument is an error listing the known ones.
  """
  args = dict(defaults)
  for token in filter(None, (t.strip() for t in (arg or '').split(','))):
    key, has_value, value = token.partition('=')
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}.')
    if isinstance(defaults[key], bool):
      if has_value and value.lower() not in ('true', 'false'):
        raise ValueError(f'Config argument {key!r} is a flag: write {key} or {key}=false.')
      args[key] = not has_value or value.lower() == 'true'
    elif not has_value:
      raise ValueError(f'Config argument {key!r} needs a value: {key}=...')
    else:
      args[key] = type(defaults[key])(value)
  return ml_collections.ConfigDict(args)


def shrink_for_local(config: ml_collections.ConfigDict, resolution_factor: int = 1) -> None:
  """The `runlocal` variant: same recipe, sized for a laptop CPU (in place).

  Tiny model (patch 4, width 32, 2 blocks), the embedded 'digits' data at
  16 px (times `resolution_factor`, keeping a fine-tuning config's K^2 token
  growth and its Appendix C widening of tokens_mlp_dim), batch 16, 30 steps,
  trained from scratch. Optimiser, loss, augmentation and evaluator types stay;
  every evaluator reads digits. (`python -m mixer.rehearse` is the other way
  round: it keeps every dataset, split and class count and shrinks only compute.)
  """
  k = resolution_factor
  config.dataset = 'digits'
  config.train_split = 'train'
  config.image_size = 16 * k
  config.num_classes = 10
  config.batch_size = 16
  config.eval_batch_size = 16
  config.input.shuffle_buffer = 1_000
  config.model.update(patch_size=4, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16 * k * k,
                      channels_mlp_dim=64)
  config.model_dtype = 'float32'  # bf16 matmuls are slow on most CPUs.
  config.init_from = None  # No released weights fit the tiny model.
  config.init_from_image_size = None
  if config.loss == 'sigmoid_xent':
    config.init_head_bias = -2.3  # ~-log(10): keeps the sigmoid prior of the full run.
  config.warmup_steps = 5
  config.total_steps = 30
  config.log_every = 5
  config.checkpoint_every = 15
  for name in list(config.evals.keys()):
    settings = config.evals[name]
    if settings.type == 'classification' and settings.get('label_field', 'label') != 'label':
      del config.evals[name]  # ReaL-style extra labels: digits has none.
      continue
    settings.every_steps = 15
    if settings.type == 'classification':
      settings.dataset = None
      settings.split = 'test'
    elif settings.type == 'fewshot':
      settings.datasets = {'digits': ('digits', 'train', 'test')}
      settings.shots = (1, 5)
      settings.num_seeds = 1


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first unknown key or bad value, with the fix.

  Checked here, once, before anything is built: unknown keys (listing the valid
  ones), every enum, positive intervals and sizes, a finite positive lr,
  warmup below total_steps (except in evaluate-only mode, total_steps=0),
  accumulation dividing the batch, and every evaluator's type and fields.
  """
  _check_keys(config, base_config(), prefix='')

  def fail(key, value, fix):
    raise ValueError(f'config.{key}={value!r}: {fix}')

  def check_enum(key, value, choices):
    if value not in choices:
      fail(key, value, f'use one of {list(choices)}.')

  from mixer import losses, optim  # pylint: disable=g-import-not-at-top  (jax-heavy)
  check_enum('model.name', config.model.name, list(models.VARIANTS))
  check_enum('loss', config.loss, list(losses.LOSSES))
  check_enum('optimizer', config.optimizer, optim.OPTIMIZERS)
  check_enum('decay_type', config.decay_type, optim.DECAY_TYPES)
  check_enum('mu_dtype', config.mu_dtype, optim.MU_DTYPES)
  check_enum('model_dtype', config.model_dtype, MODEL_DTYPES)
  if config.model.residual_dtype is not None:
    check_enum('model.residual_dtype', config.model.residual_dtype, models.RESIDUAL_DTYPES)
  check_enum('init_head', config.init_head, INIT_HEADS)
  for key in ('log_every', 'checkpoint_every', 'keep_checkpoints', 'batch_size',
              'eval_batch_size', 'grad_accum_steps', 'image_size', 'num_classes'):
    if int(config[key]) < 1:
      fail(key, config[key], 'it must be at least 1.')
  if not (math.isfinite(float(config.lr)) and config.lr > 0):
    fail('lr', config.lr, 'the learning rate must be a finite number above 0, e.g. 1e-3.')
  if not 0.0 <= config.input.max_bad_fraction <= 1.0:
    fail('input.max_bad_fraction', config.input.max_bad_fraction,
         'it is the share of undecodable training records tolerated, in [0, 1] (default 0.01).')
  if config.total_steps < 0 or config.warmup_steps < 0:
    fail('total_steps' if config.total_steps < 0 else 'warmup_steps',
         min(config.total_steps, config.warmup_steps), 'steps cannot be negative.')
  if config.total_steps and config.warmup_steps >= config.total_steps:
    fail('warmup_steps', config.warmup_steps,
         f'it must be below config.total_steps={config.total_steps}; lower the warmup or '
         'train longer (total_steps=0 only evaluates).')
  if config.batch_size % config.grad_accum_steps:
    fail('grad_accum_steps', config.grad_accum_steps,
         f'it must divide config.batch_size={config.batch_size} into equal micro-batches.')
  if config.image_size % (config.model.patch_size or models.VARIANTS[config.model.name].patch_size):
    fail('image_size', config.image_size, 'it must be a multiple of the patch size.')
  if not config.evals:
    raise ValueError('config.evals is empty: keep at least one evaluator (e.g. the default '
                     "'eval' classification on the test split).")
  from mixer import evaluators  # pylint: disable=g-import-not-at-top  (tf-heavy)
  for name, settings in config.evals.items():
    evaluators.check_settings(name, settings)


def _check_keys(config, reference, prefix):
  for key in config.keys():
    path = f'{prefix}{key}'
    if path == 'evals':  # User-chosen evaluator names; evaluators.check_settings checks them.
      continue
    if key not in reference:
      valid = ', '.join(sorted(reference.keys()))
      raise ValueError(f'Unknown config key {path!r}. Valid keys here: {valid}.')
    value, ref = config[key], reference[key]
    if isinstance(value, ml_collections.ConfigDict) and isinstance(ref, ml_collections.ConfigDict):
      _check_keys(value, ref, prefix=f'{path}.')
