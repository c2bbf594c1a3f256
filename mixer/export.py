r"""Exports a trained Mixer for serving: TF SavedModel, TFLite, ONNX or StableHLO.

  python -m mixer.export --weights=workdirs/digits_demo/final.npz \
      --format=saved_model|tflite|onnx|stablehlo --out=PATH [--quantize=fp16|int8] \
      [--image_size=N] [--labels=imagenet2012|FILE] [--top_k=5]

Every format takes float32 images `[batch, S, S, 3]` in [-1, 1] (NHWC, the
JAX model's input) with any batch size and returns the logits `[batch,
classes]`:

  saved_model  jax2tf (native serialization) with the weights as variables.
               Signatures: `serving_default` (images -> logits) and
               `predict_images` (encoded JPEG/PNG bytes `[batch]` -> top-k
               `classes`, `scores` (softmax, or sigmoid for a model trained
               with sigmoid_xent) and `labels`, with the weights'
               evaluation preprocessing inside the graph). For TF Serving and
               Vertex AI.
  tflite       converted from that SavedModel's `serving_default`; float32, or
               `--quantize=fp16` (fp16 weights) / `int8` (dynamic-range: int8
               weights, float activations). For mobile and edge.
  onnx         built node by node from the weights (mixer/export_onnx.py says
               why), opset 17, dynamic batch. For onnxruntime (also in the
               browser) and TensorRT.
  stablehlo    `jax.export` with a symbolic batch, weights inside; reload with
               `jax.export.deserialize(data).call(images)` on any XLA backend.

Image size, preprocessing and labels come from the weights' sidecar
(`final.json` beside `final.npz`, written by the trainer). Google's released
files have none: the image size is then read from the token count, the
preprocessing is the paper's resmall-crop (0.875) and the labels follow the head
size (1000: imagenet2012, 21843: imagenet21k, else class numbers).
`--image_size` and `--labels` override them; a larger image size adapts the
weights as in the paper's Appendix C (a whole multiple of the trained size).
Next to the exported file goes `PATH.json`: the same information for
`mixer.predict --backend=...` (`mixer.serving`).

Writes are atomic: a file is renamed into place only once complete, a
SavedModel directory only once saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from mixer import labels as labels_lib
from mixer import models, paths, surgery
from mixer import weights as weights_lib

FORMATS = ('saved_model', 'tflite', 'onnx', 'stablehlo')
QUANTIZATIONS = ('fp16', 'int8')
# Released files carry no sidecar: the paper's evaluation preprocessing.
_RELEASED_PREPROCESSING = {'pp': 'resmall_crop', 'crop_fraction': 0.875}
_DEFAULT_LABELS = {1000: 'imagenet2012', 21843: 'imagenet21k'}
INFO_SUFFIX = '.json'


class ExportError(ValueError):
  """An export that cannot be done as asked; the message says how to fix it."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServingInfo:
  """What serving a model needs besides running it: its input, preprocessing and labels.

  `Servable` (weights run with the Flax model) and `serving.Exported` (an exported
  file run by its runtime) both carry it, so `mixer.predict` treats them alike
  through `compiled_logits()`.
  """
  image_size: int
  pp: str
  crop_fraction: float
  label_names: tuple[str, ...]
  info: dict[str, Any]  # Written as PATH.json beside the exported file.

  @property
  def num_classes(self) -> int:
    return len(self.label_names)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Servable(ServingInfo):
  """Everything an exported model needs: weights adapted to `image_size`, and metadata."""
  model: models.MlpMixer
  params: dict[str, Any]

  def logits(self, images: jax.Array) -> jax.Array:
    return self.model.apply({'params': self.params}, images, train=False)

  def compiled_logits(self) -> Callable[[Any], jax.Array]:
    """`logits`, jitted with the weights as an argument: jitting `logits` itself would
    compile every weight into the program as a constant (slow to build, held twice)."""
    apply = jax.jit(lambda params, images: self.model.apply({'params': params}, images,
                                                             train=False))
    return functools.partial(apply, self.params)


