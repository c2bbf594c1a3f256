"""The downstream tasks of the paper (Tables 2-3, App. C): the registry and their config.

Each `Task` holds what a fine-tuning run and its learning-rate sweep need: the
dataset (`config.dataset` form), its TFDS name, the train / val / test splits,
the class count, the default resolution, steps, warm-up, the paper's lr grid,
the VTAB group, and the expected number where one is published.

Sources, checked against the real code:
- ImageNet, CIFAR-10/100, Pets, Flowers: splits, steps and warm-up of
  big_vision's `configs/transfer.py` (`_set_dataset`): 1% (ImageNet), 2%
  (CIFAR) or 10% (Pets, Flowers) of train held out as 'val', the official
  test split (ImageNet: 'validation') as 'test'; 20k / 10k / 500 steps with
  500 / 500 / 100 warm-up steps. Grid: App. C (the ViT grid with 0.001
  replaced by 0.06).
- VTAB-1k: big_vision's public tree (HEAD of google-research/big_vision) has
  no VTAB config, so the 19 tasks, their TFDS names, label definitions and
  the 'train800' / 'val200' / 'train800val200' / 'test' splits come from the
  benchmark's own code, google-research/task_adaptation
  (`task_adaptation/data/*.py`, task list in `scripts/run_all_tasks.sh`).
  Where its 'val200' starts after a percentage of 'train' the offset is the
  integer count it computes from the TFDS split size (written out below).
  2,500 steps (ViT paper Table 4), grid {0.003, 0.01, 0.03} (App. C).

VTAB protocol (`final=False` / `final=True` in configs/transfer.py): sweep the
grid training on 'train800' and selecting on 'val200', then fine-tune once
more with the chosen lr on all 1,000 examples ('train800val200') and report
the official test split.

Resolution (paper App. C, BiT-HyperRule): 224 for the tasks with small images
(up to 96 px: CIFAR, SVHN, Camelyon, EuroSAT, dSprites, smallNORB), 448 for
the others; Table 3 rows fine-tune everything at 224 (`res=224`).
"""

from __future__ import annotations

import dataclasses

import ml_collections

# VTAB-1k groups (Zhai et al. 2019), the columns of the paper's VTAB average.
GROUPS = ('natural', 'specialized', 'structured')
VTAB_GRID = (0.003, 0.01, 0.03)       # App. C (2).
IMAGE_GRID = (0.003, 0.01, 0.03, 0.06)  # App. C (1): CIFAR, Pets, Flowers; ImageNet's own grid.
VTAB_STEPS = 2_500                    # ViT paper Table 4.
VTAB_WARMUP = 500                     # vision_transformer's default (vit_jax/configs/common.py).


@dataclasses.dataclass(frozen=True)
class Task:
  """One downstream task; see the module docstring for where each value comes from."""
  name: str
  dataset: str              # config.dataset: a TFDS name, or 'vtab:<task>' for derived labels.
  tfds: str                 # The TFDS dataset (and builder config) it reads.
  num_classes: int
  train: str                # Training split of the lr sweep.
  val: str                  # Selection split.
  test: str                 # Reported split.
  steps: int
  warmup: int
  lr_grid: tuple[float, ...]
  group: str = 'none'       # 'natural' | 'specialized' | 'structured' | 'none'.
  res: int = 224            # Default fine-tuning resolution (BiT-HyperRule for VTAB).
  final_train: str | None = None  # VTAB: re-train on train+val with the chosen lr.
  eval_pp: str = 'resmall_crop'   # At 224; 'resize_crop' above 224 (App. C (3)).
  augment: bool = True      # Inception crop + flip; off where they change the label.
  label: str = 'label'      # The TFDS feature, or how the label is derived (vtab:).
  # Expected test top-1 (%) by setting 'VARIANT@RES' of the ImageNet-21k
  # pre-trained model, with where the number comes from.
  expected: tuple[tuple[str, float, str], ...] = ()

  @property
  def is_vtab(self) -> bool:
    return self.group in GROUPS

  def expected_for(self, variant: str, res: int) -> tuple[float, str] | None:
    """(number, source) for `variant` at `res`, where one is published."""
    for setting, value, source in self.expected:
      if setting == f'{variant}@{res}':
        return value, source
    return None


def _image_task(name, tfds, num_classes, train, val, test, steps, warmup, **kw):
  return Task(name=name, dataset=tfds, tfds=tfds, num_classes=num_classes, train=train,
              val=val, test=test, steps=steps, warmup=warmup, lr_grid=IMAGE_GRID, **kw)


def _vtab(name, tfds, num_classes, group, *, val200, test, res, dataset=None, label='label',
          augment=True, train_offset_split='train'):
  """A VTAB-1k task: train800 = the first 800 of `train_offset_split`'s 'train'."""
  return Task(name=name, dataset=dataset or tfds, tfds=tfds, num_classes=num_classes,
              train='train[:800]', val=val200, test=test, steps=VTAB_STEPS,
              warmup=VTAB_WARMUP, lr_grid=VTAB_GRID, group=group, res=res,
              final_train=f'train[:800]+{val200}', eval_pp='resize', augment=augment,
              label=label)


