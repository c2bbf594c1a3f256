"""Classifies images with a released-format Mixer checkpoint and prints the top classes.

  python -m mixer.predict --model=Mixer-B_16 \
      --weights=imagenet1k/Mixer-B_16.npz --labels=imagenet2012 --top_k=5 cat.jpg dog.png

Without --model the architecture is read from the file's shapes. The number of
classes is always the file's head size; without --labels, a 1000-class head
gets the ImageNet-1k names and a 21843-class head the ImageNet-21k names.

Evaluation preprocessing, as in the paper's Table 3 ("resmall-crop", also
big_vision's `resize_small(256)|central_crop(224)|value_range(-1,1)`): resize
the shorter side to image_size / 0.875 (256 for 224) with PIL's bilinear
filter (antialiased when shrinking), crop the central image_size x
image_size square, and map pixel values to [-1, 1] as (x - 127.5) / 127.5.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags
from PIL import Image

from mixer import checkpoint, models
from mixer import labels as labels_lib

# Crop size over resize size for "resmall-crop": 224 / 256.
CROP_FRACTION = 0.875
_BATCH_SIZE = 32  # Images per forward pass; bounds memory for long image lists.
# Label set to use when --labels is not given, by head size.
_DEFAULT_LABELS = {1000: 'imagenet2012', 21843: 'imagenet21k'}
FLAGS = flags.FLAGS


def preprocess(image_path: str | os.PathLike[str], image_size: int) -> np.ndarray:
  """Reads one image as float32 HWC in [-1, 1] ("resmall-crop", see module doc)."""
  try:
    with Image.open(image_path) as image:
      image = image.convert('RGB')
  except (OSError, ValueError) as e:
    raise ValueError(f'{image_path}: cannot read the image ({e}). Pass a JPEG/PNG/... file.'
                     ) from e
  resize_to = round(image_size / CROP_FRACTION)
  width, height = image.size
  scale = resize_to / min(width, height)
  # At least image_size on both sides, so the crop always fits.
  new_size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
  image = image.resize(new_size, Image.Resampling.BILINEAR)
  left = (new_size[0] - image_size) // 2
  top = (new_size[1] - image_size) // 2
  image = image.crop((left, top, left + image_size, top + image_size))
  return (np.asarray(image, np.float32) - 127.5) / 127.5


def _build_model(model_name: str | None, params: dict, num_classes: int) -> models.MlpMixer:
  if model_name:
    return models.get_model(model_name, num_classes=num_classes)
  kwargs = checkpoint.infer_architecture(params).model_kwargs()
  kwargs['num_classes'] = num_classes
  return models.MlpMixer(**kwargs)


def predict(model_name: str | None, weights: str | os.PathLike[str],
            image_paths: Sequence[str | os.PathLike[str]], labels: str | None = None,
            top_k: int = 5, image_size: int = 224) -> list[list[tuple[str, float]]]:
  """Top-k (class name, softmax probability) per image, most probable first.

  Args:
    model_name: a variant of `mixer.models.VARIANTS` ('Mixer-B_16'), checked
      against the file; None reads the architecture from the file.
    weights: a released-format .npz with a classification head.
    image_paths: image files (anything PIL reads; converted to RGB).
    labels: 'imagenet2012', 'imagenet21k' or a file with one name a line;
      None picks by head size (1000 or 21843 classes).
    top_k: how many classes per image (at most the number of classes).
    image_size: the model's input size; a file trained at a smaller size is
      adapted (paper App. C) when image_size is an integer multiple of it.

  Raises:
    ValueError: no head, no or mismatching labels, unreadable images.
    checkpoint.CheckpointError: unreadable or mismatching weights.
  """
  if top_k < 1:
    raise ValueError(f'top_k={top_k}: ask for at least one class.')
  params = checkpoint.load_npz(weights)
  found = checkpoint.infer_architecture(params)
  num_classes = found.num_classes
  if not num_classes:
    raise ValueError(
        f'{weights}: has no head (head/kernel), so it cannot classify. Fine-tune a head first '
        '(python -m mixer.main --config.init_from=...) or use the pre-logits as features.')
  if labels is None:
    if num_classes not in _DEFAULT_LABELS:
      raise ValueError(
          f'{weights}: its head has {num_classes} classes, which matches no built-in label set; '
          'pass --labels=FILE with one class name a line.')
    labels = _DEFAULT_LABELS[num_classes]
  names = labels_lib.get_label_names(labels)
  if len(names) != num_classes:
    raise ValueError(
        f'Labels {labels!r} have {len(names)} names but the head of {weights} has '
        f'{num_classes} classes: pass the label list the model was trained with '
        f'(--labels=imagenet2012 for 1000, imagenet21k for 21843, or a file of '
        f'{num_classes} lines).')
  if found.image_size and image_size != found.image_size and image_size % found.image_size == 0:
    # The adapted model is K² times wider in its token-mixing MLPs.
    tokens_mlp_dim = checkpoint.adapted_tokens_mlp_dim(
        found.tokens_mlp_dim, found.image_size, image_size, found.patch_size)
    model = _build_model(model_name, params, num_classes).clone(tokens_mlp_dim=tokens_mlp_dim)
  else:
    model = _build_model(model_name, params, num_classes)
  params = checkpoint.load_for_model(params, model, image_size, head='keep')

  apply = jax.jit(lambda p, x: jax.nn.softmax(model.apply({'params': p}, x, train=False)))
  top_k = min(top_k, num_classes)
  results = []
  for start in range(0, len(image_paths), _BATCH_SIZE):
    batch = np.stack([preprocess(path, image_size)
                      for path in image_paths[start:start + _BATCH_SIZE]])
    probabilities = np.asarray(apply(params, batch))
    for row in probabilities:
      best = np.argsort(-row, kind='stable')[:top_k]
      results.append([(names[i], float(row[i])) for i in best])
  return results


def _define_flags() -> None:
  """Defined only when run as a program, so importing this module defines no flags
  (mixer.visualize, the trainer and tests use names such as --weights too)."""
  flags.DEFINE_string(
      'model', None, 'Variant, e.g. Mixer-B_16 (checked against the file); default: read '
      'from the file.')
  flags.DEFINE_string('weights', None, 'Released-format .npz with a head.', required=True)
  flags.DEFINE_string(
      'labels', None, "'imagenet2012', 'imagenet21k' or a file with one class name a line; "
      'default: by head size.')
  flags.DEFINE_integer('top_k', 5, 'Classes to print per image.')
  flags.DEFINE_integer('image_size', 224, 'Model input size in pixels.')


def main(argv: Sequence[str]) -> None:
  image_paths = argv[1:]
  if not image_paths:
    raise app.UsageError('Pass one or more image files after the flags.')
  try:
    results = predict(FLAGS.model, FLAGS.weights, image_paths, labels=FLAGS.labels,
                      top_k=FLAGS.top_k, image_size=FLAGS.image_size)
  except ValueError as e:  # Includes CheckpointError: the message says what to fix.
    raise SystemExit(f'error: {e}') from None
  for path, top in zip(image_paths, results):
    print(path)
    for name, probability in top:
      print(f'  {probability:7.4f}  {name}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
