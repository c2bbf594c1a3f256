"""mixer.export / mixer.serving: every format against the JAX model.

Fast: ONNX and StableHLO on a small Mixer's released-layout weights (batch 1
and 7, and at twice the trained resolution), the errors, atomic writes.
Slow: SavedModel and TFLite on the same weights; then a digits model trained
here by `python -m mixer.main`, whose 360 test digits every format must
classify as JAX does (all of them in float, >= 99% quantized), and the
SavedModel's `predict_images` against `mixer.predict` on sklearn's photos.
"""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from mixer import export, models, serving, surgery
from mixer import weights as weights_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 32
_FLOAT_FORMATS = [('saved_model', None), ('tflite', None), ('onnx', None), ('stablehlo', None)]
_SUFFIX = {'saved_model': '', 'tflite': '.tflite', 'onnx': '.onnx', 'stablehlo': '.stablehlo'}


def _out(directory, fmt, quantize=None):
  return os.path.join(str(directory), f'model_{fmt}{"_" + quantize if quantize else ""}'
                      f'{_SUFFIX[fmt]}')


def _relative_error(got, want):
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.fixture(scope='module')
def small_weights(tmp_path_factory):
  """A small Mixer's released-layout .npz (no sidecar, as Google's files), random weights.

  The head and every other weight get noise (a fresh init has a zero head,
  whose logits would all be equal).
  """
  model = models.MlpMixer(num_classes=10, patch_size=4, hidden_dim=32, num_blocks=2,
                          tokens_mlp_dim=16, channels_mlp_dim=64)
  params = models.unbox(model.init(jax.random.key(0), np.zeros([1, IMAGE_SIZE, IMAGE_SIZE, 3],
                                                              np.float32))['params'])
  rng = np.random.RandomState(1)
  params = jax.tree.map(lambda a: np.asarray(a) + rng.normal(0, 0.2, a.shape).astype(np.float32),
                        params)
  path = str(tmp_path_factory.mktemp('small') / 'weights.npz')
  weights_lib.save_npz(params, path)
  return path


def _images(batch, size=IMAGE_SIZE, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def _export_and_compare_with_jax(weights, tmp_path, fmt, batches) -> str:
  """Exports `weights` as `fmt` and checks its logits against JAX's at each batch size."""
  out = _out(tmp_path, fmt)
  export.export(weights, fmt, out)
  want = serving.make_runner('jax', weights)(_images(7))
  run = serving.make_runner(fmt, out)
  for batch in batches:
    assert _relative_error(run(_images(7)[:batch]), want[:batch]) < 1e-4
  return out


@pytest.mark.parametrize('fmt', ['onnx', 'stablehlo'])
def test_fast_formats_match_jax_at_batch_1_and_7(small_weights, tmp_path, fmt):
  _export_and_compare_with_jax(small_weights, tmp_path, fmt, (1, 7))


def test_onnx_graph_has_opset_17_and_a_dynamic_batch(small_weights, tmp_path):
  import onnx
  out = _out(tmp_path, 'onnx')
  export.export(small_weights, 'onnx', out)
  model = onnx.load(out)
  onnx.checker.check_model(model, full_check=True)
  assert model.opset_import[0].version >= 17
  (dims,) = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
             for i in model.graph.input]
  assert dims == ['batch', IMAGE_SIZE, IMAGE_SIZE, 3]


def test_export_at_twice_the_resolution_matches_the_adapted_jax_model(small_weights, tmp_path):
  """--image_size=64 adapts the weights (App. C) exactly as mixer.predict's JAX path does."""
  out = _out(tmp_path, 'onnx')
  servable = export.export(small_weights, 'onnx', out, image_size=2 * IMAGE_SIZE)
  images = _images(3, 2 * IMAGE_SIZE)
  want = np.asarray(servable.logits(images))
  assert servable.model.tokens_mlp_dim == 4 * 16
  assert _relative_error(serving.make_runner('onnx', out)(images), want) < 1e-4
  info = serving.read_info('onnx', out)
  assert info['image_size'] == 2 * IMAGE_SIZE and info['format'] == 'onnx'
  # A released file has no sidecar: the paper's eval preprocessing, class numbers as names.
  assert info['preprocessing']['pp'] == 'resmall_crop'
  assert info['labels'] is None and servable.label_names[:2] == ('0', '1')