_TASKS = (
    # --- The "Avg. 5" datasets of Tables 2-3 -------------------------------------------
    _image_task('imagenet', 'imagenet2012', 1000, 'train[:99%]', 'train[99%:]', 'validation',
                20_000, 500, expected=(
                    ('B_16@224', 80.64, 'paper Table 3'),
                    ('L_16@224', 82.89, 'paper Table 3'),
                    ('L_16@448', 84.15, 'paper Table 2 (resize-crop eval; 83.91 in Table 3)'))),
    # vision_transformer evaluates CIFAR with a plain resize (no central crop).
    _image_task('cifar10', 'cifar10', 10, 'train[:98%]', 'train[98%:]', 'test', 10_000, 500,
                eval_pp='resize', expected=(
                    ('B_16@224', 96.82, 'vision_transformer README (lr 0.03)'),
                    ('L_16@224', 98.34, 'vision_transformer README (lr 0.03)'))),
    _image_task('cifar100', 'cifar100', 100, 'train[:98%]', 'train[98%:]', 'test', 10_000, 500,
                eval_pp='resize'),
    _image_task('pets', 'oxford_iiit_pet', 37, 'train[:90%]', 'train[90%:]', 'test', 500, 100),
    _image_task('flowers', 'oxford_flowers102', 102, 'train[:90%]', 'train[90%:]', 'test', 500,
                100),
    # --- VTAB-1k natural ----------------------------------------------------------------
    # val200 offsets: task_adaptation's train_count = PERCENT * |train| // 100.
    _vtab('caltech101', 'caltech101', 102, 'natural', val200='train[2754:2954]',  # 90% of 3060
          test='test', res=448),
    _vtab('vtab_cifar100', 'cifar100', 100, 'natural', val200='train[45000:45200]',  # 90% of 50k
          test='test', res=224),
    _vtab('dtd', 'dtd', 47, 'natural', val200='validation[:200]', test='test', res=448),
    _vtab('vtab_flowers', 'oxford_flowers102', 102, 'natural', val200='validation[:200]',
          test='test', res=448),
    _vtab('vtab_pets', 'oxford_iiit_pet', 37, 'natural', val200='train[2944:3144]',  # 80% of 3680
          test='test', res=448),
    _vtab('sun397', 'sun397/tfds', 397, 'natural', val200='validation[:200]', test='test',
          res=448),
    _vtab('svhn', 'svhn_cropped', 10, 'natural', val200='train[65931:66131]',  # 90% of 73257
          test='test', res=224),
    # --- VTAB-1k specialized ------------------------------------------------------------
    _vtab('camelyon', 'patch_camelyon', 2, 'specialized', val200='validation[:200]',
          test='test', res=224),
    _vtab('eurosat', 'eurosat/rgb', 10, 'specialized', val200='train[16200:16400]',
          test='train[21600:]', res=224),  # 60/20/20% of 27000.
    _vtab('resisc45', 'resisc45', 45, 'specialized', val200='train[18900:19100]',
          test='train[25200:]', res=448),  # 60/20/20% of 31500.
    _vtab('retinopathy', 'diabetic_retinopathy_detection/btgraham-300', 5, 'specialized',
          val200='validation[:200]', test='test', res=448),
    # --- VTAB-1k structured: crops and flips would change these labels ------------------
    _vtab('clevr_count', 'clevr', 8, 'structured', val200='train[63000:63200]',  # 90% of 70k
          test='validation', res=448, dataset='vtab:clevr_count', augment=False,
          label='number of objects - 3'),
    _vtab('clevr_distance', 'clevr', 6, 'structured', val200='train[63000:63200]',
          test='validation', res=448, dataset='vtab:clevr_distance', augment=False,
          label='depth of the closest object, 6 bins'),
    _vtab('dmlab', 'dmlab', 6, 'structured', val200='validation[:200]', test='test', res=448,
          augment=False),
    _vtab('kitti_distance', 'kitti', 4, 'structured', val200='validation[:200]', test='test',
          res=448, dataset='vtab:kitti_distance', augment=False,
          label='depth of the closest vehicle, 4 bins'),
    _vtab('dsprites_location', 'dsprites', 16, 'structured',
          val200='train[589824:590024]', test='train[663552:]', res=224,  # 80/10/10% of 737280.
          dataset='vtab:dsprites_location', augment=False, label='label_x_position // 2'),
    _vtab('dsprites_orientation', 'dsprites', 16, 'structured',
          val200='train[589824:590024]', test='train[663552:]', res=224,
          dataset='vtab:dsprites_orientation', augment=False, label='label_orientation // 2.5'),
    _vtab('smallnorb_azimuth', 'smallnorb', 18, 'structured', val200='test[:200]',
          test='test[50%:]', res=224, dataset='vtab:smallnorb_azimuth', augment=False,
          label='label_azimuth'),
    _vtab('smallnorb_elevation', 'smallnorb', 9, 'structured', val200='test[:200]',
          test='test[50%:]', res=224, dataset='vtab:smallnorb_elevation', augment=False,
          label='label_elevation'),
)

