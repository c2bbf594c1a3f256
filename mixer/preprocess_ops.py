"""Image preprocessing ops for the input pipeline: pure TF, stateless seeds.

Every op here is a plain TF function of tensors. It runs the same eagerly and
inside `tf.data.Dataset.map` (the tests check both), and every random choice
comes from an explicit stateless seed (a `[2]` int64 tensor), so a pipeline
built from these ops is a function of (config.seed, example index) alone: the
same run gives the same pixels, and a resumed run gives the pixels the
uninterrupted run would have given.

Image dtypes follow big_vision: decode gives uint8 `[H, W, 3]`; the geometric
ops and RandAugment keep the input dtype (uint8 in, uint8 out, rounded and
clipped); `value_range` gives float32 in [-1, 1]; `mixup` works on float32
batches.

Ops:
  decode, decode_and_inception_crop, inception_crop   (train)
  flip_left_right, randaugment                        (train)
  resize, resize_small, central_crop                  (train and eval)
  eval_transform, decode_and_eval_transform           (eval, predict, export)
  value_range, multi_hot, mixup
  example_seed, split_seed                            (seed plumbing)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import tensorflow as tf

# Folded into the user's seed so that the per-example streams of this module do
# not coincide with other uses of the same integer seed.
_EXAMPLE_SALT = 0x6D6978  # "mix"
_RNG_ALG = 'philox'  # Explicit, so results do not depend on TF's device choice.


# ----------------------------------------------------------------------------
# Seeds.
# ----------------------------------------------------------------------------
def example_seed(seed: int | tf.Tensor, index: int | tf.Tensor) -> tf.Tensor:
  """The stateless seed `[2]` int64 of example `index` under run seed `seed`."""
  base = tf.stack([tf.cast(seed, tf.int64), tf.constant(_EXAMPLE_SALT, tf.int64)])
  return tf.random.experimental.stateless_fold_in(
      base, tf.cast(index, tf.int64), alg=_RNG_ALG)


def split_seed(seed: tf.Tensor, num: int) -> tf.Tensor:
  """`num` independent seeds `[num, 2]` derived from `seed`."""
  return tf.random.experimental.stateless_split(seed, num, alg=_RNG_ALG)


# ----------------------------------------------------------------------------
# Decoding and crops.
# ----------------------------------------------------------------------------
def _set_rgb_shape(image: tf.Tensor) -> tf.Tensor:
  image.set_shape([None, None, 3])
  return image


def decode(data: tf.Tensor) -> tf.Tensor:
  """Decodes JPEG/PNG/GIF/BMP bytes to uint8 `[H, W, 3]` (grey becomes RGB)."""
  return _set_rgb_shape(
      tf.io.decode_image(data, channels=3, expand_animations=False))


def _sample_inception_window(image_shape, seed, min_area, aspect_range):
  """(offset [y, x, 0], size [h, w, -1]) of a random Inception-style crop."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape,
      # No object boxes: the whole image is the "object", as in the paper's
      # (vision_transformer's) Inception crop.
      bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
      seed=seed,
      min_object_covered=0.0,
      aspect_ratio_range=aspect_range,
      area_range=(min_area, 1.0),
      use_image_if_no_bounding_boxes=True)
  return begin, size


def _resize_to(image: tf.Tensor, height, width, method: str = 'bilinear') -> tf.Tensor:
  """Resize (no antialiasing) that keeps the input dtype (uint8 is rounded, clipped).

  big_vision clips and casts, which truncates uint8 (a -0.5 level bias on
  average); we round instead. That is the one place where pixels may differ
  from big_vision's by one level.
  """
  dtype = image.dtype
  resized = tf.image.resize(image, [height, width], method=method, antialias=False)
  if dtype.is_integer:
    resized = tf.clip_by_value(tf.round(resized), dtype.min, dtype.max)
  return tf.cast(resized, dtype)


