r"""Fine-tunes a pre-trained Mixer (Google's released .npz or ours) on CIFAR-10 at 224.

Recipe: `mixer.recipes.sgd_finetuning` (paper §3 "Fine-tuning" and App. C, as
vision_transformer's `mixer_base16_cifar10.py`): momentum SGD, batch 512, 500
warmup steps then cosine decay, 10,000 steps, images upsampled to 224 with
Inception crop + flip for training and a plain resize for evaluation, a
zero-initialised 10-class head. 2% of train is held out ('train[98%:]') to pick
the learning rate: evaluator 'val'; 'test' is the CIFAR-10 test split. This
file is the 'cifar10' entry of `mixer.transfer_tasks` (the same config as
`configs/transfer.py:task=cifar10`); sweep the grid with
`python -m mixer.sweep --config=configs/finetune_cifar10.py` (docs/transfer.md).

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

Weights: see `mixer.recipes` (local copies of gs://mixer_models/...).

Arguments after the colon, comma-separated:
  variant=B_16|L_16|...   model (default B_16); any name of mixer.models.
  lr=0.03          peak learning rate (grid {0.003, 0.01, 0.03, 0.06}).
  init=PATH        released-format .npz, a local file (default
                   mixer_models/imagenet21k/Mixer-<variant>.npz, see "Weights").
  minival          evaluate only on the held-out 'train[98%:]' (no 'test').
  runlocal         shrink model, data, batch and steps for a laptop CPU (no init).

Steps: the paper's fixed 10,000 steps at batch 512 = 5.12M images, ~104 epochs
of 'train[:98%]' (49,000 images).
"""

from mixer import config_lib, recipes, transfer_tasks

TASK = 'cifar10'  # The 'cifar10' entry of mixer.transfer_tasks (configs/transfer.py).


def get_config(arg=None):
  """configs/transfer.py:task=cifar10 with this file's arguments; see the module docstring."""
  arg = config_lib.parse_arg(arg, variant='B_16', lr=0.03, init='', minival=False,
                             runlocal=False)
  return transfer_tasks.build_config(TASK, variant=arg.variant, res=recipes.PRETRAIN_SIZE,
                                     lr=arg.lr, init=arg.init, minival=arg.minival,
                                     runlocal=arg.runlocal)
