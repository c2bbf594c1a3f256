r"""Fine-tunes a pre-trained Mixer (Google's released .npz or ours) on ImageNet-1k.

Recipe: paper (arXiv 2105.01601) §3 "Fine-tuning" and App. C, following the ViT
paper's setup (its Table 4): momentum SGD (0.9), batch 512, gradient clipping
at global norm 1, cosine decay after 500 linear warmup steps, no weight decay,
20,000 steps, Inception crop + flip and no other augmentation (App. A.2: mixup,
Polyak averaging and RandAugment gave no consistent gains). The head is replaced
by a zero-initialised 1000-class head. Momentum is kept in bfloat16 as in
vision_transformer's fine-tuning code.

Learning rate: the paper grid-searches lr in {0.003, 0.01, 0.03, 0.06} on the
1% of train held out ('train[99%:]'; run with --config.eval_split='train[99%:]'
to select) and reports the best; 0.03 is the default here. Sweep with `lr=`
below or --config.lr.

Resolution: 224, or `res=448` (any multiple K*224). At 448 the number of patches
grows from S=196 to S'=K^2*S=784 and, per App. C, the token-mixing MLPs are
widened K^2 times (D_S' = K^2 * D_S, set here in model.tokens_mlp_dim) and
initialised block-diagonally with K^2 copies of the 224px weights
(init_from_image_size=224). At 448 the evaluation uses Table 2's 'resize_crop';
at 224 Table 3's 'resmall_crop'.

Expected ImageNet validation top-1, from the ImageNet-21k pre-trained weights:
  variant=B_16            80.64 (ReaL 85.80)  paper Table 3
  variant=L_16            82.89 (ReaL 87.54)  paper Table 3
  variant=L_16,res=448    84.15 (ReaL 87.86)  paper Table 2 ('resize_crop' eval;
                          83.91 in Table 3 with 'resmall_crop')
and from our JFT runs (configs/mixer_jft.py, pass its .npz as init=...): B_16
80.00, L_16 (14 ep) 84.82, H_14 86.32 (Table 3). Assumes Google's released
`imagenet21k/` files are the paper's pre-trained models (they carry the 21843-
class i21k head); the paper's own fine-tuned weights were never released (timm
PR #651), so this run is the way to reproduce 80.64.

Launch on a TPU VM pod slice from your workstation (see launch/README.md; a
v3-32 is plenty):

  TPU_NAME=mixer ZONE=europe-west4-a ACCELERATOR=v3-32 \
    launch/tpu_pod.sh run --config=configs/finetune_imagenet.py:variant=L_16,res=448 \
      --workdir=gs://$BUCKET/mixer/ft_l16_448 --config.data_dir=gs://$BUCKET/tensorflow_datasets

which runs on every worker:

  MIXER_DISTRIBUTED=1 python -m mixer.main \
    --config=configs/finetune_imagenet.py:variant=L_16,res=448 \
    --workdir=gs://$BUCKET/mixer/ft_l16_448 --config.data_dir=gs://$BUCKET/tensorflow_datasets

Single host (e.g. 8 GPUs; accumulate 8 micro-batches of 64 like vision_transformer):

  python -m mixer.main --config=configs/finetune_imagenet.py --workdir=/tmp/ft_b16 \
    --config.init_from=/data/mixer_models/imagenet21k/Mixer-B_16.npz \
    --config.grad_accum_steps=8

Local debug run (tiny model trained from scratch on 'digits': no weights needed):

  python -m mixer.main --config=configs/finetune_imagenet.py:runlocal --workdir=/tmp/ft_local

Weights: init_from may be a local path or gs://mixer_models/... (read with
etils.epath; needs network access and credentials on every host). Or fetch
the released files first, on every host of a pod (in ~/mixer, where the run starts):

  launch/tpu_pod.sh ssh 'cd ~/mixer && mkdir -p mixer_models/imagenet21k && curl -sSf \
    -o mixer_models/imagenet21k/Mixer-B_16.npz \
    https://storage.googleapis.com/mixer_models/imagenet21k/Mixer-B_16.npz'

(Mixer-L_16.npz likewise for variant=L_16, ~876 MB.)

Arguments after the colon, comma-separated:
  variant=B_16|L_16|...   model (default B_16); any name of mixer.models.
  res=224|448      fine-tuning resolution (a multiple of 224).
  lr=0.03          peak learning rate (grid {0.003, 0.01, 0.03, 0.06}).
  init=PATH        released-format .npz, a local file (default
                   mixer_models/imagenet21k/Mixer-<variant>.npz, see "Weights").
  runlocal         shrink model, data, batch and steps for a laptop CPU (no init).

Steps: the paper's fixed 20,000 steps at batch 512 = 10.24M images, ~8.1 epochs
of 'train[:99%]' (1,268,355 images).
"""

