r"""Mixer pre-training on JFT-300M-style data (TFRecord files): paper Table 4's JFT rows.

Recipe: paper (arXiv 2105.01601) §3 / App. B / Table 4: 224px, batch 4096, Adam
(0.9, 0.999), weight decay 0.03 (the paper's lr-coupled value; see
mixer/optim.py), 10k linear warmup steps then linear decay, gradient clipping at
global norm 1, Inception crop + random horizontal flip only (no RandAugment,
mixup, dropout or stochastic depth: 300M images need no extra regularisation).
Sigmoid cross-entropy over JFT's 18,291 classes (JFT images are multi-label),
head bias -10 as in big_vision's JFT/i21k configs.

  variant  lr     epochs   steps       ImageNet top-1 after fine-tuning at 224
                                       (paper Table 3, JFT-300M block; ReaL)
  S_32     3e-3   5        369,873     68.70 (75.83)
  S_16     3e-3   5        369,873     73.83 (80.60)
  B_32     3e-3   7        517,822     75.53 (81.94)
  B_16     3e-3   7        517,822     80.00 (85.56)
  L_32     1e-3   7        517,822     80.67 (85.62)
  L_16     1e-3   7        517,822     84.05 (88.14)
  L_16     1e-3   14       1,035,644   84.82 (88.48); 86.78 fine-tuned at 448
  H_14     1e-3   14       1,035,644   86.32 (89.14); 87.94 at 448 (Table 2)

Fine-tune the result with configs/finetune_imagenet.py (--config.init_from=the
exported .npz). S_8 (a released GSAM size) is not in the paper's JFT table and is
not offered here.

Data: `dataset='tfrecord:<glob>'`, a glob with a `{split}` placeholder. The
default reads `<tfrecords>/train-*.tfrecord` and
`<tfrecords>/validation-*.tfrecord` (the names `python -m
mixer.datasets.write_tfrecords` gives; schema in mixer/datasets/tfrecord.py);
point `tfrecords=` at your copy (or set --config.dataset directly). `data_dir` stays
the TFDS directory of the few-shot datasets.

Launch on a TPU VM pod slice from your workstation (see launch/README.md):

  TPU_NAME=mixer ZONE=europe-west4-a ACCELERATOR=v3-256 \
    launch/tpu_pod.sh run \
      --config=configs/mixer_jft.py:variant=B_16,tfrecords=gs://$BUCKET/jft300m \
      --workdir=gs://$BUCKET/mixer/b16_jft --config.data_dir=gs://$BUCKET/tensorflow_datasets

which runs on every worker:

  MIXER_DISTRIBUTED=1 python -m mixer.main \
    --config=configs/mixer_jft.py:variant=B_16,tfrecords=gs://$BUCKET/jft300m \
    --workdir=gs://$BUCKET/mixer/b16_jft --config.data_dir=gs://$BUCKET/tensorflow_datasets

Local debug run (tiny model, the embedded 'digits' data instead of TFRecords):

  python -m mixer.main --config=configs/mixer_jft.py:variant=B_16,runlocal --workdir=/tmp/jft

Arguments after the colon, comma-separated:
  variant=S_32|S_16|B_32|B_16|L_32|L_16|H_14   model (default B_16).
  epochs=N     override the table's epochs (e.g. epochs=14 for L_16).
  tfrecords=DIR   directory holding `{split}-*.tfrecord` shards (local or gs://).
  runlocal     shrink model, data, batch and steps for a laptop CPU.

Steps: total_steps = epochs * 303,000,000 images / 4096, with 303M the size of
JFT-300M given by the ViT paper (§4.1); e.g. B_16: 7 * 303e6 / 4096 = 517,822.
"""

from mixer import config_lib, recipes

_BATCH = 4096
_TRAIN_IMAGES = 303_000_000  # JFT-300M ("303M high-resolution images", ViT paper).
_NUM_CLASSES = 18_291

# variant -> (lr, epochs): paper Table 4 (L/16 is also reported at 14 epochs).
_RECIPES = {
    'S_32': (3e-3, 5),
    'S_16': (3e-3, 5),
    'B_32': (3e-3, 7),
    'B_16': (3e-3, 7),
    'L_32': (1e-3, 7),
    'L_16': (1e-3, 7),
    'H_14': (1e-3, 14),
}


def get_config(arg=None):
  """JFT pre-training of `variant`; see the module docstring for `arg`."""
  arg = config_lib.parse_arg(arg, variant='B_16', epochs=0,
                             tfrecords='gs://YOUR_BUCKET/jft300m', runlocal=False)
  if arg.variant not in _RECIPES:
    raise ValueError(f'Unknown JFT variant {arg.variant!r}; choose one of {sorted(_RECIPES)}.')
  lr, epochs = _RECIPES[arg.variant]
  epochs = arg.epochs or epochs
  config = config_lib.base_config()

  config.dataset = f'tfrecord:{arg.tfrecords.rstrip("/")}/{{split}}-*.tfrecord'
  config.train_split = 'train'
  config.image_size = 224
  config.num_classes = _NUM_CLASSES
  # JFT is far larger than any buffer; 250k examples per host (~25 GB of encoded
  # images) is what fits a TPU VM host comfortably (big_vision#36: host OOM).
  config.input.shuffle_buffer = 250_000
  config.input.inception_crop = True
  config.input.min_area = 0.05
  config.input.flip = True
  config.input.randaug_magnitude = 0  # No RandAugment on JFT (Table 4: '-').
  config.input.mixup_p = 0.0

  config.model.name = f'Mixer-{arg.variant}'
  config.model.dropout_rate = 0.0
  config.model.stoch_depth = 0.0
  config.loss = 'sigmoid_xent'
  config.init_head_bias = -10.0

  recipes.adam_pretraining(config, epochs=epochs, train_images=_TRAIN_IMAGES, lr=lr,
                           weight_decay=0.03, batch_size=_BATCH)

  config.log_every = 50
  config.checkpoint_every = 2_000
  config.evals.eval = recipes.classification_eval('validation', every_steps=10_000)
  config.evals.fewshot = recipes.fewshot_eval()

  if arg.runlocal:
    config_lib.shrink_for_local(config)
  return config
