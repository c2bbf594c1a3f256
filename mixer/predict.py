"""Classifies images with a released-format Mixer checkpoint and prints the top classes.

  python -m mixer.predict --weights=workdirs/digits_demo/final.npz digit0.png digit1.png
  python -m mixer.predict --weights=imagenet1k/Mixer-B_16.npz --top_k=5 cat.jpg dog.png

Every setting has one source, in this order: a flag; else the sidecar the
trainer writes beside the weights (`final.json` next to `final.npz`: image size,
evaluation preprocessing, labels, loss; see `mixer.weights`); else, for Google's
released files (no sidecar), the paper's defaults: the resolution the file was
trained at (read from its token count: 224 px for every released file),
"resmall-crop" with crop fraction 0.875, the label set by head size (1000:
imagenet2012, 21843: imagenet21k, otherwise class numbers) and softmax
probabilities. The weights and these settings are read by
`mixer.export.load_servable`, the same reader the exporters use.

Preprocessing is `mixer.preprocess_ops.eval_transform`, the very transform the
evaluators ran on the eval split, so predict reproduces the run's eval accuracy:
'resmall_crop' is big_vision's `resize_small(S/f, method='area')|central_crop(S)`
(the paper's Table 3), 'resize_crop' a bilinear `resize(S/f)|central_crop(S)`,
'resize' a bilinear `resize(S)`; then values (x - 127.5) / 127.5. Images are
decoded by TF: JPEG, PNG, GIF (first frame) or BMP; grey becomes RGB.

At an --image_size other than the trained one (a whole multiple of it), the
weights are adapted as in the paper's Appendix C, and a log line says so.
Probabilities are the softmax of the logits, or their sigmoid for a model
trained with `loss='sigmoid_xent'` (per-class probabilities, not summing to 1).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags

from mixer import export, serving

_BATCH_SIZE = 32  # Images per forward pass; bounds memory for long image lists.
FLAGS = flags.FLAGS


def load_images(image_paths: Sequence[str | os.PathLike[str]], image_size: int, pp: str,
                crop_fraction: float) -> np.ndarray:
  """Reads images as float32 `[N, image_size, image_size, 3]` in [-1, 1] (the eval transform).

  Raises:
    ValueError: a file that cannot be read or decoded, or a bad pp/crop_fraction.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (TF only where images are read)

  from mixer import preprocess_ops  # pylint: disable=g-import-not-at-top
  preprocess_ops.check_eval_pp(pp, crop_fraction)
  images = []
  for path in image_paths:
    try:
      data = tf.io.gfile.GFile(os.fspath(path), 'rb').read()
      image = preprocess_ops.decode_and_eval_transform(
          tf.constant(data), image_size=image_size, pp=pp, crop_fraction=crop_fraction)
    except (tf.errors.OpError, OSError) as e:
      message = getattr(e, 'message', None) or str(e)
      raise ValueError(f'{path}: cannot read the image ({message.strip()}). Pass a JPEG, '
                       'PNG, GIF or BMP file.') from None
    images.append(image.numpy())
  return np.stack(images) if images else np.zeros([0, image_size, image_size, 3], np.float32)


def top_classes(scores: np.ndarray, names: Sequence[str], top_k: int
                ) -> list[list[tuple[str, float]]]:
  """Per row of `scores` `[N, classes]`, the top_k (name, score), highest first."""
  results = []
  for row in np.asarray(scores):
    best = np.argsort(-row, kind='stable')[:top_k]
    results.append([(names[i], float(row[i])) for i in best])
  return results


