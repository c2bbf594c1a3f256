"""MLP-Mixer (Tolstikhin et al., 2021) as a Flax linen module.

The parameter tree is exactly the one of Google's released `.npz` checkpoints
(`gs://mixer_models/...`), so released weights load without renaming:

  stem/{kernel,bias}                                   patch embedding: a stride-p conv, kernel HWIO
  MixerBlock_{i}/LayerNorm_0/{scale,bias}
  MixerBlock_{i}/token_mixing/Dense_{0,1}/{kernel,bias}
  MixerBlock_{i}/LayerNorm_1/{scale,bias}
  MixerBlock_{i}/channel_mixing/Dense_{0,1}/{kernel,bias}
  pre_head_layer_norm/{scale,bias}
  head/{kernel,bias}                                   kernel initialised to zeros

Every parameter carries logical axis names (`nn.with_logical_partitioning`), so
the trainer shards it by the rules of `mixer.sharding`; `unbox` gives the
plain arrays that `mixer.weights` reads and writes.

With `scan_blocks=True` the blocks run under `nn.scan` (one compiled block body
instead of `num_blocks` copies: compile time no longer grows with depth), and
their parameters are stacked along a leading 'layers' axis under
`MixerBlocks/...` (e.g. `MixerBlocks/token_mixing/Dense_0/kernel` is
`[num_blocks, S, D_S]`). `mixer.param_layout` converts between that layout and
the released one. `remat` ('none' | 'full' | 'dots') recomputes each block's
activations in the backward pass instead of keeping them ('dots' keeps the
matmul outputs and recomputes only the cheap elementwise ops).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Logical axis names used by the parameters and activations below. The rules that
# map them onto mesh axes live in `mixer.sharding` (and in each config).
BATCH = 'batch'
EMBED = 'embed'              # hidden_dim C: the channels of every token
TOKENS = 'tokens'            # the sequence S of patches
TOKEN_MLP = 'token_mlp'      # hidden width D_S of the token-mixing MLPs
CHANNEL_MLP = 'channel_mlp'  # hidden width D_C of the channel-mixing MLPs
CLASSES = 'classes'
CONV_HEIGHT = 'conv_height'
CONV_WIDTH = 'conv_width'
CONV_IN = 'conv_in'
LAYERS = 'layers'            # the stacked block axis of scanned parameters

# jax.checkpoint policies of `MlpMixer.remat`: what the backward pass may keep.
# 'full' keeps only each block's input; 'dots' also keeps every matmul output
# (Mixer's matmuls have no batch dimensions, so this is checkpoint_dots).
REMAT_POLICIES = {'full': None, 'dots': jax.checkpoint_policies.checkpoint_dots}
# `MlpMixer.residual_dtype`: float32 (the released models' numerics) or bfloat16 (faster).
RESIDUAL_DTYPES = ('float32', 'bfloat16')


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


def _bias_gelu(h, bias):
  """Flax's default GELU, the tanh approximation as in the released models, of `h + bias`."""
  return nn.gelu(h + bias)


# GELU(h + bias) keeping only `h` (the matmul's output) for the backward pass.
# Autodiff of `nn.gelu(dense(x))` keeps both the pre-activation and tanh's output,
# full [batch, tokens, mlp_dim] tensors; recomputing the bias add and the tanh
# from `h` costs a few flops and saves writing and re-reading one of them per
# MLP: in the Mixer-B/16 train step compiled for an H100 at batch 256, 11 GB
# less memory traffic and 5 GiB less memory (docs/benchmarks.md). Not used
# inside `remat` blocks: their policy already recomputes it, and the nested
# checkpoint's barriers cost the TPU scheduler 90 MiB per core (L/16, v3-256).
_bias_gelu_recomputed = jax.checkpoint(_bias_gelu)


