"""The paper's recipes as config builders: pre-training (App. B / Table 4) and SGD fine-tuning.

Each `configs/*.py` file is one paper setting: its docstring gives the launch
command and the result to expect, and its `get_config` calls the recipe here
with that setting's numbers (model, RandAugment magnitude, mixup, dataset), so
each recipe is written once.

Where a choice is not in the paper, the recipes follow the authors' own code,
big_vision's `configs/mlp_mixer_i1k.py` and `configs/common_fewshot.py`:
float32 Adam moments, `linear_end` 1e-5 relative to the peak, few-shot on
caltech/cars/cifar100/dtd/pets/uc_merced (+ ImageNet, the paper's transfer
proxy) with `resize(256)|central_crop(224)`, every 25k steps.

Weights for fine-tuning (`sgd_finetuning`): `init_from` may be a local path or
gs://mixer_models/... (read with etils.epath; needs network access and
credentials on every host). Or fetch the released files first, on every host of
a pod (in ~/mixer, where the run starts), e.g.

  launch/tpu_pod.sh ssh 'cd ~/mixer && mkdir -p mixer_models/imagenet21k && curl -sSf \
    -o mixer_models/imagenet21k/Mixer-B_16.npz \
    https://storage.googleapis.com/mixer_models/imagenet21k/Mixer-B_16.npz'

(Mixer-L_16.npz likewise, ~876 MB.) The default `init` of the fine-tuning
configs is that local copy, `mixer_models/imagenet21k/Mixer-<variant>.npz`.
"""

from __future__ import annotations

import ml_collections

from mixer import config_lib, evaluators, models

PRETRAIN_SIZE = 224  # Every released and paper pre-training run is at 224.
IMAGENET_TRAIN_IMAGES = 1_268_355        # TFDS 'train[:99%]' of ImageNet-1k's 1,281,167.
IMAGENET21K_TRAIN_IMAGES = 14_197_122 * 99 // 100  # The i21k builder's 'train' (~99%).

# Few-shot linear probes on frozen pre-logits (paper §3 "Metrics"): big_vision's
# configs/common_fewshot.py, name -> (TFDS name, train split, test split), plus
# ImageNet (commented out there because it needs a manual download; the paper's
# transfer proxy is ImageNet 5-shot). The first 65k ImageNet train images hold
# >= 30 images of every class, enough for 25 shots. Drop entries whose TFDS data
# you have not prepared (the run checks them all at start-up).
FEWSHOT_DATASETS = {
    'caltech': ('caltech101', 'train', 'test'),
    'cars': ('cars196:2.1.0', 'train', 'test'),
    'cifar100': ('cifar100', 'train', 'test'),
    'dtd': ('dtd', 'train', 'test'),
    'imagenet': ('imagenet2012', 'train[:65000]', 'validation'),
    'pets': ('oxford_iiit_pet', 'train', 'test'),
    'uc_merced': ('uc_merced', 'train[:1000]', 'train[1000:]'),
}
FEWSHOT_EVERY_STEPS = 25_000  # big_vision's get_fewshot_lsr default.
_WEIGHTS_DIR = 'mixer_models'  # Local copies of gs://mixer_models/..., see the docstring.


def _scanned_blocks(config):
  """Blocks under nn.scan with remat of everything but the matmul outputs ('dots').

  Measured with mixer.benchmarks (docs/benchmarks.md): scanning compiles the
  L/16 step for v3-256 in 0.35-0.42 of the unscanned CPU time (18.6 vs 48-54
  CPU-s; 0.28-0.33 in wall time on 2 cores) and H/14 on one CPU device in
  0.27-0.35; the persistent cache then restarts it in 0.11 of a cold compile.
  Scanning alone keeps every block's residuals stacked (7.7 GiB per v3 core for
  L/16), so it goes with remat='dots' (6.1 GiB). Released `.npz` files keep
  their per-block layout (mixer.param_layout converts at load and save).
  """
  config.model.scan_blocks = True
  config.model.remat = 'dots'


def fewshot_eval(every_steps: int = FEWSHOT_EVERY_STEPS) -> ml_collections.ConfigDict:
  """big_vision's few-shot evaluator settings (resize 256 + central crop 224 at 224 px)."""
  return evaluators.settings('fewshot', every_steps=every_steps, datasets=FEWSHOT_DATASETS,
                             pp='resize_crop', crop_fraction=224 / 256)


