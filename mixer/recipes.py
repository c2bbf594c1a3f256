"""The paper's pre-training recipes as config builders (App. B / Table 4).

Each `configs/*.py` file is one paper setting: its docstring gives the launch
command and the result to expect, and its `get_config` calls the recipe here
with that setting's numbers (model, RandAugment magnitude, mixup), so the
shared recipe is written once.
"""

from __future__ import annotations

import ml_collections

from mixer import config_lib

IMAGENET_TRAIN_IMAGES = 1_268_355        # TFDS 'train[:99%]' of ImageNet-1k's 1,281,167.
IMAGENET21K_TRAIN_IMAGES = 14_197_122 * 99 // 100  # The i21k builder's 'train' (~99%).

# Few-shot linear probes on frozen pre-logits (paper §3 "Metrics"), as in
# big_vision's common_fewshot: name -> (TFDS name, train split, test split).
# The first 65k ImageNet train images hold >= 30 images of every class, enough
# for 25 shots. Drop entries whose TFDS data you have not prepared.
FEWSHOT_DATASETS = {
    'imagenet': ('imagenet2012', 'train[:65000]', 'validation'),
    'cifar100': ('cifar100', 'train', 'test'),
    'pets': ('oxford_iiit_pet', 'train', 'test'),
    'caltech': ('caltech101', 'train', 'test'),
    'dtd': ('dtd', 'train', 'test'),
}


def adam_pretraining(config, *, epochs: int, train_images: int, lr: float = 1e-3,
                     weight_decay: float = 0.1, batch_size: int = 4096):
  """Adam (0.9, 0.999), lr-coupled weight decay, 10k warmup, linear decay, clip 1, bf16.

  Defaults are the ImageNet/ImageNet-21k rows of Table 4; JFT uses lr 3e-3 or
  1e-3 with weight decay 0.03.
  """
  config.batch_size = batch_size
  config.eval_batch_size = batch_size
  config.optimizer = 'adam'
  config.lr = lr
  config.weight_decay = weight_decay
  config.warmup_steps = 10_000
  config.total_steps = epochs * train_images // batch_size
  config.decay_type = 'linear'
  config.linear_end = 1e-5
  config.grad_clip_norm = 1.0
  config.mu_dtype = 'bfloat16'  # Halves Adam's first moment, as big_vision does.
  config.model_dtype = 'bfloat16'  # Matmuls in bf16 on TPU; params stay float32.
  # Pure data parallelism: even H/14 params + grads + Adam state (bf16 mu) are
  # ~6 GB, inside a v3 core's 16 GB; shard them with --config.mesh.fsdp=N where
  # activations or smaller devices need the room.
  config.mesh = {'data': -1, 'fsdp': 1, 'model': 1}


def _extra_regularisation(config, *, randaug_magnitude: int, mixup_p: float):
  """Inception crop, flip, RandAugment(2, m), mixup, stochastic depth 0.1, no dropout."""
  # Encoded JPEGs (~110 kB each): 250k per host is ~27 GB of host RAM, fine on a
  # TPU VM; lower it on smaller hosts (big_vision#36: host OOM).
  config.input.shuffle_buffer = 250_000
  config.input.inception_crop = True
  config.input.flip = True
  config.input.randaug_layers = 2
  config.input.randaug_magnitude = randaug_magnitude
  config.input.mixup_p = mixup_p
  config.input.eval_pp = 'resmall_crop'  # Table 3's evaluation pre-processing.
  config.model.dropout_rate = 0.0
  config.model.stoch_depth = 0.1


def imagenet1k_from_scratch(model_name: str, arg: str | None) -> ml_collections.ConfigDict:
  """ImageNet-1k, 300 epochs, RandAugment 15, mixup 0.5 (Table 4 rows "ImNet").

  `arg`: `runlocal`, `minival` (evaluate on the held-out train[99%:]), `real`
  (also report ImageNet ReaL).
  """
  args = config_lib.parse_arg(arg, runlocal=False, minival=False, real=False)
  config = config_lib.base_config()
  config.dataset = 'imagenet2012'
  config.train_split = 'train[:99%]'  # The paper holds out 1% of train for tuning.
  config.eval_split = 'train[99%:]' if args.minival else 'validation'
  config.real_eval = args.real
  config.image_size = 224
  config.num_classes = 1000
  config.model.name = model_name
  _extra_regularisation(config, randaug_magnitude=15, mixup_p=0.5)
  # Sigmoid loss with the head bias at ~-log(1000) so the initial per-class
  # probabilities are ~1/1000 (big_vision's mlp_mixer_i1k recipe, 76.3% for B/16).
  config.loss = 'sigmoid_xent'
  config.init_head_bias = -6.9
  adam_pretraining(config, epochs=300, train_images=IMAGENET_TRAIN_IMAGES)
  config.log_every = 50
  config.eval_every = 2_500
  config.checkpoint_every = 1_000  # ~10 min of a v3-128: cheap insurance against preemption.
  if args.runlocal:
    config_lib.shrink_for_local(config)
  return config


def imagenet21k_pretraining(model_name: str, *, randaug_magnitude: int, mixup_p: float,
                            arg: str | None) -> ml_collections.ConfigDict:
  """ImageNet-21k, 300 epochs, sigmoid over 21843 classes (Table 4 rows "ImNet-21k").

  `arg`: `runlocal`.
  """
  args = config_lib.parse_arg(arg, runlocal=False)
  config = config_lib.base_config()
  config.dataset = 'imagenet21k'
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.image_size = 224
  config.num_classes = 21843  # The class count of Google's released i21k heads.
  config.model.name = model_name
  _extra_regularisation(config, randaug_magnitude=randaug_magnitude, mixup_p=mixup_p)
  # Head bias -10 (big_vision's i21k configs): tiny initial per-class
  # probabilities, so the first steps do not go into pushing 21,842 negatives down.
  config.loss = 'sigmoid_xent'
  config.init_head_bias = -10.0
  adam_pretraining(config, epochs=300, train_images=IMAGENET21K_TRAIN_IMAGES)
  config.log_every = 50
  config.eval_every = 10_000
  config.checkpoint_every = 2_000
  config.fewshot.datasets = FEWSHOT_DATASETS
  config.fewshot.every_steps = 25_000
  config.fewshot.shots = (1, 5, 10, 25)
  if args.runlocal:
    config_lib.shrink_for_local(config)
  return config