def inception_crop(image: tf.Tensor, seed: tf.Tensor, size: int,
                   min_area: float = 0.05,
                   aspect_range: Sequence[float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """Random crop of `min_area`..100% of the area, resized to `size`x`size`."""
  begin, crop_size = _sample_inception_window(tf.shape(image), seed, min_area, aspect_range)
  crop = tf.slice(image, begin, crop_size)
  return _set_rgb_shape(_resize_to(crop, size, size))


def decode_and_inception_crop(data: tf.Tensor, seed: tf.Tensor, size: int,
                              min_area: float = 0.05,
                              aspect_range: Sequence[float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """`inception_crop(decode(data), ...)`, decoding only the crop for JPEGs.

  For JPEG bytes only the crop window is decoded (`decode_and_crop_jpeg`),
  which is what makes 224px training affordable on the host; other formats are
  decoded whole and cropped. Both paths sample the same window from the same
  seed, so the result equals `inception_crop(decode(data), seed, ...)` exactly
  for non-JPEGs and up to libjpeg's chroma upsampling at the window's edge
  (a few pixel values on the border) for JPEGs.
  """

  def jpeg_path():
    shape = tf.image.extract_jpeg_shape(data)
    begin, crop_size = _sample_inception_window(shape, seed, min_area, aspect_range)
    window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
    return _set_rgb_shape(tf.image.decode_and_crop_jpeg(data, window, channels=3))

  def generic_path():
    image = decode(data)
    begin, crop_size = _sample_inception_window(tf.shape(image), seed, min_area, aspect_range)
    return tf.slice(image, begin, crop_size)

  crop = tf.cond(tf.io.is_jpeg(data), jpeg_path, generic_path)
  return _set_rgb_shape(_resize_to(crop, size, size))


def resize(image: tf.Tensor, size: int | Sequence[int]) -> tf.Tensor:
  """Resizes to `size` (int: square) ignoring the aspect ratio; keeps dtype."""
  height, width = (size, size) if isinstance(size, int) else size
  return _resize_to(image, height, width)


# big_vision's `resize_small` defaults: `get_resize_small(smaller_size,
# method="area", antialias=False)` in big_vision/pp/ops_image.py (its docstring:
# "`area` is a meaningful, bwd-compat default"); its `resize` is bilinear,
# antialias=False. The Mixer configs (configs/mlp_mixer_i1k.py) use both
# defaults, so the eval numbers of the released weights were measured with them.
RESIZE_SMALL_METHOD = 'area'


def resize_small(image: tf.Tensor, smaller_size: int,
                 method: str = RESIZE_SMALL_METHOD) -> tf.Tensor:
  """Resizes so that the shorter side is `smaller_size`, keeping the aspect.

  Sizes are computed as big_vision's `_resize_factor`: each side times
  smaller_size / min(H, W) in float32, rounded.
  """
  shape = tf.shape(image)
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  ratio = tf.cast(smaller_size, tf.float32) / tf.minimum(height, width)
  new_height = tf.cast(tf.round(height * ratio), tf.int32)
  new_width = tf.cast(tf.round(width * ratio), tf.int32)
  return _resize_to(image, new_height, new_width, method=method)


def central_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """Central `size`x`size` crop (the image must be at least that large)."""
  shape = tf.shape(image)
  top = (shape[0] - size) // 2
  left = (shape[1] - size) // 2
  return tf.image.crop_to_bounding_box(image, top, left, size, size)


def flip_left_right(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Mirrors the image horizontally with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def value_range(image: tf.Tensor, vmin: float = -1.0, vmax: float = 1.0) -> tf.Tensor:
  """Maps [0, 255] to float32 [vmin, vmax]; for (-1, 1) this is (x-127.5)/127.5."""
  image = tf.cast(image, tf.float32)
  return vmin + image * ((vmax - vmin) / 255.0)


# ----------------------------------------------------------------------------
# The evaluation transform: the one implementation used by the evaluators,
# few-shot, mixer.predict and the export tools.
# ----------------------------------------------------------------------------
# 'resmall_crop': big_vision's `resize_small(S/f)|central_crop(S)` (the paper's
#   Table 3 "resmall-crop"; S=224, f=0.875 gives 256 -> 224), area resize.
# 'resize_crop':  `resize(S/f)|central_crop(S)`, bilinear (ignores the aspect).
# 'resize':       `resize(S)`, bilinear (vision_transformer's fine-tuning eval).
EVAL_PP = ('resmall_crop', 'resize_crop', 'resize')
# The resize method each eval pp uses (written into the weights' sidecar).
EVAL_RESIZE_METHOD = {'resmall_crop': RESIZE_SMALL_METHOD, 'resize_crop': 'bilinear',
                      'resize': 'bilinear'}


def check_eval_pp(pp: str, crop_fraction: float, *, where: str = 'pp') -> None:
  """Raises ValueError naming `where` for an unknown pp or a bad crop fraction."""
  if pp not in EVAL_PP:
    raise ValueError(f'{where}={pp!r} is not an evaluation preprocessing; use one of '
                     f'{EVAL_PP}.')
  if not 0 < crop_fraction <= 1:
    raise ValueError(f'crop_fraction={crop_fraction} must be in (0, 1] (0.875 = 224/256).')


def eval_transform(image: tf.Tensor, *, image_size: int, pp: str,
                   crop_fraction: float = 0.875) -> tf.Tensor:
  """uint8 `[H, W, 3]` -> float32 `[image_size, image_size, 3]` in [-1, 1].

  Args:
    image: a decoded uint8 RGB image of any size.
    image_size: the model's input side S.
    pp: one of EVAL_PP (see the table above).
    crop_fraction: crop side over resize side for the *_crop modes
      (0.875 = 224/256); ignored by 'resize'.
  """
  check_eval_pp(pp, crop_fraction)
  if pp == 'resize':
    image = resize(image, image_size)
  else:
    resize_to = int(round(image_size / crop_fraction))
    if pp == 'resmall_crop':
      image = resize_small(image, resize_to)
    else:
      image = resize(image, resize_to)
    image = central_crop(image, image_size)
  return tf.ensure_shape(value_range(image), [image_size, image_size, 3])


def decode_and_eval_transform(data: tf.Tensor, *, image_size: int, pp: str,
                              crop_fraction: float = 0.875) -> tf.Tensor:
  """`eval_transform(decode(data), ...)` for encoded JPEG/PNG/GIF/BMP bytes."""
  return eval_transform(decode(data), image_size=image_size, pp=pp,
                        crop_fraction=crop_fraction)


# ----------------------------------------------------------------------------
# Labels and mixup.
# ----------------------------------------------------------------------------
def multi_hot(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
  """int64 `[k]` class ids -> float32 `[num_classes]` with ones at them.

  One id gives a one-hot row, several a multi-hot row, none an all-zero row.
  An id outside [0, num_classes) is an error (tf.one_hot would silently drop it).
  """
  labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
  check = tf.debugging.Assert(
      tf.reduce_all((labels >= 0) & (labels < num_classes)),
      ['Label id out of range [0, num_classes); num_classes =', num_classes,
       'labels =', labels,
       '. Set config.num_classes to the number of classes of the dataset.'])
  with tf.control_dependencies([check]):
    hot = tf.one_hot(labels, num_classes, dtype=tf.float32)
  return tf.minimum(tf.reduce_sum(hot, axis=0), 1.0)


def _stateless_beta(seed: tf.Tensor, concentration: float) -> tf.Tensor:
  """One Beta(c, c) sample from two stateless Gamma(c) samples."""
  seeds = split_seed(seed, 2)
  gamma_a = tf.random.stateless_gamma([], seeds[0], alpha=concentration)
  gamma_b = tf.random.stateless_gamma([], seeds[1], alpha=concentration)
  return gamma_a / tf.maximum(gamma_a + gamma_b, 1e-12)


def mixup(images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor, p: float
          ) -> tuple[tf.Tensor, tf.Tensor]:
  """Mixes each example with its neighbour in the batch (big_vision's mixup).

  One ratio r ~ Beta(p, p), folded to max(r, 1-r) so the example keeps the
  larger share, per batch; example i is mixed with example i-1 (the batch
  rolled by one), images and labels with the same weights.

  Args:
    images: float `[B, H, W, C]`.
    labels: float `[B, num_classes]` one-hot or multi-hot.
    seed: stateless seed of this batch.
    p: Beta concentration; 0 returns the inputs unchanged.

  Returns:
    (mixed images, mixed labels), both float32.
  """
  images = tf.cast(images, tf.float32)
  labels = tf.cast(labels, tf.float32)
  if p <= 0:
    return images, labels
  ratio = _stateless_beta(seed, p)
  ratio = tf.maximum(ratio, 1.0 - ratio)
  mixed_images = ratio * images + (1.0 - ratio) * tf.roll(images, shift=1, axis=0)
  mixed_labels = ratio * labels + (1.0 - ratio) * tf.roll(labels, shift=1, axis=0)
  return mixed_images, mixed_labels


# ----------------------------------------------------------------------------
# RandAugment.
#
# The op set, level->argument mapping and fill value follow big_vision's
# randaug (big_vision/pp/autoaugment.py, copied from the TPU EfficientNet
# autoaugment.py), which the paper's magnitudes 10/15/20 refer to: level is on a
# 0..10 scale and larger values extrapolate (e.g. Rotate at m=15 is up to 45
# degrees). The chosen op is ALWAYS applied, as there: its
# `distort_image_with_randaugment` draws a probability U(0.2, 0.8) per op but
# only passes it to ops that take a `prob` argument (the bounding-box ops of
# AutoAugment, none of the 16 below), and calls the selected op directly.
# Quirks kept on purpose for fidelity: Posterize keeps int(4*m/10) bits and
# Solarize's threshold is 256*m/10, so both get *weaker* as m grows (Solarize is
# the identity from m=10 on). Translate (100 px) and Cutout (40 px) are specified
# there for 224px images; here they are fractions of the image side equal to
# those at 224px, so small images are not translated off-frame.
# ----------------------------------------------------------------------------
_MAX_LEVEL = 10.0
_FILL_VALUE = 128
_TRANSLATE_FRACTION = 100 / 224
_CUTOUT_FRACTION = 40 / 224


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """degenerate + factor * (image - degenerate), clipped to uint8."""
  degenerate = tf.cast(degenerate, tf.float32)
  blended = degenerate + factor * (tf.cast(image, tf.float32) - degenerate)
  return tf.cast(tf.clip_by_value(blended, 0.0, 255.0), tf.uint8)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def _autocontrast(image: tf.Tensor) -> tf.Tensor:
  """Stretches each channel's [min, max] to [0, 255]."""
  def scale_channel(channel):
    channel = tf.cast(channel, tf.float32)
    low, high = tf.reduce_min(channel), tf.reduce_max(channel)
    scaled = (channel - low) * (255.0 / tf.maximum(high - low, 1.0))
    return tf.where(high > low, tf.clip_by_value(scaled, 0.0, 255.0), channel)
  channels = [scale_channel(image[..., c]) for c in range(3)]
  return tf.cast(tf.stack(channels, axis=-1), tf.uint8)


def _equalize(image: tf.Tensor) -> tf.Tensor:
  """Per-channel histogram equalisation (PIL's ImageOps.equalize)."""
  def scale_channel(channel):
    channel = tf.cast(channel, tf.int32)
    histogram = tf.histogram_fixed_width(channel, [0, 255], nbins=256)
    nonzero = tf.boolean_mask(histogram, histogram > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

    def equalized():
      lut = (tf.cumsum(histogram) + step // 2) // tf.maximum(step, 1)
      lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
      return tf.gather(lut, channel)

    # A channel with a single value (step 0) is left as it is.
    return tf.cond(step > 0, equalized, lambda: channel)

  channels = [scale_channel(image[..., c]) for c in range(3)]
  return tf.cast(tf.stack(channels, axis=-1), tf.uint8)


def _transform(image: tf.Tensor, transform: tf.Tensor) -> tf.Tensor:
  """Projective transform (output -> input mapping), nearest, grey fill."""
  shape = tf.shape(image)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.reshape(tf.cast(transform, tf.float32), [1, 8]),
      output_shape=shape[:2], fill_value=float(_FILL_VALUE),
      interpolation='NEAREST', fill_mode='CONSTANT')
  return out[0]


def _rotate(image: tf.Tensor, degrees) -> tf.Tensor:
  shape = tf.cast(tf.shape(image), tf.float32)
  height, width = shape[0], shape[1]
  angle = degrees * (math.pi / 180.0)
  cos, sin = tf.cos(angle), tf.sin(angle)
  # Rotation about the image centre, expressed as the output->input map.
  x_offset = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2.0
  y_offset = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2.0
  return _transform(image, tf.stack([cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0]))


def _shear_x(image, level):
  return _transform(image, tf.stack([1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def _shear_y(image, level):
  return _transform(image, tf.stack([1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0]))


def _translate_x(image, fraction):
  pixels = fraction * tf.cast(tf.shape(image)[1], tf.float32)
  return _transform(image, tf.stack([1.0, 0.0, -pixels, 0.0, 1.0, 0.0, 0.0, 0.0]))


def _translate_y(image, fraction):
  pixels = fraction * tf.cast(tf.shape(image)[0], tf.float32)
  return _transform(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, -pixels, 0.0, 0.0]))


def _cutout(image: tf.Tensor, fraction, seed: tf.Tensor) -> tf.Tensor:
  """Fills a square of half-side `fraction * min(H, W)` at a random centre."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  pad = tf.cast(fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
  centre = tf.random.stateless_uniform([2], seed, minval=0, maxval=tf.int32.max,
                                       dtype=tf.int32) % tf.stack([height, width])
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  inside = ((rows >= centre[0] - pad) & (rows < centre[0] + pad) &
            (cols >= centre[1] - pad) & (cols < centre[1] + pad))
  return tf.where(inside[..., None], tf.constant(_FILL_VALUE, tf.uint8), image)


def _sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel,
                                  strides=[1, 1, 1, 1], padding='VALID')[0]
  smooth = tf.round(tf.clip_by_value(smooth, 0.0, 255.0))
  # The 1-pixel border has no full neighbourhood; it keeps its original value.
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  border = tf.pad(tf.zeros(tf.shape(smooth)[:2] - 2, tf.bool), [[1, 1], [1, 1]],
                  constant_values=True)
  degenerate = tf.where(border[..., None], tf.cast(image, tf.float32), smooth)
  return _blend(degenerate, image, factor)


def _contrast(image: tf.Tensor, factor) -> tf.Tensor:
  mean = tf.reduce_mean(tf.cast(tf.image.rgb_to_grayscale(image), tf.float32))
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def _solarize(image: tf.Tensor, threshold) -> tf.Tensor:
  return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def _solarize_add(image: tf.Tensor, addition) -> tf.Tensor:
  added = tf.cast(tf.clip_by_value(tf.cast(image, tf.int32) + addition, 0, 255), tf.uint8)
  return tf.where(image < 128, added, image)


def _posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
  if bits <= 0:  # A shift by 8 is undefined for uint8; keeping 0 bits is black.
    return tf.zeros_like(image)
  shift = tf.constant(8 - min(bits, 8), tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


# The op list of big_vision's randaug, in its order.
RANDAUG_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize',
               'Solarize', 'Color', 'Contrast', 'Brightness', 'Sharpness',
               'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout',
               'SolarizeAdd')


def _randaug_branches(image: tf.Tensor, magnitude: float, sign, seed):
  """One zero-argument function per op in RANDAUG_OPS (for tf.switch_case)."""
  level = magnitude / _MAX_LEVEL
  enhance = level * 1.8 + 0.1
  return [
      lambda: _autocontrast(image),
      lambda: _equalize(image),
      lambda: 255 - image,
      lambda: _rotate(image, sign * level * 30.0),
      lambda: _posterize(image, int(level * 4)),
      lambda: _solarize(image, int(level * 256)),
      lambda: _blend(_grayscale(image), image, enhance),
      lambda: _contrast(image, enhance),
      lambda: _blend(tf.zeros_like(image), image, enhance),
      lambda: _sharpness(image, enhance),
      lambda: _shear_x(image, sign * level * 0.3),
      lambda: _shear_y(image, sign * level * 0.3),
      lambda: _translate_x(image, sign * level * _TRANSLATE_FRACTION),
      lambda: _translate_y(image, sign * level * _TRANSLATE_FRACTION),
      lambda: _cutout(image, level * _CUTOUT_FRACTION, seed),
      lambda: _solarize_add(image, int(level * 110)),
  ]


def randaugment(image: tf.Tensor, seed: tf.Tensor, num_layers: int = 2,
                magnitude: float = 15) -> tf.Tensor:
  """RandAugment(num_layers, magnitude) on a uint8 `[H, W, 3]` image.

  Each layer picks one of RANDAUG_OPS uniformly and always applies it (as
  big_vision, see above); rotate/shear/translate get a random sign.

  Args:
    image: uint8 `[H, W, 3]`.
    seed: stateless seed of this example's RandAugment.
    num_layers: ops applied in sequence (the paper: 2).
    magnitude: strength on big_vision's scale (the paper: 10, 15 or 20).

  Returns:
    uint8 `[H, W, 3]`.
  """
  if image.dtype != tf.uint8:
    raise TypeError(f'randaugment expects a uint8 image, got {image.dtype}; apply it '
                    'before value_range.')
  layer_seeds = split_seed(seed, num_layers)
  for layer in range(num_layers):
    image = _randaug_layer(image, layer_seeds[layer], magnitude)
  return image


def _randaug_layer(image: tf.Tensor, seed: tf.Tensor, magnitude: float) -> tf.Tensor:
  """One RandAugment layer: a uniformly chosen op, always applied."""
  op_seed, sign_seed, cutout_seed = tf.unstack(split_seed(seed, 3))
  op_index = tf.random.stateless_uniform(
      [], op_seed, minval=0, maxval=len(RANDAUG_OPS), dtype=tf.int32)
  sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
  branches = _randaug_branches(image, float(magnitude), sign, cutout_seed)
  return _set_rgb_shape(tf.cast(tf.switch_case(op_index, branches), tf.uint8))
