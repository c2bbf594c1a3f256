"""Helpers shared by several test files (import them: `from tests.conftest import ...`)."""

import os

# The suite runs on the CPU backend. `make install` also installs libtpu (the `tpu` extra, so
# that test_compile_check can compile for TPU slices); without this, jax's first backend query
# on a machine without a TPU would try libtpu first. Set before jax is imported (it reads the
# variable then), and inherited by the subprocesses tests start (trainer runs, CLIs).
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402  (after JAX_PLATFORMS)
import numpy as np  # noqa: E402


def random_params(shapes, seed=0, bias_scale=0.2):
  """Non-zero float32 params for a tree of shapes (head included) that keep activations O(1).

  Kernels ~ N(0, 1/fan_in), LayerNorm scales ~ 1 + N(0, 0.2), every bias ~
  N(0, bias_scale): a fresh init's zero head and biases would hide mistakes.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      value = rng.standard_normal(leaf.shape) / np.sqrt(int(np.prod(leaf.shape[:-1])))
    elif name == 'scale':
      value = 1.0 + 0.2 * rng.standard_normal(leaf.shape)
    else:
      value = bias_scale * rng.standard_normal(leaf.shape)
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def relative_error(actual, expected):
  """||actual - expected|| / ||expected|| in float64."""
  expected = np.asarray(expected, np.float64)
  return np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected)
