r"""Fine-tunes a pre-trained Mixer (Google's released .npz or ours) on CIFAR-10 at 224.

Recipe: paper (arXiv 2105.01601) §3 "Fine-tuning" and App. C, following the ViT
paper's setup (its Table 4) and vision_transformer's `mixer_base16_cifar10.py`:
momentum SGD (0.9, bfloat16 momentum), batch 512, gradient clipping at global
norm 1, cosine decay after 500 linear warmup steps, no weight decay, 10,000
steps, images upsampled to 224 with Inception crop + flip for training and a
plain resize for evaluation. The head is replaced by a zero-initialised 10-class
head. 2% of train is held out ('train[98%:]') to pick the learning rate.

Learning rate: App. C's CIFAR grid is lr in {0.003, 0.01, 0.03, 0.06} (the ViT
grid with 0.001 swapped for 0.06); 0.03 is the default here (and
vision_transformer's). Sweep with `lr=` below or --config.lr.

Expected CIFAR-10 test top-1 at 224 from the released ImageNet-21k weights
(vision_transformer README "Expected Mixer results", lr 0.03, 10k steps):
  variant=B_16   96.82%  (9.6 h on 4x V100)
  variant=L_16   98.34%  (10.0 h on 4x V100)
and 96.72% / 96.59% from the released ImageNet-1k weights
(init=.../imagenet1k/Mixer-B_16.npz or Mixer-L_16.npz).

Launch on a TPU VM (a single v3-8 host is enough; see launch/README.md):

  TPU_NAME=mixer ZONE=europe-west4-a ACCELERATOR=v3-8 \
    launch/tpu_pod.sh run --config=configs/finetune_cifar10.py:variant=B_16 \
      --workdir=gs://$BUCKET/mixer/ft_cifar10_b16 --config.data_dir=gs://$BUCKET/tensorflow_datasets

which runs on the worker:

  MIXER_DISTRIBUTED=1 python -m mixer.main --config=configs/finetune_cifar10.py:variant=B_16 \
    --workdir=gs://$BUCKET/mixer/ft_cifar10_b16 --config.data_dir=gs://$BUCKET/tensorflow_datasets

Single GPU host (vision_transformer accumulates 8 micro-batches of 64):

  python -m mixer.main --config=configs/finetune_cifar10.py --workdir=/tmp/ft_cifar10 \
    --config.init_from=/data/mixer_models/imagenet21k/Mixer-B_16.npz --config.grad_accum_steps=8

Local debug run (tiny model trained from scratch on 'digits': no weights needed):

  python -m mixer.main --config=configs/finetune_cifar10.py:runlocal --workdir=/tmp/ft_local

Weights: init_from may be a local path or gs://mixer_models/... (read with
etils.epath; needs network access and credentials on every host). Or fetch
the released files first, on every host of a pod (in ~/mixer, where the run starts):

  launch/tpu_pod.sh ssh 'cd ~/mixer && mkdir -p mixer_models/imagenet21k && curl -sSf \
    -o mixer_models/imagenet21k/Mixer-B_16.npz \
    https://storage.googleapis.com/mixer_models/imagenet21k/Mixer-B_16.npz'

(Mixer-L_16.npz likewise for variant=L_16, ~876 MB.)

Arguments after the colon, comma-separated:
  variant=B_16|L_16|...   model (default B_16); any name of mixer.models.
  lr=0.03          peak learning rate (grid {0.003, 0.01, 0.03, 0.06}).
  init=PATH        released-format .npz, a local file (default
                   mixer_models/imagenet21k/Mixer-<variant>.npz, see "Weights").
  runlocal         shrink model, data, batch and steps for a laptop CPU (no init).

Steps: the paper's fixed 10,000 steps at batch 512 = 5.12M images, ~104 epochs
of 'train[:98%]' (49,000 images).
"""

from mixer import config_lib, models

_BATCH = 512
# Local copies of gs://mixer_models/..., relative to the directory the run starts
# in (the repository root with launch/run_on_host.sh); see "Weights" above.
_WEIGHTS_DIR = 'mixer_models'




def get_config(arg=None):
  """CIFAR-10 fine-tuning of `variant` at 224; see the module docstring for `arg`."""
  arg = config_lib.parse_arg(arg, variant='B_16', lr=0.03, init='', runlocal=False)
  name = f'Mixer-{arg.variant}'
  if name not in models.VARIANTS:
    raise ValueError(f'Unknown variant {arg.variant!r}; known: {sorted(models.VARIANTS)}.')
  config = config_lib.base_config()

  config.dataset = 'cifar10'
  config.train_split = 'train[:98%]'  # 2% held out to pick lr, as in the paper.
  config.eval_split = 'test'
  config.image_size = 224  # The pre-training resolution: no token-MLP resizing.
  config.num_classes = 10
  config.batch_size = _BATCH
  config.eval_batch_size = _BATCH
  config.input.shuffle_buffer = 50_000  # All of CIFAR-10's train split.
  config.input.cache_raw = True  # ~130 MB of encoded images: cache rather than re-read.
  config.input.inception_crop = True
  config.input.min_area = 0.05
  config.input.flip = True
  config.input.randaug_magnitude = 0
  config.input.mixup_p = 0.0
  config.input.eval_pp = 'resize'  # vision_transformer: plain resize, no central crop.

  config.model.name = name
  config.model.dropout_rate = 0.0
  config.model.stoch_depth = 0.0
  config.model_dtype = 'bfloat16'
  config.init_from = arg.init or f'{_WEIGHTS_DIR}/imagenet21k/{name}.npz'
  config.init_from_image_size = 224
  config.init_head = 'replace'
  config.init_head_bias = 0.0
  config.loss = 'softmax_xent'

  config.optimizer = 'momentum'
  config.momentum = 0.9
  config.mu_dtype = 'bfloat16'
  config.lr = arg.lr
  config.weight_decay = 0.0
  config.warmup_steps = 500
  config.total_steps = 10_000
  config.decay_type = 'cosine'
  config.grad_clip_norm = 1.0
  config.grad_accum_steps = 1  # 8 on a single GPU host, as vision_transformer does.

  config.mesh = {'data': -1, 'fsdp': 1, 'model': 1}

  config.log_every = 50
  config.eval_every = 1_000
  config.checkpoint_every = 1_000

  if arg.runlocal:
    config_lib.shrink_for_local(config)
  return config