def resolve_labels(spec: Any, num_classes: int, source: str) -> tuple[list[str], Any]:
  """(names, spec to record) for a label spec: None, a set name / file, or a list of names."""
  if spec is None:
    spec = _DEFAULT_LABELS.get(num_classes)
  if spec is None:
    return [str(i) for i in range(num_classes)], None
  names = list(spec) if isinstance(spec, (list, tuple)) else labels_lib.get_label_names(spec)
  if len(names) != num_classes:
    raise ExportError(
        f'Labels from {source} have {len(names)} names but the head has {num_classes} '
        f'classes: pass --labels with the model\'s label list ({num_classes} lines).')
  # A file's names are recorded themselves, so the export does not depend on the file.
  return names, spec if isinstance(spec, str) and spec in _DEFAULT_LABELS.values() else names


def load_servable(weights: str, *, image_size: int | None = None,
                  labels: str | None = None) -> Servable:
  """Reads released-format weights and their sidecar for export at `image_size`.

  Raises:
    weights_lib.WeightsError: unreadable weights, no head, or an image size
      the weights cannot be adapted to.
    ExportError, ValueError: bad labels or sidecar preprocessing.
  """
  params = weights_lib.load_npz(weights)
  found = surgery.infer_architecture(params)
  if not found.num_classes:
    raise surgery.WeightsError(
        f'{weights}: has no head (head/kernel), so there is no classifier to export. '
        'Fine-tune a head first (python -m mixer.main --config.init_from=...).')
  if found.image_size is None:
    raise surgery.WeightsError(
        f'{weights}: its {found.num_tokens} tokens are not a square grid; only square '
        'models can be exported.')
  sidecar = weights_lib.read_sidecar(weights) or {}
  image_size = image_size or sidecar.get('image_size') or found.image_size
  kwargs = found.model_kwargs()
  if image_size != found.image_size:
    # Raises WeightsError when image_size is not a whole multiple of the trained size.
    kwargs['tokens_mlp_dim'] = surgery.adapted_tokens_mlp_dim(
        found.tokens_mlp_dim, found.image_size, image_size, found.patch_size)
    logging.info('%s was trained at %d px; adapting it to %d px (paper App. C).', weights,
                 found.image_size, image_size)
  # Always the released per-block layout (scan off): the exporters walk its blocks.
  model = models.MlpMixer(**kwargs)
  params = weights_lib.load_for_model(params, model, image_size, head='keep')

  preprocessing = dict(sidecar.get('preprocessing') or _RELEASED_PREPROCESSING)
  from mixer import preprocess_ops  # pylint: disable=g-import-not-at-top  (TF: only here)
  preprocess_ops.check_eval_pp(preprocessing['pp'], preprocessing['crop_fraction'],
                               where=f'{weights_lib.sidecar_path(weights)} preprocessing.pp')
  spec = labels if labels is not None else sidecar.get('labels')
  names, recorded = resolve_labels(spec, found.num_classes,
                                   '--labels' if labels is not None else f'{weights} sidecar')
  info = {key: value for key, value in sidecar.items() if key != 'config'}
  info.update({
      'model': {'name': found.variant, **kwargs},
      'image_size': image_size,
      'num_classes': found.num_classes,
      'preprocessing': {**preprocessing, 'value_range': [-1, 1]},
      'labels': recorded,
      'weights': os.fspath(weights),
  })
  return Servable(model=model, params=params, image_size=image_size, pp=preprocessing['pp'],
                  crop_fraction=float(preprocessing['crop_fraction']),
                  label_names=tuple(names), info=info)


# -----------------------------------------------------------------------------
# Writers (each returns the bytes or writes a directory; `export` places them)
# -----------------------------------------------------------------------------


