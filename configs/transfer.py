r"""Fine-tunes a pre-trained Mixer on any downstream task of the paper (Tables 2-3, App. C).

One recipe, `mixer.recipes.sgd_finetuning` (momentum SGD, batch 512, cosine
decay after a linear warm-up, clipping at 1, no weight decay, a new zero head,
App. C's block-diagonal token-mixing init above 224 px), and one task registry,
`mixer.transfer_tasks` (splits, classes, resolution, steps, warm-up, lr grid,
VTAB group, expected number). `python -m mixer.sweep --list` lists the tasks:
imagenet, cifar10, cifar100, pets, flowers (the paper's "Avg. 5") and the 19
VTAB-1k tasks (caltech101, ..., clevr_count, dsprites_location, ...).

Every config has a 'val' evaluator (the split the lr is selected on) and a
'test' one (the number reported). VTAB-1k: trains on 'train800' and evaluates
'val200'; `final` re-trains on all 1,000 examples and evaluates the official
test split once, at the end.

One run (the task's default lr; a sweep over the paper's grid is
`python -m mixer.sweep`, see docs/transfer.md):

  python -m mixer.main --config=configs/transfer.py:task=pets,variant=B_16,res=224 \
    --workdir=/tmp/ft_pets --config.init_from=/data/mixer_models/imagenet21k/Mixer-B_16.npz

The lr grid of one task, best by validation, test accuracy reported (runs the
grid points one after the other; --print_commands prints one command each):

  python -m mixer.sweep --config=configs/transfer.py:task=cifar100,variant=L_16 \
    --workdir=gs://$BUCKET/transfer/l16 --config.data_dir=gs://$BUCKET/tensorflow_datasets

VTAB-1k, all 19 tasks, with the natural / specialized / structured averages:

  python -m mixer.sweep --config=configs/transfer.py:variant=L_16 --tasks=vtab \
    --workdir=gs://$BUCKET/vtab/l16 --config.data_dir=gs://$BUCKET/tensorflow_datasets

Local debug run (tiny model trained from scratch on 'digits': no weights needed):

  python -m mixer.main --config=configs/transfer.py:task=dtd,runlocal --workdir=/tmp/ft_local

Expected (ImageNet-21k weights): the registry's `expected` numbers, e.g.
ImageNet B_16@224 80.64 and L_16@448 84.15, CIFAR-10 B_16 96.82; the paper's
aggregate for Mixer-L/16 @448 is Avg. 5 93.91, VTAB-1k 74.95 (Table 2).

Arguments after the colon, comma-separated:
  task=NAME        a task of mixer.transfer_tasks (default cifar10).
  variant=B_16|L_16|...   model (default B_16); any name of mixer.models.
  res=224|448      fine-tuning resolution (default: the task's, BiT-HyperRule).
  lr=0.03          peak learning rate (default 0.03; VTAB 0.01).
  init=PATH        released-format .npz (default
                   mixer_models/imagenet21k/Mixer-<variant>.npz, see mixer.recipes).
  minival          evaluate only on the held-out 'val' split (no 'test').
  final            VTAB-1k: train on train800val200, evaluate 'test'.
  runlocal         shrink model, data, batch and steps for a laptop CPU (no init).
"""

from mixer import config_lib, transfer_tasks

TASK = 'cifar10'  # The default task (mixer.sweep reads it when no task= is given).


def get_config(arg=None):
  """Fine-tuning of `variant` on `task`; see the module docstring for `arg`."""
  arg = config_lib.parse_arg(arg, task=TASK, variant='B_16', res=0, lr=0.0, init='',
                             minival=False, final=False, runlocal=False)
  return transfer_tasks.build_config(
      arg.task, variant=arg.variant, res=arg.res, lr=arg.lr, init=arg.init,
      minival=arg.minival, final=arg.final, runlocal=arg.runlocal)
