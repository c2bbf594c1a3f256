r"""A small Mixer on the embedded scikit-learn digits: the `make demo` job.

Needs no download and no accelerator: 1797 real handwritten 8x8 digits (1437
train / 360 test), upscaled to 32x32, patch 4 (64 tokens), 4 Mixer blocks of
width 64. It exercises the whole framework: the tf.data pipeline, the sharded
jit step, orbax checkpoints, clu metrics, evaluation and the `.npz` export.

Launch (what `make demo` runs):

  python -m mixer.main --config=configs/digits.py --workdir=workdirs/digits_demo

Same config on 8 fake CPU devices with FSDP (shows the mesh at work):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m mixer.main \
      --config=configs/digits.py --config.mesh.fsdp=4 --workdir=workdirs/digits_fsdp

Expected: eval/accuracy >= 0.95 on the 360 test digits (measured 0.98) in
about 1.5 minutes on 2 CPU cores; `tests/test_train_e2e.py` checks the 0.95.
`configs/digits.py:runlocal` is a 20-step smoke run of the same setting.
"""

from mixer import config_lib


def get_config(arg=None):
  """The digits demo; `arg`: `runlocal` (a 20-step smoke run)."""
  args = config_lib.parse_arg(arg, runlocal=False)
  config = config_lib.base_config()
  config.dataset = 'digits'
  config.train_split = 'train'
  config.image_size = 32
  config.num_classes = 10
  config.batch_size = 128
  config.eval_batch_size = 120

  # Digits are centred and orientation matters: no crops or flips.
  config.input.inception_crop = False
  config.input.flip = False
  config.input.shuffle_buffer = 2_000
  config.input.cache_raw = True

  config.model.name = 'Mixer-S_32'
  config.model.patch_size = 4
  config.model.hidden_dim = 64
  config.model.num_blocks = 4
  config.model.tokens_mlp_dim = 32
  config.model.channels_mlp_dim = 256

  config.optimizer = 'adam'
  config.lr = 3e-3
  config.weight_decay = 0.1
  config.warmup_steps = 30
  config.total_steps = 300
  config.decay_type = 'linear'

  config.log_every = 25
  config.checkpoint_every = 200
  config.evals.eval.update(split='test', pp='resize', every_steps=100)

  if args.runlocal:
    config.total_steps = 20
    config.warmup_steps = 5
    config.log_every = 5
    config.evals.eval.every_steps = 10
    config.checkpoint_every = 10
  return config
