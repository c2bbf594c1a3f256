"""Builds the ONNX graph of a Mixer directly from its released-format parameters.

Why by hand: in the pinned stack no converter gives a usable model (checked,
see docs/deploy.md): tf2onnx 1.17 does not know the `XlaCallModule` op that
jax2tf emits, `tf2onnx --tflite` fixes the reshapes to one batch size (a
batch of 2 then fails in onnxruntime), and jax2onnx 0.17 needs an
orbax-checkpoint older than ours. Mixer is only reshapes, LayerNorm, matmuls
and GELU, so writing the graph node by node with `onnx.helper` is short, has a
truly dynamic batch (every Reshape keeps the batch as -1), and matches the
JAX model op for op; the tests hold it to 1e-4 of JAX's logits.

The graph, for an image side S, patch p, grid g = S/p, tokens T = g*g:

  images [batch, S, S, 3]  (NHWC float32 in [-1, 1], as the JAX model)
  stem:   Reshape [-1, g, p, g, p, 3] -> Transpose -> Reshape [-1, T, p*p*3]
          -> MatMul (the HWIO conv kernel as [p*p*3, C]) + bias
          (a stride-p conv with a p x p kernel is exactly this patch matmul)
  block:  x += Transpose(MLP_tokens(Transpose(LayerNorm(x))));  x += MLP_channels(LayerNorm(x))
  head:   LayerNorm -> ReduceMean over tokens -> MatMul + bias -> logits [batch, classes]

Opset 17: the first opset with LayerNormalization, so the widest range of
runtimes (onnxruntime, onnxruntime-web, TensorRT, ...) reads the file. GELU is
written out in its tanh form (flax's default, as in the released models)
because the Gelu op only arrived in opset 20.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mixer import models, surgery

OPSET = 17
INPUT_NAME = 'images'
OUTPUT_NAME = 'logits'
# A serialized protobuf must stay under 2 GiB; the graph itself adds a few kB.
_PROTOBUF_LIMIT = 2**31 - 2**24


class _Graph:
  """Collects nodes and initializers, naming each value once."""

  def __init__(self):
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self._count = 0

  def const(self, name: str, value: Any) -> str:
    self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
    return name

  def op(self, op_type: str, *inputs: str, name: str | None = None, **attrs) -> str:
    self._count += 1
    out = f'{name or op_type}_{self._count}'
    self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
    return out


def _f32(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def _layer_norm(g: _Graph, x: str, params: dict, prefix: str) -> str:
  scale = g.const(f'{prefix}/scale', _f32(params['scale']))
  bias = g.const(f'{prefix}/bias', _f32(params['bias']))
  return g.op('LayerNormalization', x, scale, bias, name=prefix, axis=-1,
              epsilon=models.LAYER_NORM_EPSILON)


def _gelu(g: _Graph, x: str, consts: dict[str, str]) -> str:
  """x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), as jax.nn.gelu(approximate=True)."""
  cube = g.op('Mul', g.op('Mul', x, x, name='gelu'), x, name='gelu')
  inner = g.op('Add', x, g.op('Mul', cube, consts['gelu_c'], name='gelu'), name='gelu')
  tanh = g.op('Tanh', g.op('Mul', inner, consts['sqrt_2_over_pi'], name='gelu'), name='gelu')
  cdf = g.op('Mul', g.op('Add', tanh, consts['one'], name='gelu'), consts['half'], name='gelu')
  return g.op('Mul', x, cdf, name='gelu')


def _dense(g: _Graph, x: str, params: dict, prefix: str) -> str:
  kernel = g.const(f'{prefix}/kernel', _f32(params['kernel']))
  bias = g.const(f'{prefix}/bias', _f32(params['bias']))
  return g.op('Add', g.op('MatMul', x, kernel, name=prefix), bias, name=prefix)


def _mlp(g: _Graph, x: str, params: dict, prefix: str, consts: dict[str, str]) -> str:
  y = _gelu(g, _dense(g, x, params['Dense_0'], f'{prefix}/Dense_0'), consts)
  return _dense(g, y, params['Dense_1'], f'{prefix}/Dense_1')


def build(params: Any, image_size: int) -> onnx.ModelProto:
  """The ONNX model of the Mixer with `params` (released layout, with a head) at `image_size`.

  Raises:
    surgery.WeightsError: the tree has no head, or its token count does not
      match `image_size` (adapt the weights first, see mixer.export).
  """
  params = surgery.plain_tree(params)
  arch = surgery.infer_architecture(params)
  p = arch.patch_size
  if not arch.num_classes:
    raise surgery.WeightsError('The weights have no head (head/kernel): nothing to export for '
                               'classification. Fine-tune a head first.')
  grid = image_size // p
  if image_size % p or grid * grid != arch.num_tokens:
    raise surgery.WeightsError(
        f'image_size={image_size} does not give the weights\' {arch.num_tokens} tokens at '
        f'patch {p}; adapt the weights to {image_size} px first (mixer.export does).')
  tokens, hidden = arch.num_tokens, arch.hidden_dim

  g = _Graph()
  consts = {
      'half': g.const('gelu/half', _f32(0.5)),
      'one': g.const('gelu/one', _f32(1.0)),
      'gelu_c': g.const('gelu/c', _f32(0.044715)),
      'sqrt_2_over_pi': g.const('gelu/sqrt_2_over_pi', _f32(math.sqrt(2.0 / math.pi))),
  }
  # Patches in raster order with (row, column, channel) inside each patch, which
  # is the order of the HWIO conv kernel flattened to [p*p*3, C].
  x = g.op('Reshape', INPUT_NAME,
           g.const('stem/split_shape', np.array([-1, grid, p, grid, p, 3], np.int64)),
           name='stem')
  x = g.op('Transpose', x, name='stem', perm=[0, 1, 3, 2, 4, 5])
  x = g.op('Reshape', x, g.const('stem/patch_shape', np.array([-1, tokens, p * p * 3],
                                                               np.int64)), name='stem')
  stem = params['stem']
  x = _dense(g, x, {'kernel': _f32(stem['kernel']).reshape(p * p * 3, hidden),
                    'bias': stem['bias']}, 'stem')
  for i in range(arch.num_blocks):
    block = params[f'MixerBlock_{i}']
    prefix = f'MixerBlock_{i}'
    y = _layer_norm(g, x, block['LayerNorm_0'], f'{prefix}/LayerNorm_0')
    y = g.op('Transpose', y, name=prefix, perm=[0, 2, 1])  # [batch, C, T]: mix along T.
    y = _mlp(g, y, block['token_mixing'], f'{prefix}/token_mixing', consts)
    y = g.op('Transpose', y, name=prefix, perm=[0, 2, 1])
    x = g.op('Add', x, y, name=prefix)
    y = _layer_norm(g, x, block['LayerNorm_1'], f'{prefix}/LayerNorm_1')
    y = _mlp(g, y, block['channel_mixing'], f'{prefix}/channel_mixing', consts)
    x = g.op('Add', x, y, name=prefix)
  x = _layer_norm(g, x, params['pre_head_layer_norm'], 'pre_head_layer_norm')
  x = g.op('ReduceMean', x, name='pool', axes=[1], keepdims=0)
  logits = _dense(g, x, params['head'], 'head')
  g.nodes.append(helper.make_node('Identity', [logits], [OUTPUT_NAME], name=OUTPUT_NAME))

  size = sum(t.ByteSize() for t in g.initializers)
  if size >= _PROTOBUF_LIMIT:
    raise ValueError(
        f'The weights take {size / 2**30:.2f} GiB, over the 2 GiB limit of a single ONNX '
        'file (protobuf); export this model as saved_model or stablehlo instead.')
  graph = helper.make_graph(
      g.nodes, 'mlp_mixer',
      [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                     ['batch', image_size, image_size, 3])],
      [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT,
                                     ['batch', arch.num_classes])],
      initializer=g.initializers)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', OPSET)],
                            producer_name='mixer.export')
  # make_model stamps the newest IR version, which runtimes older than this onnx
  # package refuse; 8 (ONNX 1.10) holds everything opset 17 needs.
  model.ir_version = 8
  onnx.checker.check_model(model, full_check=True)
  return model