def predict(model_name: str | None, weights: str | os.PathLike[str],
            image_paths: Sequence[str | os.PathLike[str]], labels: str | None = None,
            top_k: int = 5, image_size: int | None = None, pp: str | None = None,
            crop_fraction: float | None = None, backend: str = 'jax'
            ) -> list[list[tuple[str, float]]]:
  """Top-k (class name, probability) per image, most probable first.

  Args:
    model_name: a variant of `mixer.models.VARIANTS` ('Mixer-B_16') to check
      the file against; None accepts whatever the file holds.
    weights: a released-format .npz with a classification head.
    image_paths: image files (JPEG/PNG/GIF/BMP; local or gs://).
    labels: 'imagenet2012', 'imagenet21k' or a file with one name a line;
      None: the sidecar's, else by head size (see the module docstring).
    top_k: how many classes per image (at most the number of classes).
    image_size: the model's input size; None: the sidecar's, else the file's
      own. A multiple of the trained size adapts the weights (paper App. C).
    pp: evaluation preprocessing (`preprocess_ops.EVAL_PP`); None: the
      sidecar's, else 'resmall_crop'.
    crop_fraction: crop over resize side for the *_crop pp; None: the
      sidecar's, else 0.875.
    backend: 'jax' runs `weights` (.npz) with the Flax model; 'saved_model',
      'tflite', 'onnx' or 'stablehlo' runs a file from mixer.export instead
      (`weights` is then that file; its settings come from its PATH.json).

  Raises:
    ValueError: no head, mismatching labels or model, unreadable images.
    weights.WeightsError: unreadable weights, or an image size they cannot be
      adapted to.
  """
  if top_k < 1:
    raise ValueError(f'top_k={top_k}: ask for at least one class.')
  if image_size is not None and image_size <= 0:
    raise ValueError(f'image_size={image_size}: pass a positive size in pixels.')
  if backend == 'jax':
    servable = export.load_servable(os.fspath(weights), image_size=image_size, labels=labels)
  else:  # The same ServingInfo, run by the exported file's runtime.
    servable = serving.load_exported(backend, os.fspath(weights), image_size=image_size,
                                     labels=labels)
  variant = servable.info['model']['name']
  if model_name and model_name != variant:
    raise ValueError(f'--model={model_name}, but {weights} holds '
                     f'{variant or "no paper variant"} ({servable.info["model"]}). '
                     'Leave --model out to use the file as it is.')
  pp = servable.pp if pp is None else pp
  crop_fraction = servable.crop_fraction if crop_fraction is None else crop_fraction
  sigmoid = servable.info.get('loss') == 'sigmoid_xent'
  activation = jax.nn.sigmoid if sigmoid else jax.nn.softmax
  logits = servable.compiled_logits()

  def apply(x):
    return activation(logits(x))
  results = []
  for start in range(0, len(image_paths), _BATCH_SIZE):
    batch = load_images(image_paths[start:start + _BATCH_SIZE], servable.image_size, pp,
                        crop_fraction)
    results += top_classes(np.asarray(apply(batch)), servable.label_names,
                           min(top_k, servable.num_classes))
  return results


def _define_flags() -> None:
  """Defined only when run as a program, so importing this module defines no flags
  (mixer.visualize, the trainer and tests use names such as --weights too)."""
  flags.DEFINE_string(
      'model', None, 'Variant, e.g. Mixer-B_16, to check the file against; default: any.')
  flags.DEFINE_string('weights', None, 'Released-format .npz with a head.', required=True)
  flags.DEFINE_string(
      'labels', None, "'imagenet2012', 'imagenet21k' or a file with one class name a line; "
      'default: the sidecar\'s, else by head size.')
  flags.DEFINE_integer('top_k', 5, 'Classes to print per image.')
  flags.DEFINE_integer('image_size', None, 'Model input size in pixels; default: the '
                       'sidecar\'s, else the resolution the file was trained at.')
  flags.DEFINE_string('pp', None, "Eval preprocessing: 'resmall_crop', 'resize_crop' or "
                      "'resize'; default: the sidecar's, else 'resmall_crop'.")
  flags.DEFINE_string('backend', 'jax', "What runs the model: 'jax' (--weights=.npz), or a file "
                      "from mixer.export: 'saved_model', 'tflite', 'onnx', 'stablehlo'.")
  flags.DEFINE_float('crop_fraction', None, 'Crop over resize side for the *_crop pp; '
                     'default: the sidecar\'s, else 0.875 (224/256).')


def main(argv: Sequence[str]) -> None:
  image_paths = argv[1:]
  if not image_paths:
    raise app.UsageError('Pass one or more image files after the flags.')
  try:
    results = predict(FLAGS.model, FLAGS.weights, image_paths, labels=FLAGS.labels,
                      top_k=FLAGS.top_k, image_size=FLAGS.image_size, pp=FLAGS.pp,
                      crop_fraction=FLAGS.crop_fraction, backend=FLAGS.backend)
  except ValueError as e:  # Includes WeightsError/ExportError: the message says what to fix.
    raise SystemExit(f'error: {e}') from None
  for path, top in zip(image_paths, results):
    print(path)
    for name, probability in top:
      print(f'  {probability:7.4f}  {name}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
