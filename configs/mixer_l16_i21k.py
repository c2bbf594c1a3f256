r"""Mixer-L/16 pre-trained on ImageNet-21k: the paper's Table 4 recipe (the flagship run).

Recipe: paper (arXiv 2105.01601) App. B / Table 4, row "Mixer-L, ImNet-21k":
300 epochs at 224, batch 4096, Adam (0.9, 0.999) lr 1e-3, weight decay 0.1 (the
paper's lr-coupled value; see mixer/optim.py), 10k linear warmup steps then
linear decay, gradient clipping at global norm 1, RandAugment(2 layers, m=20),
mixup 0.5, dropout 0, stochastic depth 0.1. Sigmoid cross-entropy over the
21,843 classes with the head bias at -10 (as big_vision's i21k configs), so the
initial per-class probabilities are tiny and the first steps do not spend
themselves pushing 21,842 negatives down.

Expected results (upstream accuracy on ImageNet-21k is not reported by the
paper; it reports the model after fine-tuning on ImageNet-1k with
configs/finetune_imagenet.py):
  * 82.89% top-1 (ReaL 87.54), fine-tuned at 224: paper Table 3,
    "ImageNet-21k (extra reg.)" block, Mixer-L/16;
  * 83.91% fine-tuned at 448 (Table 3, 'resmall_crop' eval), 84.15% (ReaL
    87.86) with Table 2's 'resize_crop' eval:
    finetune_imagenet.py:variant=L_16,res=448.
  * Few-shot linear probes (ImageNet 5-shot is the paper's transfer proxy,
    §3.3) run every 25k steps (config.evals.fewshot).
The paper estimates 0.41k TPU-v3 core-days (Table 3), ~3.2 days on a v3-128.

Data: 'imagenet21k' is this project's TFDS builder (ImageNet-21k is not in the
public TFDS catalogue): prepare it into the data_dir first with
`python -m mixer.datasets.prepare imagenet21k --data_dir=... --manual_dir=...`
(see mixer/datasets/imagenet21k.py). Its 'validation' split is a fixed ~1% of
the images (by file-name hash); 'train' is the rest.

Launch on a TPU VM pod slice from your workstation (see launch/README.md):

  TPU_NAME=mixer ZONE=europe-west4-a ACCELERATOR=v3-128 \
    launch/tpu_pod.sh run --config=configs/mixer_l16_i21k.py \
      --workdir=gs://$BUCKET/mixer/l16_i21k --config.data_dir=gs://$BUCKET/tensorflow_datasets

which runs on every worker:

  MIXER_DISTRIBUTED=1 python -m mixer.main --config=configs/mixer_l16_i21k.py \
    --workdir=gs://$BUCKET/mixer/l16_i21k --config.data_dir=gs://$BUCKET/tensorflow_datasets

On a slice of 16 cores or more, add --config.mesh.fsdp=16. Each core then updates
1/16 of the params instead of all of them. Compiled for the v3-128 above, the step
moves 18% fewer HBM bytes per core and needs 3.6 instead of 7.9 GiB; on v3-256,
28% fewer. These are compile-only figures (docs/benchmarks.md, "Sharding a pod
run").

Local debug run (tiny model, the embedded 'digits' data, CPU, about a minute):

  python -m mixer.main --config=configs/mixer_l16_i21k.py:runlocal --workdir=/tmp/l16_i21k

Arguments after the colon: `runlocal` (shrink model, data, batch and steps for
a laptop CPU; everything else is the recipe above).

Steps: total_steps = 300 epochs * 14,055,150 images / 4096 = 1,029,429, where
14,055,150 = 99% of the 14,197,122 images of the fall 2011 ImageNet-21k release
(the builder's 'train'; the exact count depends on the hash split and on the few
undecodable files skipped, within ~0.1%).
"""

from mixer import recipes


def get_config(arg=None):
  """The Table 4 ImageNet-21k recipe for Mixer-L/16; see the module docstring for `arg`."""
  return recipes.imagenet21k_pretraining(
      'Mixer-L_16', randaug_magnitude=20, mixup_p=0.5, arg=arg)
