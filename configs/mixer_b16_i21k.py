r"""Mixer-B/16 pre-trained on ImageNet-21k: the paper's Table 4 recipe.

Recipe: paper (arXiv 2105.01601) App. B / Table 4, row "Mixer-B, ImNet-21k":
300 epochs at 224, batch 4096, Adam (0.9, 0.999) lr 1e-3, weight decay 0.1 (the
paper's lr-coupled value; see mixer/optim.py), 10k linear warmup steps then
linear decay, gradient clipping at global norm 1, RandAugment(2 layers, m=10),
mixup 0.2, dropout 0, stochastic depth 0.1. Sigmoid cross-entropy over the
21,843 classes with the head bias at -10 (as big_vision's i21k configs), so the
initial per-class probabilities are tiny and the first steps do not spend
themselves pushing 21,842 negatives down.

Expected results (upstream accuracy on ImageNet-21k is not reported by the
paper; it reports the model after fine-tuning on ImageNet-1k with
configs/finetune_imagenet.py):
  * 80.64% top-1 (ReaL 85.80), fine-tuned at 224: paper Table 3,
    "ImageNet-21k (extra reg.)" block, Mixer-B/16 (the paper reports no B/16
    fine-tuning at 448);
  * CIFAR-10 at 224 with configs/finetune_cifar10.py: 96.82% from Google's
    released B/16 i21k weights (vision_transformer README).
  * Few-shot linear probes (ImageNet 5-shot is the paper's transfer proxy,
    §3.3) run every 25k steps (config.fewshot).
The paper estimates 0.15k TPU-v3 core-days (Table 3), ~1.2 days on a v3-128.

Data: 'imagenet21k' is this project's TFDS builder (ImageNet-21k is not in the
public TFDS catalogue): prepare it into the data_dir first with
`python -m mixer.datasets.prepare imagenet21k --data_dir=... --manual_dir=...`
(see mixer/datasets/imagenet21k.py). Its 'validation' split is a fixed ~1% of
the images (by file-name hash); 'train' is the rest.

Launch on a TPU VM pod slice from your workstation (see launch/README.md):

  TPU_NAME=mixer ZONE=europe-west4-a ACCELERATOR=v3-128 \
    launch/tpu_pod.sh run --config=configs/mixer_b16_i21k.py \
      --workdir=gs://$BUCKET/mixer/b16_i21k --config.data_dir=gs://$BUCKET/tensorflow_datasets

which runs on every worker:

  MIXER_DISTRIBUTED=1 python -m mixer.main --config=configs/mixer_b16_i21k.py \
    --workdir=gs://$BUCKET/mixer/b16_i21k --config.data_dir=gs://$BUCKET/tensorflow_datasets

Local debug run (tiny model, the embedded 'digits' data, CPU, about a minute):

  python -m mixer.main --config=configs/mixer_b16_i21k.py:runlocal --workdir=/tmp/b16_i21k

Arguments after the colon: `runlocal` (shrink model, data, batch and steps for
a laptop CPU; everything else is the recipe above).

Steps: total_steps = 300 epochs * 14,055,150 images / 4096 = 1,029,429, where
14,055,150 = 99% of the 14,197,122 images of the fall 2011 ImageNet-21k release
(the builder's 'train'; the exact count depends on the hash split and on the few
undecodable files skipped, within ~0.1%).
"""

from mixer import config_lib

_MODEL = 'Mixer-B_16'
_RANDAUG_MAGNITUDE = 10
_MIXUP = 0.2
_EPOCHS = 300
_BATCH = 4096
# ~99% of the fall 2011 release's 14,197,122 images: the builder's 'train' split.
_TRAIN_IMAGES = 14_197_122 * 99 // 100

# Few-shot linear probes on frozen pre-logits (paper §3 "Metrics"), as in
# big_vision's common_fewshot: name -> (TFDS name, train split, test split).
# The first 65k ImageNet train images have >= 30 images of every class, enough
# for 25 shots. Drop entries whose TFDS data you have not prepared.
_FEWSHOT_DATASETS = {
    'imagenet': ('imagenet2012', 'train[:65000]', 'validation'),
    'cifar100': ('cifar100', 'train', 'test'),
    'pets': ('oxford_iiit_pet', 'train', 'test'),
    'caltech': ('caltech101', 'train', 'test'),
    'dtd': ('dtd', 'train', 'test'),
}




def get_config(arg=None):
  """The Table 4 ImageNet-21k recipe for Mixer-B/16; see the module docstring for `arg`."""
  arg = config_lib.parse_arg(arg, runlocal=False)
  config = config_lib.base_config()

  config.dataset = 'imagenet21k'
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.image_size = 224
  config.num_classes = 21843  # The class count of Google's released i21k heads.
  config.batch_size = _BATCH
  config.eval_batch_size = _BATCH
  # Encoded JPEGs (~110 kB each): 250k per host is ~27 GB of host RAM, fine on a
  # TPU VM; lower it on smaller hosts (big_vision#36: host OOM).
  config.input.shuffle_buffer = 250_000
  config.input.inception_crop = True
  config.input.flip = True
  config.input.randaug_layers = 2
  config.input.randaug_magnitude = _RANDAUG_MAGNITUDE
  config.input.mixup_p = _MIXUP
  config.input.eval_pp = 'resmall_crop'

  config.model.name = _MODEL
  config.model.dropout_rate = 0.0
  config.model.stoch_depth = 0.1
  config.model_dtype = 'bfloat16'  # Matmuls in bf16 on TPU; params stay float32.
  config.loss = 'sigmoid_xent'
  config.init_head_bias = -10.0

  config.optimizer = 'adam'
  config.lr = 1e-3
  config.weight_decay = 0.1
  config.warmup_steps = 10_000
  config.total_steps = _EPOCHS * _TRAIN_IMAGES // _BATCH
  config.decay_type = 'linear'
  config.linear_end = 1e-5
  config.grad_clip_norm = 1.0
  config.mu_dtype = 'bfloat16'  # Halves Adam's first moment, as big_vision does.

  # Pure data parallelism: B/16 params + grads + Adam state (bf16 mu) with the
  # 21843-class head (76M params) are ~1.1 GB, far below a v3 core's 16 GB.
  # On smaller-memory devices shard them with --config.mesh.fsdp=N (N | devices).
  config.mesh = {'data': -1, 'fsdp': 1, 'model': 1}

  config.log_every = 50
  config.eval_every = 10_000
  config.checkpoint_every = 2_000

  config.fewshot.datasets = _FEWSHOT_DATASETS
  config.fewshot.every_steps = 25_000
  config.fewshot.shots = (1, 5, 10, 25)

  if arg.runlocal:
    config_lib.shrink_for_local(config)
  return config
