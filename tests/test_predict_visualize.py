"""End-to-end tests of mixer.predict, mixer.visualize and mixer.labels on a tiny saved model."""

import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from mixer import checkpoint, labels, models, predict, visualize

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_IMAGE_SIZE = 32
_CLASS_NAMES = ['apple', 'bridge', 'cloud', 'dragon', 'eel', 'fern']


def _tiny_model():
  return models.MlpMixer(num_classes=len(_CLASS_NAMES), patch_size=8, hidden_dim=16,
                         num_blocks=2, tokens_mlp_dim=6, channels_mlp_dim=32)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A tiny model with random weights (head included), a labels file and two photos."""
  root = tmp_path_factory.mktemp('predict')
  rng = np.random.default_rng(0)
  shapes = checkpoint.model_param_shapes(_tiny_model(), _IMAGE_SIZE)
  # Kernels scaled by 1/sqrt(fan-in) keep the logits O(1), so no probability rounds to 0.
  params = jax.tree.map(
      lambda s: (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(
          np.float32), shapes)
  weights = root / 'tiny.npz'
  checkpoint.save_npz(params, weights)
  label_file = root / 'labels.txt'
  label_file.write_text('\n'.join(_CLASS_NAMES) + '\n')
  photos = []
  for name, pixels in zip(('china.jpg', 'flower.jpg'), load_sample_images().images):
    Image.fromarray(pixels).save(root / name)
    photos.append(str(root / name))
  return {'root': root, 'weights': weights, 'labels': label_file, 'photos': photos,
          'params': params}


def test_predict_top_k_sorted_probabilities_with_label_names(saved):
  results = predict.predict(None, saved['weights'], saved['photos'], labels=str(saved['labels']),
                            top_k=3, image_size=_IMAGE_SIZE)
  assert len(results) == 2
  for top in results:
    assert len(top) == 3
    names, probabilities = zip(*top)
    assert set(names) <= set(_CLASS_NAMES) and len(set(names)) == 3
    assert list(probabilities) == sorted(probabilities, reverse=True)
    assert all(p > 0 for p in probabilities) and sum(probabilities) <= 1 + 1e-6


def test_predict_probabilities_are_the_models_softmax(saved):
  (top,) = predict.predict(None, saved['weights'], saved['photos'][:1],
                           labels=str(saved['labels']), top_k=10, image_size=_IMAGE_SIZE)
  assert len(top) == len(_CLASS_NAMES)  # top_k is capped at the number of classes.
  image = predict.preprocess(saved['photos'][0], _IMAGE_SIZE)[None]
  apply = jax.jit(lambda p, x: _tiny_model().apply({'params': p}, x, train=False))
  logits = np.asarray(apply(saved['params'], image)[0], np.float64)
  expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
  for name, probability in top:
    np.testing.assert_allclose(probability, expected[_CLASS_NAMES.index(name)], rtol=1e-5)
  assert sum(p for _, p in top) == pytest.approx(1.0, abs=1e-5)


def test_predict_adapts_to_a_multiple_of_the_trained_size(saved):
  results = predict.predict(None, saved['weights'], saved['photos'], labels=str(saved['labels']),
                            top_k=2, image_size=2 * _IMAGE_SIZE)
  assert [len(top) for top in results] == [2, 2]


def test_predict_label_count_mismatch_is_a_clear_error(saved, tmp_path):
  short = tmp_path / 'short.txt'
  short.write_text('a\nb\n')
  with pytest.raises(ValueError, match=r"have 2 names but the head of .*tiny\.npz has 6 classes"):
    predict.predict(None, saved['weights'], saved['photos'], labels=str(short),
                    image_size=_IMAGE_SIZE)


def test_predict_without_labels_for_unknown_head_size_asks_for_them(saved):
  with pytest.raises(ValueError, match='6 classes, which matches no built-in label set.*--labels'):
    predict.predict(None, saved['weights'], saved['photos'], image_size=_IMAGE_SIZE)


def test_predict_with_wrong_model_name_names_the_variants(saved):
  with pytest.raises(checkpoint.CheckpointError, match='the model is Mixer-S_32'):
    predict.predict('Mixer-S_32', saved['weights'], saved['photos'], labels=str(saved['labels']),
                    image_size=_IMAGE_SIZE)


def test_preprocess_is_resize_shorter_side_then_central_crop(tmp_path):
  # A 200x100 image: left half black, right half white, a red column in the middle.
  pixels = np.zeros((100, 200, 3), np.uint8)
  pixels[:, 100:] = 255
  pixels[:, 98:102] = (255, 0, 0)
  Image.fromarray(pixels).save(tmp_path / 'wide.png')
  image = predict.preprocess(tmp_path / 'wide.png', 56)
  assert image.shape == (56, 56, 3) and image.dtype == np.float32
  assert image.min() >= -1 and image.max() <= 1
  # Shorter side 100 -> 64 (56 / 0.875), width 128; the central 56 keep the red column centred.
  np.testing.assert_allclose(image[:, 0], -1, atol=1e-6)
  np.testing.assert_allclose(image[:, -1], 1, atol=1e-6)
  assert image[28, 27, 0] > 0.9 and image[28, 27, 1] < -0.5


def test_predict_command_line(saved):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  completed = subprocess.run(
      [sys.executable, '-m', 'mixer.predict', f'--weights={saved["weights"]}',
       f'--labels={saved["labels"]}', '--top_k=2', f'--image_size={_IMAGE_SIZE}',
       *saved['photos']],
      cwd=_REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert completed.returncode == 0, completed.stderr
  lines = completed.stdout.strip().splitlines()
  assert lines[0] == saved['photos'][0] and lines[3] == saved['photos'][1]
  for line in lines[1:3] + lines[4:6]:
    probability, name = line.split(maxsplit=1)
    assert 0 < float(probability) <= 1 and name in _CLASS_NAMES


def test_builtin_label_sets():
  imagenet = labels.get_label_names('imagenet2012')
  assert len(imagenet) == 1000
  assert imagenet[0] == 'tench, Tinca tinca' and imagenet[999].startswith('toilet tissue')
  imagenet21k = labels.get_label_names('imagenet21k')
  assert len(imagenet21k) == 21843 and imagenet21k[0] == 'organism, being'


def test_label_file_and_bad_spec(tmp_path):
  path = tmp_path / 'names.txt'
  path.write_text('n01\tcat\ndog\n\n')
  assert labels.get_label_names(path) == ['cat', 'dog']
  with pytest.raises(ValueError, match="'imagenet1000'.*'imagenet2012' or 'imagenet21k'"):
    labels.get_label_names('imagenet1000')
  path.write_text('cat\n\ndog\n')
  with pytest.raises(ValueError, match=r'line\(s\) \[2\] have no class name'):
    labels.get_label_names(path)


def _documented_png_size(grid, num_units):
  """The size the mixer.visualize docstring promises."""
  cell = grid * math.ceil(32 / grid)
  columns = min(16, num_units + num_units % 2)
  rows = math.ceil(num_units / columns)
  return columns * (cell + 2) + 2, rows * (cell + 2) + 2


@pytest.mark.parametrize('num_units, block', [(None, 0), (5, 1)])
def test_visualize_writes_png_of_documented_size(saved, tmp_path, num_units, block):
  out = visualize.visualize(saved['weights'], tmp_path / 'figs' / 'units.png', block=block,
                            num_units=num_units)
  with Image.open(out) as image:
    assert image.format == 'PNG' and image.mode == 'RGB'
    # 4 tokens (a 2x2 grid) and 6 hidden units in the tiny model.
    assert image.size == _documented_png_size(2, num_units or 6)
    assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 3  # Not blank.


def test_visualize_bad_block_or_count_is_a_clear_error(saved, tmp_path):
  with pytest.raises(ValueError, match='block=2: the checkpoint has blocks 0..1'):
    visualize.visualize(saved['weights'], tmp_path / 'x.png', block=2)
  with pytest.raises(ValueError, match='num_units=7: the MLP has 6 hidden units'):
    visualize.visualize(saved['weights'], tmp_path / 'x.png', num_units=7)


def test_paired_order_puts_opposite_phase_units_together_low_frequency_first():
  grid = 6
  y, x = np.mgrid[:grid, :grid]
  smooth = np.cos(2 * np.pi * x / grid)       # One cycle across the grid.
  fine = np.cos(2 * np.pi * 3 * y / grid)     # Three cycles.
  blob = np.exp(-((x - 2) ** 2 + (y - 3) ** 2))
  units = np.stack([fine, blob, -smooth, -fine, smooth, -blob + 0.01 * x])
  order = visualize.paired_order(units)
  pairs = [set(order[i:i + 2]) for i in range(0, 6, 2)]
  assert {0, 3} in pairs and {2, 4} in pairs and {1, 5} in pairs
  assert pairs[-1] == {0, 3}  # The highest frequency comes last.


def test_visualize_command_line(saved, tmp_path):
  out = tmp_path / 'units.png'
  completed = subprocess.run(
      [sys.executable, '-m', 'mixer.visualize', f'--weights={saved["weights"]}', f'--out={out}',
       '--num_units=4'],
      cwd=_REPO, capture_output=True, text=True, timeout=120, check=False)
  assert completed.returncode == 0, completed.stderr
  with Image.open(out) as image:
    assert image.size == _documented_png_size(2, 4)