class _DenseGelu(nn.Module):
  """GELU(x @ kernel + bias): `nn.Dense`'s parameters, init and math, then `_bias_gelu`."""
  features: int
  in_axis: str
  out_axis: str
  dtype: Any = jnp.float32
  recompute_gelu: bool = True

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', _partitioned(nn.initializers.lecun_normal(),
                                                (self.in_axis, self.out_axis)),
                        (x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', _partitioned(nn.initializers.zeros, (self.out_axis,)),
                      (self.features,), jnp.float32)
    h = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    gelu = _bias_gelu_recomputed if self.recompute_gelu else _bias_gelu
    return gelu(h, bias.astype(self.dtype))


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense, with dropout after each dense layer's activation (timm style)."""
  mlp_dim: int
  in_axis: str
  hidden_axis: str
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  recompute_gelu: bool = True  # False inside remat blocks (see _bias_gelu_recomputed).

  @nn.compact
  def __call__(self, x, *, train: bool):
    out_dim = x.shape[-1]
    y = _DenseGelu(self.mlp_dim, self.in_axis, self.hidden_axis, self.dtype,
                   self.recompute_gelu, name='Dense_0')(x)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = nn.Dense(
        out_dim, dtype=self.dtype, param_dtype=jnp.float32, name='Dense_1',
        kernel_init=_partitioned(nn.initializers.lecun_normal(),
                                 (self.hidden_axis, self.in_axis)),
        bias_init=_partitioned(nn.initializers.zeros, (self.in_axis,)))(y)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


LAYER_NORM_EPSILON = 1e-6  # The released models'; mixer.export_onnx builds the same LayerNorm.


def _layer_norm_statistics(x):
  """Mean and 1/std over the last axis, as flax's LayerNorm computes them (E[x^2] - E[x]^2)."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.maximum(0.0, jnp.mean(jnp.square(x), axis=-1, keepdims=True) - jnp.square(mean))
  return mean, jax.lax.rsqrt(var + LAYER_NORM_EPSILON)


@jax.custom_vjp
def layer_norm(x, scale, bias):
  """LayerNorm over the last axis of float32 `x`, in float32: flax's `nn.LayerNorm` function.

  Its backward pass is written out (the textbook LayerNorm gradient) because
  XLA:GPU splits the autodiff'd one into many kernels that each re-read the
  float32 residual stream: 6.5 GB less memory traffic in the Mixer-B/16 train
  step on an H100 (docs/benchmarks.md).
  """
  return _layer_norm_forward(x, scale, bias)[0]


def _layer_norm_forward(x, scale, bias):
  mean, rstd = _layer_norm_statistics(x)
  return (x - mean) * (rstd * scale) + bias, (x, mean, rstd, scale)


def _layer_norm_backward(residuals, dy):
  x, mean, rstd, scale = residuals
  x_hat = (x - mean) * rstd
  dy_hat = dy * scale
  dx = rstd * (dy_hat - jnp.mean(dy_hat, axis=-1, keepdims=True)
               - x_hat * jnp.mean(dy_hat * x_hat, axis=-1, keepdims=True))
  axes = tuple(range(x.ndim - 1))
  return dx, jnp.sum(dy * x_hat, axis=axes), jnp.sum(dy, axis=axes)


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class LayerNorm(nn.Module):
  """`nn.LayerNorm(epsilon=1e-6)` of the released models (same `scale`/`bias` parameters and
  function), through `layer_norm`; statistics in float32, output cast to `dtype`."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    scale = self.param('scale', _partitioned(nn.initializers.ones, (EMBED,)), features,
                       jnp.float32)
    bias = self.param('bias', _partitioned(nn.initializers.zeros, (EMBED,)), features,
                      jnp.float32)
    return layer_norm(x.astype(jnp.float32), scale, bias).astype(self.dtype)


def drop_path_rate(stoch_depth, index, num_blocks):
  """Stochastic depth of block `index`: linear from 0 (first block) to `stoch_depth` (last)."""
  return stoch_depth * index / max(num_blocks - 1, 1)


def branch_scales(rng: jax.Array, stoch_depth: float, num_blocks: int, batch: int,
                  rescale: bool = False) -> jax.Array:
  """Stochastic depth for a whole forward pass: float32 `[num_blocks, 2, batch]`.

  Per block, per residual branch (token mixing, channel mixing) and per example:
  0 where the branch is dropped (with the block's `drop_path_rate`), else 1, or
  1/(1-p) with `rescale` (timm's DropPath). By default kept branches are NOT
  rescaled, as in the authors' code (big_vision/models/mlp_mixer.py:
  `x + y * _stoch_depth_mask(...)`, a 0/1 mask).

  Drawn once, before the blocks, in one random call: the scanned and the
  unrolled model then drop the same branches for the same rng (each block used
  to draw its own, from rngs that differ between the two layouts).
  """
  rates = drop_path_rate(stoch_depth, jnp.arange(num_blocks, dtype=jnp.float32), num_blocks)
  keep = 1.0 - rates
  kept = jax.random.bernoulli(rng, keep[:, None, None], (num_blocks, 2, batch))
  scale = 1.0 / keep if rescale else jnp.ones_like(keep)
  return jnp.where(kept, scale[:, None, None], 0.0)