def test_bad_inputs_are_clear_errors(small_weights, tmp_path):
  bad = tmp_path / 'bad.npz'
  bad.write_bytes(b'<html>not found</html>')
  with pytest.raises(surgery.WeightsError, match='not an .npz'):
    export.export(str(bad), 'onnx', str(tmp_path / 'x.onnx'))
  with pytest.raises(export.ExportError, match='not a known format.*saved_model'):
    export.export(small_weights, 'coreml', str(tmp_path / 'x'))
  with pytest.raises(export.ExportError, match='only --format=tflite is quantized'):
    export.export(small_weights, 'onnx', str(tmp_path / 'x.onnx'), quantize='int8')
  with pytest.raises(surgery.WeightsError, match='Cannot adapt from 32 px to 48 px'):
    export.export(small_weights, 'onnx', str(tmp_path / 'x.onnx'), image_size=48)
  with pytest.raises(export.ExportError, match='3 names but the head has 10'):
    labels = tmp_path / 'labels.txt'
    labels.write_text('a\nb\nc\n')
    export.export(small_weights, 'onnx', str(tmp_path / 'x.onnx'), labels=str(labels))
  with pytest.raises(export.ExportError, match='is a directory.*writes one file'):
    export.export(small_weights, 'onnx', str(tmp_path))
  with pytest.raises(export.ExportError, match='would overwrite the sidecar'):
    export.export(small_weights, 'saved_model', small_weights[:-len('.npz')])
  with pytest.raises(serving.ServingError, match='Export it first'):
    serving.make_runner('onnx', str(tmp_path / 'missing.onnx'))
  with pytest.raises(serving.ServingError, match='not a backend'):
    serving.make_runner('torch', small_weights)
  assert not list(tmp_path.glob('x*'))  # Nothing half-written.


def test_onnx_over_the_protobuf_limit_is_refused_with_an_alternative(small_weights, tmp_path,
                                                                     monkeypatch):
  from mixer import export_onnx
  monkeypatch.setattr(export_onnx, '_PROTOBUF_LIMIT', 1000)  # As if the weights took > 2 GiB.
  with pytest.raises(ValueError, match='over the 2 GiB limit.*saved_model or stablehlo'):
    export.export(small_weights, 'onnx', str(tmp_path / 'x.onnx'))
  assert not list(tmp_path.iterdir())


def test_cli_error_is_one_line(small_weights, tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'mixer.export', f'--weights={small_weights}', '--format=coreml',
       f'--out={tmp_path / "x"}'], capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith("error: --format='coreml' is not")


def test_failed_export_keeps_the_previous_file_and_directory(small_weights, tmp_path,
                                                              monkeypatch):
  onnx_out, sm_out = _out(tmp_path, 'onnx'), _out(tmp_path, 'saved_model')
  with open(onnx_out, 'wb') as f:
    f.write(b'previous')
  os.makedirs(sm_out)
  with open(os.path.join(sm_out, 'saved_model.pb'), 'wb') as f:
    f.write(b'previous')

  def fail(*args, **kwargs):
    raise RuntimeError('killed mid-export')

  def write_half_then_fail(servable, directory, **kwargs):
    with open(os.path.join(directory, 'saved_model.pb'), 'wb') as f:
      f.write(b'half')
    fail()

  monkeypatch.setattr(export, 'onnx_bytes', fail)
  monkeypatch.setattr(export, 'write_saved_model', write_half_then_fail)
  for fmt, out in (('onnx', onnx_out), ('saved_model', sm_out)):
    with pytest.raises(RuntimeError, match='killed'):
      export.export(small_weights, fmt, out)
  with open(onnx_out, 'rb') as f:
    assert f.read() == b'previous'
  with open(os.path.join(sm_out, 'saved_model.pb'), 'rb') as f:
    assert f.read() == b'previous'
  assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in (onnx_out, sm_out))


@pytest.mark.slow
@pytest.mark.parametrize('fmt', ['saved_model', 'tflite'])
def test_tf_formats_match_jax_at_batch_1_and_7(small_weights, tmp_path, fmt):
  # Back to 1: the TFLite runner resizes its input each time.
  out = _export_and_compare_with_jax(small_weights, tmp_path, fmt, (1, 7, 1))
  if fmt == 'saved_model':  # Swapped in from a private temporary directory: mode as mkdir's.
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask


# -----------------------------------------------------------------------------
# A digits model trained by the real command, as after `make demo`
# -----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def digits_model(tmp_path_factory):
  """final.npz (+ final.json) of a short `make demo` run, and its 360 test digits."""
  workdir = tmp_path_factory.mktemp('digits')
  subprocess.run(
      [sys.executable, '-m', 'mixer.main', '--config=configs/digits.py', f'--workdir={workdir}',
       '--config.total_steps=100', '--config.checkpoint_every=100'],
      cwd=REPO, check=True, capture_output=True)
  path = str(workdir / 'final.npz')
  info = weights_lib.read_sidecar(path)
  from mixer import preprocess_ops
  from mixer.datasets import digits
  dataset = digits.DigitsSource().read('test').map(
      lambda ex: (preprocess_ops.decode_and_eval_transform(
          ex['image'], image_size=info['image_size'], pp=info['preprocessing']['pp'],
          crop_fraction=info['preprocessing']['crop_fraction']), ex['label']))
  images, labels = next(iter(dataset.batch(1000).as_numpy_iterator()))
  labels = labels.reshape(-1)  # One label per digit ([360, 1] from the source).
  assert images.shape == (360, 32, 32, 3)
  return path, images, labels