def _tf_module(servable: Servable, *, top_k: int | None):
  """A tf.Module with the weights as variables and `serving_default` (+ `predict_images`)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  from mixer import preprocess_ops  # pylint: disable=g-import-not-at-top

  size = servable.image_size
  apply = jax2tf.convert(
      lambda p, x: servable.model.apply({'params': p}, x, train=False),
      polymorphic_shapes=[None, f'(b, {size}, {size}, 3)'], with_gradient=False)
  module = tf.Module()
  # Variables, not constants: the graph stays small (constants are copied into
  # the GraphDef, which has a 2 GB limit) and TFLite freezes them anyway.
  module.params = tf.nest.map_structure(tf.Variable, servable.params)

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, size, size, 3], tf.float32, name='images')])
  def serving_default(images):
    return {'logits': apply(module.params, images)}

  module.serving_default = serving_default
  signatures = {'serving_default': serving_default}
  if top_k is not None:
    label_table = tf.constant(list(servable.label_names))
    k = min(top_k, servable.num_classes)

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None], tf.string, name='image_bytes')])
    def predict_images(image_bytes):
      images = tf.map_fn(
          lambda data: preprocess_ops.decode_and_eval_transform(
              data, image_size=size, pp=servable.pp, crop_fraction=servable.crop_fraction),
          image_bytes, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
      logits = apply(module.params, images)
      # Per-class probabilities for a sigmoid-trained model, as mixer.predict gives.
      probabilities = (tf.nn.sigmoid(logits) if servable.info.get('loss') == 'sigmoid_xent'
                       else tf.nn.softmax(logits))
      scores, classes = tf.math.top_k(probabilities, k=k)
      return {'classes': classes, 'scores': scores,
              'labels': tf.gather(label_table, classes)}

    module.predict_images = predict_images
    signatures['predict_images'] = predict_images
  return module, signatures


@contextlib.contextmanager
def _quiet_tf_saver():
  """Hides the saver's INFO lines (renamed inputs, fingerprints): noise to a user."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def _save(module, directory: str, signatures) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with _quiet_tf_saver():
    tf.saved_model.save(module, directory, signatures=signatures)


def write_saved_model(servable: Servable, directory: str, *, top_k: int = 5) -> None:
  module, signatures = _tf_module(servable, top_k=top_k)
  _save(module, directory, signatures)


def tflite_bytes(servable: Servable, quantize: str | None = None) -> bytes:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    # The converter's checked route is from a SavedModel (see docs/deploy.md).
    module, signatures = _tf_module(servable, top_k=None)
    _save(module, tmp, signatures)
    converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=['serving_default'])
    if quantize:
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
      if quantize == 'fp16':
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def onnx_bytes(servable: Servable) -> bytes:
  from mixer import export_onnx  # pylint: disable=g-import-not-at-top
  return export_onnx.build(servable.params, servable.image_size).SerializeToString()


def stablehlo_bytes(servable: Servable) -> bytes:
  size = servable.image_size
  batch_shape = jax.export.symbolic_shape(f'b, {size}, {size}, 3')
  exported = jax.export.export(jax.jit(servable.logits))(
      jax.ShapeDtypeStruct(batch_shape, jnp.float32))
  return bytes(exported.serialize())


# -----------------------------------------------------------------------------
# Atomic placement and the one entry point
# -----------------------------------------------------------------------------


def _place_directory(write: Callable[[str], None], out: str) -> None:
  """Writes a directory next to `out`, then swaps it in (the old one is removed after)."""
  if paths.is_remote(out):
    write(out)  # Buckets have no rename; the SavedModel is complete when save returns.
    return
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(out)}.', suffix='.tmp')
  # mkdtemp makes the directory private (0700); give it the mode makedirs would, so that
  # a server running as another user (TF Serving in docker) can read it.
  os.chmod(tmp, 0o777 & ~paths.current_umask())
  old = None
  try:
    write(tmp)
    if os.path.lexists(out):
      old = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(out)}.', suffix='.old')
      os.rename(out, os.path.join(old, 'x'))
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if old and not os.path.lexists(out):  # Put the previous export back.
      with contextlib.suppress(OSError):
        os.rename(os.path.join(old, 'x'), out)
    raise
  finally:
    if old:
      shutil.rmtree(old, ignore_errors=True)


def info_path(exported: str) -> str:
  """`model.onnx` -> `model.onnx.json` (a SavedModel directory `sm` -> `sm.json`)."""
  return os.fspath(exported).rstrip('/') + INFO_SUFFIX