TASKS: dict[str, Task] = {t.name: t for t in _TASKS}
VTAB_TASKS = tuple(t.name for t in _TASKS if t.is_vtab)
AVG5_TASKS = ('imagenet', 'cifar10', 'cifar100', 'pets', 'flowers')

# Aggregate columns of the paper's rows (ImageNet-21k pre-training): Avg. 5 and VTAB-1k.
PAPER_ROWS = {
    'B_16@224': {'avg5': 92.50, 'source': 'Table 3'},
    'L_16@224': {'avg5': 93.63, 'source': 'Table 3'},
    'L_16@448': {'avg5': 93.91, 'vtab': 74.95, 'source': 'Table 2'},
}


def get(name: str) -> Task:
  """The task called `name`; an unknown name is an error listing the known ones."""
  if name not in TASKS:
    raise ValueError(f'Unknown task {name!r}; known tasks: {", ".join(TASKS)} '
                     '(python -m mixer.sweep --list).')
  return TASKS[name]


def expand(names: str) -> list[str]:
  """'vtab', 'avg5', 'all' or a comma-separated list of task names -> task names."""
  out = []
  for token in filter(None, (t.strip() for t in names.split(','))):
    if token == 'vtab':
      out.extend(VTAB_TASKS)
    elif token == 'avg5':
      out.extend(AVG5_TASKS)
    elif token == 'all':
      out.extend(TASKS)
    else:
      out.append(get(token).name)
  return list(dict.fromkeys(out))


def default_lr(task: Task) -> float:
  """The lr of a single run: ViT's VTAB lr 0.01; 0.03 elsewhere (vision_transformer's default)."""
  return 0.01 if task.is_vtab else 0.03


def build_config(task_name: str, *, variant: str = 'B_16', res: int = 0, lr: float = 0.0,
                 init: str = '', minival: bool = False, final: bool = False,
                 runlocal: bool = False):
  """The fine-tuning config of one task: `mixer.recipes.sgd_finetuning` plus the task's data.

  Args:
    task_name: a key of TASKS.
    variant: the Mixer variant ('B_16', 'L_16', ...).
    res: fine-tuning resolution, a multiple of 224; 0 = the task's default.
    lr: peak learning rate; 0 = `default_lr(task)` (the sweep sets each grid point).
    init: released-format .npz; '' = mixer_models/imagenet21k/Mixer-<variant>.npz.
    minival: evaluate only on the held-out 'val' split (no 'test' evaluator).
    final: VTAB's last stage: train on train800val200, evaluate 'test' only.
    runlocal: the laptop-sized variant (tiny model, digits), as every config has.

  Returns:
    A config with evaluators 'val' (selection) and 'test' (reported); see
    docs/transfer.md.
  """
  from mixer import config_lib, recipes  # pylint: disable=g-import-not-at-top  (tf, jax)
  task = get(task_name)
  res = res or task.res
  if final and task.final_train is None:
    raise ValueError(f"Config argument 'final' is for VTAB-1k tasks (re-train on train800val200); "
                     f'{task.name!r} reports the test accuracy of the run selected on its val '
                     "split: drop 'final'.")
  config = config_lib.base_config()
  config.dataset = task.dataset
  config.train_split = task.final_train if final else task.train
  config.input.shuffle_buffer = 50_000  # vision_transformer's fine-tuning default.
  # Everything but ImageNet is small enough to keep its encoded training split in RAM.
  config.input.cache_raw = task.name != 'imagenet'
  recipes.sgd_finetuning(config, variant=variant, res=res, lr=lr or default_lr(task), init=init,
                         total_steps=task.steps, num_classes=task.num_classes,
                         warmup_steps=task.warmup)
  if not task.augment:  # Counting, distance, position, pose: a crop or a flip changes the label.
    config.input.inception_crop = False
    config.input.flip = False
  k = res // recipes.PRETRAIN_SIZE
  pp = task.eval_pp if k == 1 or task.eval_pp == 'resize' else 'resize_crop'  # App. C (3).
  every = min(1_000, task.steps)
  config.log_every = 50
  config.checkpoint_every = every
  config.evals = ml_collections.ConfigDict()
  if not final:
    config.evals.val = recipes.classification_eval(task.val, every_steps=every, pp=pp)
  if final or not (minival or task.is_vtab):
    # VTAB looks at its (large) test split once, at the end of the final run.
    config.evals.test = recipes.classification_eval(
        task.test, every_steps=0 if task.is_vtab else every, pp=pp)
  if runlocal:
    config_lib.shrink_for_local(config, resolution_factor=k)
  return config