def _drop_branch(y, scale):
  """`y` [N, S, C] scaled per example by `scale` [N] (None: stochastic depth off)."""
  if scale is None:
    return y
  scale = scale[:, None, None]
  # where, not only a product: a dropped branch contributes exactly 0, whatever it holds.
  return jnp.where(scale > 0, y * scale, 0.0)


def swap_tokens_and_channels(y):
  """[N, S, C] <-> [N, C, S]: the token MLP mixes along S, so it runs on the swapped layout."""
  return jnp.swapaxes(y, 1, 2)


class MixerBlock(nn.Module):
  """One Mixer layer: token mixing then channel mixing, each pre-LayerNorm and residual."""
  tokens_mlp_dim: int
  channels_mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  recompute_gelu: bool = True

  # `train` may be positional: nn.remat needs it there to treat it as static.
  # `scales`: this block's [2, N] slice of `branch_scales`, or None (no stochastic depth).
  @nn.compact
  def __call__(self, x, train: bool, scales=None):
    token_scale, channel_scale = (None, None) if scales is None else (scales[0], scales[1])
    y = LayerNorm(self.dtype)(x)
    y = swap_tokens_and_channels(y)
    y = MlpBlock(self.tokens_mlp_dim, TOKENS, TOKEN_MLP, self.dropout_rate,
                 self.dtype, self.recompute_gelu, name='token_mixing')(y, train=train)
    y = swap_tokens_and_channels(y)
    x = x + _drop_branch(y, token_scale).astype(x.dtype)  # The residual stream keeps its dtype.
    x = nn.with_logical_constraint(x, (BATCH, None, None))
    y = LayerNorm(self.dtype)(x)
    y = MlpBlock(self.channels_mlp_dim, EMBED, CHANNEL_MLP, self.dropout_rate,
                 self.dtype, self.recompute_gelu, name='channel_mixing')(y, train=train)
    x = x + _drop_branch(y, channel_scale).astype(x.dtype)
    return nn.with_logical_constraint(x, (BATCH, None, None))


class _ScanStep(nn.Module):
  """One MixerBlock as an `nn.scan` body: (x, block's branch scales, train) -> (x, None).

  The block shares this module's scope, so the scanned parameters have the
  block's own names (`MixerBlocks/token_mixing/...`), only stacked.
  """
  tokens_mlp_dim: int
  channels_mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  recompute_gelu: bool = True

  @nn.compact
  def __call__(self, x, scales, train):
    block = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim, self.dropout_rate,
                       self.dtype, self.recompute_gelu)
    nn.share_scope(self, block)
    return block(x, train, scales), None


class PatchEmbedding(nn.Module):
  """The stem: a patch_size x patch_size convolution with stride patch_size, as one matmul.

  Same parameters as the released `nn.Conv` stem (`kernel` HWIO [p, p, 3, C],
  `bias` [C]) and the same function. Non-overlapping patches make the
  convolution a matmul of the flattened patches [N, h, w, p*p*3] with the kernel
  reshaped to [p*p*3, C]. Written so because GPU convolution kernels handle 3
  input channels badly: on an H100 cuDNN's kernel for the B/16 stem ran at
  39 TFLOP/s (1.5 ms of a 66 ms train step at batch 256); as a matmul the step
  is 2.6% faster (docs/benchmarks.md).
  """
  features: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    n, height, width, channels = images.shape
    kernel = self.param('kernel', _partitioned(nn.initializers.lecun_normal(),
                                                (CONV_HEIGHT, CONV_WIDTH, CONV_IN, EMBED)),
                        (p, p, channels, self.features), jnp.float32)
    bias = self.param('bias', _partitioned(nn.initializers.zeros, (EMBED,)),
                      (self.features,), jnp.float32)
    h, w = height // p, width // p
    # [N, h, p, w, p, 3] -> [N, h, w, p, p, 3]: each patch's pixels in the kernel's HWI order.
    patches = images.astype(self.dtype).reshape(n, h, p, w, p, channels)
    patches = jnp.swapaxes(patches, 2, 3).reshape(n, h, w, p * p * channels)
    y = jnp.dot(patches, kernel.astype(self.dtype).reshape(p * p * channels, self.features))
    return y + bias.astype(self.dtype)