def export(weights: str, fmt: str, out: str, *, quantize: str | None = None,
           image_size: int | None = None, labels: str | None = None,
           top_k: int = 5) -> Servable:
  """Exports `weights` as `fmt` to `out` (plus `out`.json); returns what was exported.

  Raises:
    ExportError: unknown format or quantization, bad labels.
    weights_lib.WeightsError: bad weights, or an image size they cannot serve.
  """
  if fmt not in FORMATS:
    raise ExportError(f'--format={fmt!r} is not a known format; use one of {", ".join(FORMATS)}.')
  if quantize is not None and (fmt != 'tflite' or quantize not in QUANTIZATIONS):
    raise ExportError(
        f'--quantize={quantize!r}: only --format=tflite is quantized, with '
        f'{" or ".join(QUANTIZATIONS)} (dynamic range); leave it out for float32.')
  if top_k < 1:
    raise ExportError(f'--top_k={top_k}: ask for at least one class.')
  if image_size is not None and image_size <= 0:
    raise ExportError(f'--image_size={image_size}: pass a positive size in pixels.')
  out = os.fspath(out).rstrip('/')
  if fmt != 'saved_model' and not paths.is_remote(out) and os.path.isdir(out):
    raise ExportError(f'--out={out} is a directory; --format={fmt} writes one file: pass a '
                      f'file name, e.g. {os.path.join(out, "model." + fmt)}.')
  if os.path.abspath(info_path(out)) == os.path.abspath(weights_lib.sidecar_path(weights)):
    raise ExportError(f'--out={out} would overwrite the sidecar of {weights} with its '
                      f'{info_path(out)}; pass another name, e.g. {out}_{fmt}.')
  servable = load_servable(weights, image_size=image_size, labels=labels)
  if fmt == 'saved_model':
    _place_directory(lambda d: write_saved_model(servable, d, top_k=top_k), out)
  else:
    data = {'tflite': lambda: tflite_bytes(servable, quantize),
            'onnx': lambda: onnx_bytes(servable),
            'stablehlo': lambda: stablehlo_bytes(servable)}[fmt]()
    paths.atomic_write(out, lambda f: f.write(data))
  info = {**servable.info, 'format': fmt, 'quantize': quantize}
  text = json.dumps(info, indent=1, sort_keys=True, default=str)
  paths.atomic_write(info_path(out), lambda f: f.write(text.encode()))
  return servable


def _define_flags() -> None:
  """Defined only when run as a program (other modules use --weights too)."""
  flags.DEFINE_string('weights', None, 'Released-format .npz with a head (e.g. final.npz).',
                      required=True)
  # A string, not an enum, so an unknown format gets the same one-line error as the rest.
  flags.DEFINE_string('format', None, f'What to write: {", ".join(FORMATS)}.', required=True)
  flags.DEFINE_string('out', None, 'Output file (SavedModel: directory).', required=True)
  flags.DEFINE_string('quantize', None, 'tflite only: fp16 or int8 (dynamic range).')
  flags.DEFINE_integer('image_size', None, 'Input size; default: sidecar, else the weights\'.')
  flags.DEFINE_string('labels', None, "'imagenet2012', 'imagenet21k' or a file with one name "
                      'a line; default: sidecar, else by head size.')
  flags.DEFINE_integer('top_k', 5, 'saved_model: classes returned by predict_images.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]}; everything is a --flag.')
  flag_values = flags.FLAGS
  try:
    servable = export(flag_values.weights, flag_values.format, flag_values.out,
                      quantize=flag_values.quantize, image_size=flag_values.image_size,
                      labels=flag_values.labels, top_k=flag_values.top_k)
  except ValueError as e:  # ExportError, WeightsError: the message says what to fix.
    raise SystemExit(f'error: {e}') from None
  size = size_bytes(flag_values.out)
  print(f'Wrote {flag_values.out} ({flag_values.format}'
        f'{", " + flag_values.quantize if flag_values.quantize else ""}, {size / 2**20:.1f} MiB): '
        f'{servable.num_classes} classes at {servable.image_size} px, any batch size.')
  print(f'Check it: python -m mixer.predict --backend={flag_values.format} '
        f'--weights={flag_values.out} IMAGE...')


def size_bytes(path: str) -> int:
  """Bytes of an exported file, or of all files under an exported directory (SavedModel)."""
  if os.path.isdir(path):
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)
  return os.path.getsize(path)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