_DIGITS_EXPORTS = _FLOAT_FORMATS + [('tflite', 'fp16'), ('tflite', 'int8')]


@pytest.fixture(scope='module')
def digits_exports(digits_model, tmp_path_factory):
  """{(format, quantize): path} of the digits model in every format, made once."""
  directory = tmp_path_factory.mktemp('digits_exports')
  exported = {}
  for fmt, quantize in _DIGITS_EXPORTS:
    exported[fmt, quantize] = _out(directory, fmt, quantize)
    export.export(digits_model[0], fmt, exported[fmt, quantize], quantize=quantize, top_k=3)
  return exported


@pytest.mark.slow
def test_every_format_classifies_the_test_digits_as_jax(digits_model, digits_exports):
  path, images, labels = digits_model
  want = serving.make_runner('jax', path)(images)
  assert np.mean(want.argmax(-1) == labels) > 0.8  # A trained model, not chance.
  for (fmt, quantize), out in digits_exports.items():
    run = serving.make_runner(fmt, out)
    agreement = np.mean(run(images).argmax(-1) == want.argmax(-1))
    if quantize:
      assert agreement >= 0.99, (fmt, quantize, agreement)
    else:
      assert agreement == 1.0, (fmt, agreement)
      for batch in (1, 7):
        assert _relative_error(run(images[:batch]), want[:batch]) < 1e-4, (fmt, batch)


def _sample_photos(directory):
  from PIL import Image
  from sklearn.datasets import load_sample_images
  files = []
  for i, photo in enumerate(load_sample_images().images):  # china.jpg, flower.jpg
    files.append(str(directory / f'photo{i}.jpg'))
    Image.fromarray(photo).save(files[-1], quality=95)
  return files


@pytest.mark.slow
def test_predict_images_signature_agrees_with_mixer_predict(digits_model, digits_exports,
                                                            tmp_path):
  import tensorflow as tf

  from mixer import predict
  files = _sample_photos(tmp_path)
  signature = tf.saved_model.load(digits_exports['saved_model', None]).signatures[
      'predict_images']
  result = signature(image_bytes=tf.constant([pathlib.Path(f).read_bytes() for f in files]))
  assert result['classes'].shape == (2, 3)
  want = predict.predict(None, digits_model[0], files, top_k=3)
  for i, top in enumerate(want):
    assert result['labels'][i, 0].numpy().decode() == top[0][0]
    np.testing.assert_allclose(result['scores'][i].numpy(), [p for _, p in top], atol=1e-4)


@pytest.mark.slow
def test_predict_backends_agree_with_jax(digits_model, digits_exports, tmp_path):
  """`mixer.predict --backend=X --weights=EXPORTED` prints what the .npz gives."""
  from mixer import predict
  files = _sample_photos(tmp_path)
  want = predict.predict(None, digits_model[0], files, top_k=3)
  for (fmt, quantize), out in digits_exports.items():
    if quantize:
      continue
    got = predict.predict(None, out, files, top_k=3, backend=fmt)
    assert [[name for name, _ in top] for top in got] == [
        [name for name, _ in top] for top in want], fmt
    np.testing.assert_allclose([[p for _, p in top] for top in got],
                               [[p for _, p in top] for top in want], atol=1e-4)
  result = subprocess.run(
      [sys.executable, '-m', 'mixer.predict', '--backend=onnx',
       f'--weights={digits_exports["onnx", None]}', '--image_size=64', files[0]],
      capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith('error: ') and (
      'exported at 32 px' in result.stderr)


@pytest.mark.slow
def test_deploy_bench_measures_every_format():
  from mixer.benchmarks import deploy_bench
  rows = deploy_bench.run('Mixer-S_32', image_size=32, repeats=1, big_batch=4, hidden_dim=32,
                          num_blocks=1, tokens_mlp_dim=8, channels_mlp_dim=64)
  assert [r['format'] for r in rows] == [label for label, _, _ in deploy_bench.ROWS]
  for row in rows:
    assert row['file_mib'] > 0 and row['batch1_latency_ms'] > 0 and row['batch4_img_per_s'] > 0
  size = {r['format']: r['file_mib'] for r in rows}
  assert size['TFLite int8 (dynamic range)'] < size['TFLite fp16'] < size['TFLite float32']
  assert deploy_bench.markdown_table(rows).count('\n') == len(rows) + 1