from mixer import config_lib, models

_PRETRAIN_SIZE = 224  # Every released and paper pre-training run is at 224.
_BATCH = 512
# Local copies of gs://mixer_models/..., relative to the directory the run starts
# in (the repository root with launch/run_on_host.sh); see "Weights" above.
_WEIGHTS_DIR = 'mixer_models'




def get_config(arg=None):
  """ImageNet fine-tuning of `variant` at `res`; see the module docstring for `arg`."""
  arg = config_lib.parse_arg(arg, variant='B_16', res=_PRETRAIN_SIZE, lr=0.03, init='',
                             runlocal=False)
  name = f'Mixer-{arg.variant}'
  if name not in models.VARIANTS:
    raise ValueError(f'Unknown variant {arg.variant!r}; known: {sorted(models.VARIANTS)}.')
  # App. C's block-diagonal initialisation needs S' = K^2 * S: an integer factor.
  if arg.res % _PRETRAIN_SIZE:
    raise ValueError(f'res={arg.res} must be a multiple of {_PRETRAIN_SIZE} (paper App. C).')
  k = arg.res // _PRETRAIN_SIZE
  config = config_lib.base_config()

  config.dataset = 'imagenet2012'
  config.train_split = 'train[:99%]'  # 1% held out to pick lr, as in the paper.
  config.eval_split = 'validation'
  config.image_size = arg.res
  config.num_classes = 1000
  config.batch_size = _BATCH
  config.eval_batch_size = _BATCH
  config.input.shuffle_buffer = 50_000  # vision_transformer's fine-tuning default.
  config.input.inception_crop = True
  config.input.min_area = 0.05
  config.input.flip = True
  config.input.randaug_magnitude = 0
  config.input.mixup_p = 0.0
  config.input.eval_pp = 'resize_crop' if k > 1 else 'resmall_crop'

  config.model.name = name
  config.model.dropout_rate = 0.0
  config.model.stoch_depth = 0.0
  if k > 1:
    # App. C: D_S grows with the number of patches so the K^2 block-diagonal
    # copies of the pre-trained token MLP fit; the model is built at that size.
    # (At 224 it stays None: the variant's own D_S, even if model.name is
    # overridden on the command line.)
    config.model.tokens_mlp_dim = k * k * models.VARIANTS[name].tokens_mlp_dim
  config.model_dtype = 'bfloat16'
  config.init_from = arg.init or f'{_WEIGHTS_DIR}/imagenet21k/{name}.npz'
  config.init_from_image_size = _PRETRAIN_SIZE
  config.init_head = 'replace'  # 21843-class i21k head -> zero 1000-class head.
  config.init_head_bias = 0.0
  config.loss = 'softmax_xent'  # ImageNet-1k is single-label; VT fine-tunes with softmax.

  config.optimizer = 'momentum'
  config.momentum = 0.9
  config.mu_dtype = 'bfloat16'
  config.lr = arg.lr
  config.weight_decay = 0.0
  config.warmup_steps = 500
  config.total_steps = 20_000
  config.decay_type = 'cosine'
  config.grad_clip_norm = 1.0
  config.grad_accum_steps = 1  # 8 on a single 8-GPU host, as vision_transformer does.

  config.mesh = {'data': -1, 'fsdp': 1, 'model': 1}

  config.log_every = 50
  config.eval_every = 1_000
  config.checkpoint_every = 1_000

  if arg.runlocal:
    config_lib.shrink_for_local(config, resolution_factor=k)
  return config