class MlpMixer(nn.Module):
  """MLP-Mixer classifier.

  `apply({'params': p}, images, train=False)` takes NHWC float images in [-1, 1]
  (height and width divisible by `patch_size`) and returns logits
  `[N, num_classes]`; with `num_classes=0`, or `return_prelogits=True`, it returns
  the pre-logits: the mean over tokens after the pre-head LayerNorm, `[N, hidden_dim]`.

  `dtype` is the compute dtype of the stem and the MLPs (e.g. bfloat16: their
  matmuls and GELUs run in it); parameters always stay float32, and so do the
  residual stream, the LayerNorm statistics (`LayerNorm` reduces in float32,
  then casts its output to `dtype` for the next matmul), the pre-head LayerNorm,
  the pre-logits and the head. big_vision's Mixer keeps every activation in
  float32 (TPU matmuls already run bf16 passes by default); this keeps the
  parts whose rounding accumulates over depth (the residual sum) or is read
  directly (logits: a bf16 sigmoid logit near its -10 initial bias has steps
  of 0.06) in float32 and the bulk of the FLOPs and activation memory in bf16.
  `residual_dtype='bfloat16'` trades the first of these for speed where the
  step is memory-bound, as MaxText does (its decoder adds each layer's output to
  embeddings cast to its bf16 activation dtype): the stream between blocks, and
  each block's adds, are bf16 (8 significant bits), while the LayerNorm
  statistics, the pre-head LayerNorm and the logits stay float32. On an H100 the
  B/16 train step then moves 13% fewer bytes and runs 10% faster
  (docs/benchmarks.md); it is not the paper's recipe.
  Stochastic depth rises linearly per block from 0 (first block) to
  `stoch_depth` (last block) and, like dropout, is active only with
  `train=True` and needs the `'dropout'` rng. Kept branches are not rescaled
  (big_vision's Mixer); `stoch_depth_rescale=True` scales them by 1/(1-p)
  (timm's DropPath).

  `scan_blocks` and `remat` change how the blocks are compiled and what the
  backward pass keeps, not the function: the same weights (converted with
  `mixer.param_layout`) give the same logits and gradients.
  """
  num_classes: int
  patch_size: int
  hidden_dim: int
  num_blocks: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  dropout_rate: float = 0.0
  stoch_depth: float = 0.0
  dtype: Any = jnp.float32
  scan_blocks: bool = False
  remat: str = 'none'
  stoch_depth_rescale: bool = False
  residual_dtype: str = 'float32'

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_prelogits: bool = False):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'MlpMixer expects NHWC RGB images, got shape {images.shape}.')
    height, width = images.shape[1:3]
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(
          f'Image size {height}x{width} is not divisible by the patch size '
          f'{self.patch_size}: resize the images (e.g. config.image_size) to a multiple of it.')
    if self.residual_dtype not in RESIDUAL_DTYPES:
      raise ValueError(f'MlpMixer.residual_dtype={self.residual_dtype!r}: use one of '
                       f'{list(RESIDUAL_DTYPES)}.')
    x = PatchEmbedding(self.hidden_dim, self.patch_size, self.dtype, name='stem')(images)
    # Mixed precision: the residual stream stays float32 whatever `dtype` is
    # (each block adds its bf16 MLP output to it in float32), as big_vision's
    # Mixer keeps activations in float32, unless `residual_dtype` says otherwise;
    # see the class docstring.
    x = x.astype(self.residual_dtype)
    n, h, w, c = x.shape
    x = jnp.reshape(x, (n, h * w, c))  # Tokens in raster (row-major) order.
    x = nn.with_logical_constraint(x, (BATCH, None, None))
    scales = (branch_scales(self.make_rng('dropout'), self.stoch_depth, self.num_blocks, n,
                            self.stoch_depth_rescale)
              if train and self.stoch_depth else None)
    x = self._blocks(x, train, scales)
    x = LayerNorm(jnp.float32, name='pre_head_layer_norm')(x)
    x = jnp.mean(x, axis=1)
    if self.num_classes == 0 or return_prelogits:
      return x.astype(jnp.float32)
    logits = nn.Dense(
        self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32, name='head',
        kernel_init=_partitioned(nn.initializers.zeros, (EMBED, CLASSES)),
        bias_init=_partitioned(nn.initializers.zeros, (CLASSES,)))(x)
    return logits.astype(jnp.float32)


  def _blocks(self, x, train: bool, scales):
    if self.remat not in ('none', *REMAT_POLICIES):
      raise ValueError(f"MlpMixer.remat={self.remat!r}: use 'none', 'full' or 'dots'.")
    recompute_gelu = self.remat == 'none'  # A remat policy already recomputes it.
    if self.scan_blocks:
      step = _ScanStep
      if self.remat != 'none':
        # 0=self, 1=x, 2=scales, 3=train (static: it selects Python branches). Scan
        # already keeps XLA from merging the recomputation away, so no prevent_cse.
        step = nn.remat(step, prevent_cse=False, static_argnums=(3,),
                        policy=REMAT_POLICIES[self.remat])
      x, _ = nn.scan(
          step, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
          in_axes=(0, nn.broadcast), length=self.num_blocks,
          metadata_params={nn.PARTITION_NAME: LAYERS})(
              self.tokens_mlp_dim, self.channels_mlp_dim, self.dropout_rate, self.dtype,
              recompute_gelu, name='MixerBlocks')(x, scales, train)
      return x
    block = MixerBlock
    if self.remat != 'none':
      block = nn.remat(block, static_argnums=(2,), policy=REMAT_POLICIES[self.remat])
    for i in range(self.num_blocks):
      x = block(self.tokens_mlp_dim, self.channels_mlp_dim, self.dropout_rate, self.dtype,
                recompute_gelu, name=f'MixerBlock_{i}')(x, train,
                                                        None if scales is None else scales[i])
    return x


