"""Runs a trained or exported Mixer the same way whatever the format.

  run = make_runner('onnx', 'digits.onnx')
  logits = run(images)  # float32 [batch, S, S, 3] in [-1, 1] -> numpy [batch, classes]

Backends: 'jax' (a released-format .npz, run with the Flax model),
'saved_model', 'tflite' (with ai-edge-litert's interpreter, TF's own
`tf.lite.Interpreter` being deprecated), 'onnx' (onnxruntime, CPU) and
'stablehlo' (`jax.export.deserialize`). `read_info` gives the image size,
preprocessing and labels an exported file was made with (its `PATH.json`
from mixer.export), so `mixer.predict --backend=...` prepares images the way
the trained model saw them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from mixer import export, paths

BACKENDS = ('jax', 'saved_model', 'tflite', 'onnx', 'stablehlo')
Runner = Callable[[np.ndarray], np.ndarray]


class ServingError(ValueError):
  """An exported file that cannot be run as asked."""


def _check_exists(backend: str, path: str) -> None:
  if not paths.exists(path):
    raise ServingError(f'{path}: no such file for --backend={backend}. Export it first: '
                       f'python -m mixer.export --weights=W.npz --format={backend} --out={path}')


def read_info(backend: str, path: str) -> dict[str, Any]:
  """Image size, preprocessing, labels, ... of a .npz ('jax') or an exported file."""
  if backend == 'jax':
    return export.load_servable(path).info
  info_file = export.info_path(path)
  if not paths.exists(info_file):
    raise ServingError(
        f'{info_file}: missing; mixer.export writes it beside {path} (image size, '
        'preprocessing, labels). Re-export the model with python -m mixer.export.')
  return json.loads(paths.read_bytes(info_file))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Exported(export.ServingInfo):
  """An exported model ready to run, with what `mixer.predict` needs around it."""
  run: Runner

  def compiled_logits(self) -> Runner:
    """As `export.Servable.compiled_logits`: the exported model, already compiled."""
    return self.run


def load_exported(backend: str, path: str, *, image_size: int | None = None,
                  labels: str | None = None) -> Exported:
  """The runner of an exported file and its settings (PATH.json); `labels` overrides them.

  Raises:
    ServingError: unknown backend, missing file or info, or an image size
      other than the exported one.
    export.ExportError: labels that do not fit the head.
  """
  run = make_runner(backend, path)
  info = read_info(backend, path)
  if image_size is not None and image_size != info['image_size']:
    raise ServingError(
        f'{path} was exported at {info["image_size"]} px; --image_size={image_size} needs '
        f'another export: python -m mixer.export --image_size={image_size} ...')
  names, _ = export.resolve_labels(labels if labels is not None else info['labels'],
                                   info['num_classes'],
                                   '--labels' if labels is not None else export.info_path(path))
  return Exported(run=run, image_size=info['image_size'], pp=info['preprocessing']['pp'],
                  crop_fraction=float(info['preprocessing']['crop_fraction']),
                  label_names=tuple(names), info=info)


def _jax_runner(path: str) -> Runner:
  servable = export.load_servable(path)
  apply = servable.compiled_logits()
  return lambda images: np.asarray(apply(np.asarray(images, np.float32)))


def _saved_model_runner(path: str) -> Runner:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  loaded = tf.saved_model.load(path)
  serve = loaded.signatures['serving_default']
  return lambda images: serve(images=tf.constant(images, tf.float32))['logits'].numpy()


def _tflite_runner(path: str, num_threads: int | None) -> Runner:
  from ai_edge_litert import interpreter as litert  # pylint: disable=g-import-not-at-top
  interpreter = litert.Interpreter(model_path=path, num_threads=num_threads or os.cpu_count())
  (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
  allocated = [None]

  def run(images):
    images = np.asarray(images, np.float32)
    # The batch is dynamic (-1 in the signature): size the tensors for this one.
    if allocated[0] != images.shape:
      interpreter.resize_tensor_input(inp['index'], images.shape, strict=True)
      interpreter.allocate_tensors()
      allocated[0] = images.shape
    interpreter.set_tensor(inp['index'], images)
    interpreter.invoke()
    return interpreter.get_tensor(out['index']).copy()

  return run


def _onnx_runner(path: str, num_threads: int | None) -> Runner:
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  options = ort.SessionOptions()
  if num_threads:
    options.intra_op_num_threads = num_threads
  session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
  name = session.get_inputs()[0].name
  return lambda images: session.run(None, {name: np.asarray(images, np.float32)})[0]


def _stablehlo_runner(path: str) -> Runner:
  import jax  # pylint: disable=g-import-not-at-top
  exported = jax.export.deserialize(bytearray(paths.read_bytes(path)))
  call = jax.jit(exported.call)
  return lambda images: np.asarray(call(np.asarray(images, np.float32)))


def make_runner(backend: str, path: str, *, num_threads: int | None = None) -> Runner:
  """A function float32 images `[b, S, S, 3]` in [-1, 1] -> logits `[b, classes]` (numpy).

  `num_threads` (tflite, onnx): CPU threads; default: the runtime's (all cores).

  Raises:
    ServingError: unknown backend or missing file.
    weights.WeightsError: ('jax') unreadable weights.
  """
  if backend not in BACKENDS:
    raise ServingError(f'--backend={backend!r} is not a backend; use one of '
                       f'{", ".join(BACKENDS)}.')
  if backend == 'jax':
    return _jax_runner(path)  # load_npz says what is wrong with a bad .npz.
  _check_exists(backend, path)
  if backend == 'saved_model':
    return _saved_model_runner(path)
  if backend == 'tflite':
    return _tflite_runner(path, num_threads)
  if backend == 'onnx':
    return _onnx_runner(path, num_threads)
  return _stablehlo_runner(path)