def classification_eval(split: str, every_steps: int, pp: str = 'resmall_crop',
                        **kw) -> ml_collections.ConfigDict:
  """A top-1/top-5/loss evaluator; 'resmall_crop' is Table 3's eval preprocessing."""
  return evaluators.settings('classification', split=split, every_steps=every_steps, pp=pp,
                             crop_fraction=224 / 256, **kw)


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
  config.linear_end = 1e-5  # Relative to the peak (big_vision's schedule).
  config.grad_clip_norm = 1.0
  # Adam's moments in float32, as big_vision's Mixer config (its default
  # scale_by_adam). `--config.mu_dtype=bfloat16` halves the first moment.
  config.mu_dtype = 'float32'
  # Mixed precision: MLP matmuls in bf16, the residual stream, LayerNorm
  # statistics, pre-logits and logits in float32 (mixer.models; a bf16 sigmoid
  # over 21843 classes starting at -10 is coarse). big_vision keeps every
  # activation in float32 instead. Measured with mixer.compile_check, L/16 on
  # ImageNet-21k for v3-128 (batch 4096, 32 per core, float32 Adam moments):
  #   all bf16 (before)          5.22 GiB/core, 32.3 GB accessed/step, 8.63 TFLOP/core
  #   this (f32 residual)        5.83 GiB/core, 38.6 GB accessed/step, 8.63 TFLOP/core
  #   model_dtype='float32'      7.77 GiB/core, 50.7 GB accessed/step, 8.60 TFLOP/core
  # All fit a 16 GiB v3 core and all are compute-bound on a v3 roofline (0.14 s
  # of bf16 FLOPs against 0.07/0.09/0.11 s of HBM traffic), so this keeps
  # big_vision's float32 numerics where they matter at 25% less memory than
  # all-float32. Error against the float32 model: 0.31% (B/16) vs 0.46% all-bf16.
  # (Estimates from XLA's cost analysis; no TPU step time was measured.)
  config.model_dtype = 'bfloat16'
  _scanned_blocks(config)
  # Pure data parallelism, so that the same config runs on any device count:
  # even H/14 params + grads + Adam state (bf16 mu) are ~6 GB, inside a v3
  # core's 16 GB. On a slice of 16 cores or more launch with
  # --config.mesh.fsdp=16: compiled for v3-256, the L/16 step then moves 28%
  # fewer HBM bytes per core (each core updates 1/16 of the params instead of
  # all of them) for 34% more ICI bytes (docs/benchmarks.md, "Sharding a pod
  # run"; compile-only figures, no TPU step was timed).
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
  config.checkpoint_every = 1_000  # ~10 min of a v3-128: cheap insurance against preemption.
  # big_vision's mlp_mixer_i1k evals: validation (or minival), ReaL, few-shot.
  config.evals.eval = classification_eval('train[99%:]' if args.minival else 'validation',
                                          every_steps=2_500)
  if args.real:
    config.evals.real = classification_eval('validation', every_steps=2_500,
                                            dataset='imagenet2012_real',
                                            label_field='real_label')
  config.evals.fewshot = fewshot_eval()
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
  config.checkpoint_every = 2_000
  config.evals.eval = classification_eval('validation', every_steps=10_000)
  config.evals.fewshot = fewshot_eval()
  if args.runlocal:
    config_lib.shrink_for_local(config)
  return config


def sgd_finetuning(config: ml_collections.ConfigDict, *, variant: str, res: int, lr: float,
                   init: str, total_steps: int, num_classes: int,
                   warmup_steps: int = 500, batch_size: int = 512) -> ml_collections.ConfigDict:
  """The paper's fine-tuning recipe (§3 "Fine-tuning", App. C), in place on `config`.

  Momentum SGD (0.9, bfloat16 momentum as vision_transformer), batch 512,
  gradient clipping at global norm 1, cosine decay after `warmup_steps` linear
  warmup steps, no weight decay, Inception crop + flip and no other
  augmentation (App. A.2: mixup, Polyak averaging and RandAugment gave no
  consistent gains), the head replaced by a zero-initialised `num_classes` head,
  softmax cross-entropy.

  Resolution `res` is any multiple K*224 of the pre-training resolution. At
  K > 1 the number of patches grows from S to K^2*S and, per App. C, the
  token-mixing MLPs are widened K^2 times (set here in model.tokens_mlp_dim)
  and initialised block-diagonally with K^2 copies of the 224px weights
  (`init_from_image_size=224`, `mixer.surgery.adapt_to_resolution`).

  The caller sets the data (dataset, splits, evals) and cadences.
  """
  name = f'Mixer-{variant}'
  if name not in models.VARIANTS:
    raise ValueError(f'Unknown variant {variant!r}; known: '
                     f'{sorted(n[len("Mixer-"):] for n in models.VARIANTS)}.')
  if res % PRETRAIN_SIZE:  # App. C's block-diagonal initialisation needs an integer K.
    raise ValueError(f'res={res} must be a multiple of {PRETRAIN_SIZE} (paper App. C).')
  k = res // PRETRAIN_SIZE
  config.image_size = res
  config.num_classes = num_classes
  config.batch_size = batch_size
  config.eval_batch_size = batch_size
  config.input.inception_crop = True
  config.input.min_area = 0.05
  config.input.flip = True
  config.input.randaug_magnitude = 0
  config.input.mixup_p = 0.0

  config.model.name = name
  config.model.dropout_rate = 0.0
  config.model.stoch_depth = 0.0
  if k > 1:
    # App. C: D_S grows with the number of patches so the K^2 block-diagonal
    # copies of the pre-trained token MLP fit; the model is built at that size.
    # (At 224 it stays None: the variant's own D_S.)
    config.model.tokens_mlp_dim = k * k * models.VARIANTS[name].tokens_mlp_dim
  config.model_dtype = 'bfloat16'
  _scanned_blocks(config)
  config.init_from = init or f'{_WEIGHTS_DIR}/imagenet21k/{name}.npz'
  config.init_from_image_size = PRETRAIN_SIZE
  config.init_head = 'replace'  # E.g. the 21843-class i21k head -> a zero new head.
  config.init_head_bias = 0.0
  config.loss = 'softmax_xent'

  config.optimizer = 'momentum'
  config.momentum = 0.9
  config.mu_dtype = 'bfloat16'
  config.lr = lr
  config.weight_decay = 0.0
  config.warmup_steps = warmup_steps
  config.total_steps = total_steps
  config.decay_type = 'cosine'
  config.grad_clip_norm = 1.0
  config.grad_accum_steps = 1  # 8 on a single 8-GPU host, as vision_transformer does.
  config.mesh = {'data': -1, 'fsdp': 1, 'model': 1}
  return config