def unbox(tree):
  """The plain values inside the logical-partitioning boxes of a param tree.

  Unlike `nn.unbox`, applies no sharding constraint, so it also works on
  `jax.eval_shape` results inside a mesh context.
  """
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned)
                      else x, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


@dataclasses.dataclass(frozen=True)
class Variant:
  """The architecture sizes of a paper variant (Table 1); every other field is a training choice."""
  patch_size: int
  hidden_dim: int
  num_blocks: int
  tokens_mlp_dim: int
  channels_mlp_dim: int


# The MlpMixer fields that fix the parameter shapes (besides num_classes).
ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(Variant))


_SIZES = {  # Table 1 of the paper: (hidden C, blocks, D_S, D_C).
    'S': (512, 8, 256, 2048),
    'B': (768, 12, 384, 3072),
    'L': (1024, 24, 512, 4096),
    'H': (1280, 32, 640, 5120),
}
_NAMES = ('Mixer-S_32', 'Mixer-S_16', 'Mixer-S_8', 'Mixer-B_32', 'Mixer-B_16',
          'Mixer-L_32', 'Mixer-L_16', 'Mixer-H_14')


def _variant(name: str) -> Variant:
  size, patch = name[len('Mixer-'):].split('_')
  hidden, blocks, tokens_mlp, channels_mlp = _SIZES[size]
  return Variant(int(patch), hidden, blocks, tokens_mlp, channels_mlp)


VARIANTS: dict[str, Variant] = {name: _variant(name) for name in _NAMES}


def get_model(name: str, **overrides) -> MlpMixer:
  """Returns the paper's variant `name` (e.g. 'Mixer-B_16'), with fields overridden.

  `num_classes` must be given (0 for a head-less feature extractor). Overrides
  set to None keep the variant's value, so configs can pass every field.
  """
  if name not in VARIANTS:
    raise ValueError(f'Unknown model {name!r}; known models: {", ".join(VARIANTS)}.')
  fields = dataclasses.asdict(VARIANTS[name])
  valid = set(fields) | {f.name for f in dataclasses.fields(MlpMixer)
                         if f.name not in ('parent', 'name')}
  unknown = set(overrides) - valid
  if unknown:
    raise ValueError(f'Unknown MlpMixer field(s) {sorted(unknown)}; valid: {sorted(valid)}.')
  fields.update({k: v for k, v in overrides.items() if v is not None})
  if 'num_classes' not in fields:
    raise ValueError(f'get_model({name!r}) needs num_classes (0 for pre-logits only).')
  return MlpMixer(**fields)
