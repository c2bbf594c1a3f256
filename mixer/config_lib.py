"""The keys every training config has, their defaults, and the check that rejects unknown keys.

A config file in `configs/` calls `base_config()`, sets what its paper setting
needs, and returns it. `validate(config)` is called by the trainer (and by the
config tests) so that a misspelt key is an error naming the valid keys, not a
silently ignored setting.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

# Model fields a config may override; None keeps the `model.name` variant's value.
MODEL_SIZE_FIELDS = ('patch_size', 'hidden_dim', 'num_blocks', 'tokens_mlp_dim',
                     'channels_mlp_dim', 'dropout_rate', 'stoch_depth')


def base_config() -> ml_collections.ConfigDict:
  """All keys a training config has, with defaults for a small local run."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # --- Data (mixer.input_pipeline) ---
  # 'digits', any TFDS name ('imagenet2012', 'cifar10', ...), 'imagenet21k',
  # 'imagefolder:<root>' or 'tfrecord:<file glob>'.
  c.dataset = 'digits'
  c.train_split = 'train'
  c.eval_split = 'test'
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
      eval_pp='resize',        # 'resmall_crop' | 'resize_crop' | 'resize'.
      eval_crop_fraction=0.875,  # 224/256: crop size over resize size for *_crop.
  ))

  # --- Model (mixer.models.get_model) ---
  c.model = ml_collections.ConfigDict()
  c.model.name = 'Mixer-S_16'
  for field in MODEL_SIZE_FIELDS:
    c.model[field] = ml_collections.FieldReference(
        None, field_type=float if field in ('dropout_rate', 'stoch_depth') else int)
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
  ]

  # --- Loop ---
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.profile_steps = ml_collections.FieldReference(None, field_type=tuple)  # (start, stop)

  # --- Evaluators (mixer.evaluators) ---
  c.fewshot = ml_collections.ConfigDict(dict(
      every_steps=0,           # 0 = never.
      datasets={},             # name -> (dataset, train_split, test_split)
      shots=(1, 5, 10, 25),
      l2_reg=2.0 ** 10,
      num_seeds=3,
  ))
  c.real_eval = False          # Also report ImageNet ReaL (needs imagenet2012_real).
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
  trained from scratch. Optimiser, loss, augmentation and evaluators stay.
  """
  k = resolution_factor
  config.dataset = 'digits'
  config.train_split = 'train'
  config.eval_split = 'test'
  config.real_eval = False
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
  config.eval_every = 15
  config.checkpoint_every = 15
  if config.fewshot.every_steps:  # Still exercise the few-shot evaluator, on digits.
    config.fewshot.datasets = {'digits': ('digits', 'train', 'test')}
    config.fewshot.every_steps = 15
    config.fewshot.shots = (1, 5)
    config.fewshot.num_seeds = 1


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming any key that `base_config()` does not have."""
  _check_keys(config, base_config(), prefix='')


def _check_keys(config, reference, prefix):
  for key in config.keys():
    path = f'{prefix}{key}'
    if key not in reference:
      valid = ', '.join(sorted(reference.keys()))
      raise ValueError(f'Unknown config key {path!r}. Valid keys here: {valid}.')
    value, ref = config[key], reference[key]
    if isinstance(value, ml_collections.ConfigDict) and isinstance(ref, ml_collections.ConfigDict):
      if path == 'fewshot.datasets':  # A user-chosen name -> dataset map.
        continue
      _check_keys(value, ref, prefix=f'{path}.')
