"""Host input pipeline: per-process training and evaluation batches from tf.data.

Training (`create_train_iterator`), per process:

  source.read(split, process)        encoded examples, fixed order (mixer.datasets)
  [cache]                            config.input.cache_raw: encoded bytes in RAM
  for epoch e = 0, 1, ...:           shuffle(config.input.shuffle_buffer, seed(seed, process, e))
  number the stream                  position p = e * n_local + (index in epoch)
  decode, Inception crop, flip,      per-example stateless seed from
  RandAugment, value range, labels   (config.seed, p * process_count + process_index)
  batch(local_batch)                 batches run across epoch boundaries
  mixup                              on the host, inside tf.data, one Beta(p, p) ratio
                                     per batch, seeded by (config.seed, process, step)
  prefetch(config.input.prefetch)

Images are decoded after the shuffle, so the shuffle buffer holds encoded bytes.

Determinism and resume. What tf.data guarantees here: with `deterministic=True`
(set below) every parallel map keeps its input order; a shuffle with a fixed
seed gives the same order on every run for the same input order; stateless
random ops give the same values for the same seed. So for a fixed config
(seed, dataset, batch size, process count, image size, augmentation) and the
same TF version, the batches are identical from run to run. `start_step=N`
starts at epoch `N * local_batch // n_local` arithmetically (earlier epochs
are never read) and, inside it, skips the first `N * local_batch % n_local`
shuffled *encoded* records before decoding; since every random choice is a
function of the stream position, it yields exactly the batches an
uninterrupted run yields from step N on. What is NOT guaranteed: identical
streams across TF versions (shuffle and stateless RNG algorithms may change),
across a different process count or batch size (the stream is per process),
or when TF's global seed is set (`tf.random.set_seed` enters tf.data's shuffle
seed; this module never sets it).

Bad records. A record that fails to decode or preprocess is never dropped: it
is replaced, at its position, by a substitute (a blank image, value 0, with an
all-zero label, which adds nothing to a softmax loss), so every later example
keeps its position and a resumed run stays bit-identical. Each one is logged
with its source id (file name, TFDS id, record file). If all of the first
`_FIRST_RECORDS` records of a process fail, or more than
`config.input.max_bad_fraction` of at least `_MIN_RECORDS_FOR_FRACTION`, the
iterator raises `BadDataError` naming some of them. Evaluation leaves such
records out (masked, like padding), with the same warning.

Evaluation (`create_eval_iterator`) reads each process's part of the split in
order, preprocesses it with the evaluator's `pp` (`preprocess_ops.eval_transform`,
the one eval transform, also used by predict and export), pads every process's stream
with masked-out (mask False) examples and takes the same number of batches on
every process, so each example is counted exactly once.

Memory knobs: config.input.shuffle_buffer (encoded examples held per
process), prefetch (batches), threadpool_size (tf.data private threadpool; 0 =
TF default), max_intra_op_parallelism, cache_raw (keep the encoded split in
RAM; small datasets only).

Labels: 'labels' is float32 `[local_batch, num_classes]`, one-hot (or
multi-hot for multi-label sources, all-zero for examples without a label),
mixed by mixup during training; not normalised to sum to 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from mixer import datasets
from mixer import preprocess_ops as ops

# Salts that separate the random streams derived from config.seed.
_SHUFFLE_SALT = 1
_MIXUP_SALT = 2

# Bounded failure on bad data (per process): stop if all of the first
# _FIRST_RECORDS records fail, or once more than config.input.max_bad_fraction
# of at least _MIN_RECORDS_FOR_FRACTION records failed.
_FIRST_RECORDS = 100
_MIN_RECORDS_FOR_FRACTION = 1000
# `_map_or_substitute` works in chunks of _CHUNK_SIZE elements, _CHUNKS_IN_FLIGHT at
# a time: 128 elements mapped in parallel, and a bounded number of decoded images
# held (an interleave over all of a TPU host's cores would hold ~100 chunks).
_CHUNK_SIZE = 64
_CHUNKS_IN_FLIGHT = 2
_MAX_BAD_WARNINGS = 20  # Then one summary line every 1000 bad records.


class BadDataError(ValueError):
  """Too many training records cannot be decoded or preprocessed."""


def _process(process_index, process_count) -> tuple[int, int]:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count}).')
  return process_index, process_count


def _local_batch_size(global_batch: int, process_count: int, name: str) -> int:
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(
        f'config.{name}={global_batch} must be a positive multiple of the number of '
        f'processes ({process_count}); each process builds {name} // process_count '
        f'examples. Set config.{name} to a multiple of {process_count}.')
  return global_batch // process_count


def _get_source(config, dataset: str) -> datasets.DataSource:
  """The training set's source; its class count must be the model head's."""
  source = datasets.get_source(dataset, data_dir=config.get('data_dir'),
                               num_classes=config.num_classes)
  if source.num_classes is not None and source.num_classes != config.num_classes:
    raise ValueError(
        f'Dataset {dataset!r} has {source.num_classes} classes but config.num_classes='
        f'{config.num_classes}. Set config.num_classes={source.num_classes}.')
  return source


def num_train_examples(config) -> int:
  """Examples in the training split (all processes): what an epoch is."""
  return _get_source(config, config.dataset).num_examples(config.train_split)


def get_eval_source(config, dataset: str | None) -> tuple[datasets.DataSource, int]:
  """An evaluator's source and *its own* class count (not the training config's).

  `dataset=None` is the training set. A source that does not know its class
  count ('tfrecord:') is taken to share the training set's.
  """
  if dataset is None or dataset == config.dataset:
    return _get_source(config, config.dataset), int(config.num_classes)
  source = datasets.get_source(dataset, data_dir=config.get('data_dir'),
                               num_classes=config.num_classes)
  return source, int(source.num_classes or config.num_classes)


def _dataset_options(config) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # Parallel maps keep their order: see docstring.
  if config.input.threadpool_size:
    options.threading.private_threadpool_size = config.input.threadpool_size
  if config.input.max_intra_op_parallelism:
    options.threading.max_intra_op_parallelism = config.input.max_intra_op_parallelism
  # Prefetches injected by tf.data's optimiser hold decoded images on top of
  # ours; leave the memory to config.input.prefetch.
  options.experimental_optimization.inject_prefetch = False
  return options


def _int64_seed(*parts) -> tf.Tensor:
  """A scalar int64 seed mixing `parts` (Python ints or int64 tensors)."""
  seed = ops.example_seed(parts[0], parts[1])
  for part in parts[2:]:
    seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(part, tf.int64),
                                                    alg='philox')
  # tf.data's shuffle takes one int64; keep it non-negative for readability.
  return tf.math.abs(seed[0] // 2)


def _decode_checked(image_bytes: tf.Tensor, source_id: tf.Tensor) -> tf.Tensor:
  """Fails (with the example's source id) on bytes that are not an image format."""
  header = tf.strings.substr(image_bytes, 0, 4)
  known = (tf.io.is_jpeg(image_bytes) | tf.equal(header, b'\x89PNG') |
           tf.equal(tf.strings.substr(image_bytes, 0, 3), b'GIF') |
           tf.equal(tf.strings.substr(image_bytes, 0, 2), b'BM'))
  check = tf.debugging.Assert(known, ['Not an image (JPEG/PNG/GIF/BMP):', source_id])
  with tf.control_dependencies([check]):
    return tf.identity(image_bytes)


def _map_or_substitute(ds: tf.data.Dataset, fn, substitute, source_id,
                       chunk_size: int = _CHUNK_SIZE) -> tf.data.Dataset:
  """`ds.map(fn)`, where an element on which `fn` fails becomes `substitute`.

  Each element comes out as (result, bad_source_id): '' when `fn` succeeded,
  else `source_id(element)`. Nothing is dropped and the order is kept, so every
  element keeps its position in the stream (what makes resume bit-exact).

  tf.data has no per-element try/except, only `ignore_errors` (which drops the
  element), so the stream is cut into chunks of `chunk_size` elements; each
  chunk runs as a small dataset whose failures `ignore_errors` drops, and the
  survivors are scattered back into a chunk of substitutes by their index in
  the chunk. One nested dataset per chunk, not per element: the per-element
  version cost 40% of the input pipeline's throughput. Leaves of variable shape
  (a list of labels) travel through the chunk serialized.
  """
  spec = ds.element_spec
  single = not isinstance(spec, tuple)
  flat_spec = tf.nest.flatten(spec)
  variable = [not s.shape.is_fully_defined() for s in flat_spec]

  def pack(*element):
    return tuple(tf.io.serialize_tensor(x) if v else x
                 for x, v in zip(tf.nest.flatten(element), variable))

  def unpack(flat):
    leaves = [tf.ensure_shape(tf.io.parse_tensor(x, s.dtype), s.shape) if v else x
              for x, s, v in zip(flat, flat_spec, variable)]
    element = tf.nest.pack_sequence_as(spec, leaves)
    return (element,) if single else element

  def run_chunk(*flat_chunk):
    size = tf.shape(flat_chunk[0])[0]
    good = tf.data.Dataset.from_tensor_slices((flat_chunk, tf.range(size))).map(
        lambda flat, i: (fn(*unpack(flat)), i),
        num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    results_spec = good.element_spec[0]
    nothing = (tf.nest.map_structure(lambda s: tf.zeros([0, *s.shape], s.dtype), results_spec),
               tf.zeros([0], tf.int32))
    # All survivors as one batch (or an empty one when every element failed).
    survivors = good.batch(chunk_size).concatenate(
        tf.data.Dataset.from_tensors(nothing)).take(1)
    chunk = tf.nest.pack_sequence_as(spec, list(flat_chunk))
    ids = source_id(*((chunk,) if single else chunk))

    def merge(results, index):
      where = index[:, None]

      def fill_in():
        return tf.nest.map_structure(
            lambda sub, got: tf.tensor_scatter_nd_update(
                tf.repeat(tf.convert_to_tensor(sub)[None], size, axis=0), where, got),
            substitute, results)

      # Almost every chunk has no failure: then the survivors are the chunk.
      merged = tf.cond(tf.shape(index)[0] == size, lambda: results, fill_in)
      ok = tf.scatter_nd(where, tf.ones_like(index), [size]) > 0
      return merged, tf.where(ok, tf.constant(''), ids)

    return survivors.map(merge).unbatch()

  return ds.map(pack, num_parallel_calls=tf.data.AUTOTUNE).batch(chunk_size).interleave(
      run_chunk, cycle_length=_CHUNKS_IN_FLIGHT, block_length=chunk_size,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


class _CheckedBatches:
  """The training batches, with bad records reported and their share bounded.

  Reads (and removes) the batches' 'bad_source_id' field: one entry per
  example, '' for a good one.
  """

  def __init__(self, batches: Iterator[dict[str, np.ndarray]], max_bad_fraction: float,
               what: str):
    self._batches = batches
    self._max_bad_fraction = max_bad_fraction
    self._what = what
    self._seen = 0
    self._bad: list[str] = []
    self._bad_count = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._batches)
    ids = [i.decode('utf-8', 'replace') for i in batch.pop('bad_source_id').tolist() if i]
    for source_id in ids:
      self._bad_count += 1
      if len(self._bad) < 5:
        self._bad.append(source_id)
      if self._bad_count <= _MAX_BAD_WARNINGS:
        logging.warning('Training record %s cannot be decoded or preprocessed: replaced by '
                        'a blank, unlabelled example.', source_id)
      elif self._bad_count % 1000 == 0:
        logging.warning('%d training records of %s could not be decoded so far.',
                        self._bad_count, self._what)
    self._seen += len(batch['labels'])
    self._check()
    return batch

  def _check(self):
    fraction = self._bad_count / max(self._seen, 1)
    if self._seen >= _FIRST_RECORDS and self._bad_count == self._seen:
      reason = f'none of the first {self._seen} records could be decoded or preprocessed'
    elif self._seen >= _MIN_RECORDS_FOR_FRACTION and fraction > self._max_bad_fraction:
      reason = (f'{self._bad_count} of {self._seen} records ({fraction:.1%}) could not be '
                f'decoded or preprocessed, over config.input.max_bad_fraction='
                f'{self._max_bad_fraction}')
    else:
      return
    raise BadDataError(
        f'Training data {self._what}: {reason}, e.g. {", ".join(self._bad)}. Check that these '
        'are intact JPEG/PNG/GIF/BMP images with labels below config.num_classes (re-download '
        'or re-prepare the data, or remove the files), or raise config.input.max_bad_fraction '
        'to train with them replaced.')


def _train_preprocess(config, num_classes: int):
  """(example, global example index) -> {'image', 'labels'} for training."""
  size = config.image_size
  inp = config.input

  def preprocess(example, index):
    seed_crop, seed_flip, seed_randaug = tf.unstack(
        ops.split_seed(ops.example_seed(config.seed, index), 3))
    data = _decode_checked(example['image'], example['source_id'])
    if inp.inception_crop:
      image = ops.decode_and_inception_crop(data, seed_crop, size, min_area=inp.min_area)
    else:
      image = ops.resize(ops.decode(data), size)
    if inp.flip:
      image = ops.flip_left_right(image, seed_flip)
    if inp.randaug_magnitude and inp.randaug_layers:
      image = ops.randaugment(image, seed_randaug, inp.randaug_layers, inp.randaug_magnitude)
    return {'image': tf.ensure_shape(ops.value_range(image), [size, size, 3]),
            'labels': ops.multi_hot(example['label'], num_classes)}

  return preprocess


def create_train_iterator(config: ml_collections.ConfigDict, *, start_step: int = 0,
                          process_index: int | None = None,
                          process_count: int | None = None
                          ) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches of this process, from step `start_step` on.

  Args:
    config: the training config (dataset, train_split, data_dir, image_size,
      num_classes, batch_size, seed, input.*).
    start_step: first step to yield; equals an uninterrupted run from there.
    process_index: this process (default jax.process_index()).
    process_count: number of processes (default jax.process_count()).

  Returns:
    An iterator of {'image': float32 [local_batch, S, S, 3] in [-1, 1],
    'labels': float32 [local_batch, num_classes]}.
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch_size(config.batch_size, process_count, 'batch_size')
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  if _global_tf_seed_is_set():
    logging.warning('tf.random.set_seed() was called: the shuffle order then also depends '
                    'on that seed.')
  source = _get_source(config, config.dataset)
  if config.dataset == 'synthetic':  # One constant host batch: measures the trainer alone.
    return source.train_batches(local_batch, config.image_size, config.seed)
  num_classes = config.num_classes
  split = config.train_split
  records = source.read(split, process_index=process_index, process_count=process_count)
  n_local = source.num_examples(split, process_index=process_index,
                                process_count=process_count)
  if n_local == 0:
    raise ValueError(f'Process {process_index} of {process_count} has no examples of '
                     f'{config.dataset!r} split {split!r}; use a larger split or fewer '
                     'processes.')
  if config.input.cache_raw:
    records = records.cache()

  start_epoch, offset = divmod(start_step * local_batch, n_local)
  buffer = max(1, min(config.input.shuffle_buffer, n_local))

  def epoch(epoch_index):
    seed = _int64_seed(config.seed, _SHUFFLE_SALT, process_index, epoch_index)
    shuffled = records.shuffle(buffer, seed=seed, reshuffle_each_iteration=False)
    positions = tf.data.Dataset.range(epoch_index * n_local, (epoch_index + 1) * n_local)
    return tf.data.Dataset.zip(shuffled, positions)

  ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch)
  ds = ds.skip(offset)  # Encoded records only: nothing is decoded before this.

  preprocess = _train_preprocess(config, num_classes)
  substitute = {'image': tf.zeros([config.image_size, config.image_size, 3], tf.float32),
                'labels': tf.zeros([num_classes], tf.float32)}
  ds = _map_or_substitute(
      ds, lambda example, position: preprocess(example, position * process_count + process_index),
      substitute, lambda example, position: example['source_id'])
  ds = ds.map(lambda example, bad_id: {**example, 'bad_source_id': bad_id})
  ds = ds.batch(local_batch, drop_remainder=True)

  mixup_p = config.input.mixup_p
  if mixup_p > 0:
    def mix(step, batch):
      seed = ops.example_seed(config.seed, _MIXUP_SALT)
      seed = tf.random.experimental.stateless_fold_in(seed, process_index, alg='philox')
      seed = tf.random.experimental.stateless_fold_in(seed, step, alg='philox')
      images, labels = ops.mixup(batch['image'], batch['labels'], seed, mixup_p)
      return {**batch, 'image': images, 'labels': labels}
    ds = ds.enumerate(start=start_step).map(mix, num_parallel_calls=tf.data.AUTOTUNE)

  ds = ds.prefetch(config.input.prefetch).with_options(_dataset_options(config))
  return _CheckedBatches(ds.as_numpy_iterator(), config.input.max_bad_fraction,
                         f'{config.dataset!r} split {split!r} (process {process_index})')


def _global_tf_seed_is_set() -> bool:
  from tensorflow.python.eager import context  # pylint: disable=g-direct-tensorflow-import
  return context.global_seed() is not None


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EvalData:
  """One process's evaluation batches; iterate it as often as needed.

  Attributes:
    dataset: the underlying tf.data pipeline (num_steps batches).
    num_examples: examples in the whole split (all processes).
    num_steps: batches per pass, the same on every process.
    local_batch_size: examples per batch on this process (padding included).
    num_classes: width of the 'labels' rows: the evaluated dataset's classes.
  """
  dataset: tf.data.Dataset
  num_examples: int
  num_steps: int
  local_batch_size: int
  num_classes: int

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    """Yields num_steps dicts: image, labels, mask."""
    return self.dataset.as_numpy_iterator()

  def __len__(self) -> int:
    return self.num_steps


def create_eval_iterator(config: ml_collections.ConfigDict, *, split: str,
                         dataset: str | None = None, pp: str = 'resize',
                         crop_fraction: float = 0.875, label_field: str = 'label',
                         batch_size: int | None = None, process_index: int | None = None,
                         process_count: int | None = None) -> EvalData:
  """Evaluation batches of this process's part of a split, padded and masked.

  Args:
    config: the training config (data_dir, image_size, eval_batch_size, input.*).
    split: split spec, e.g. 'validation' or 'train[:65000]'.
    dataset: a config.dataset-style name (default: the training set). Its class
      count is its own, read from its source.
    pp: eval preprocessing, one of `preprocess_ops.EVAL_PP`.
    crop_fraction: crop size over resize size for the '*_crop' modes.
    label_field: the example field holding the class ids: 'label', or
      'real_label' for ImageNet ReaL (images without one count nowhere).
    batch_size: global batch size (default config.eval_batch_size).
    process_index: this process (default jax.process_index()).
    process_count: number of processes (default jax.process_count()).

  Returns:
    EvalData; each batch is {'image': float32 [b, S, S, 3] in [-1, 1],
    'labels': float32 [b, num_classes] multi-hot, 'mask': bool [b]}.
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch_size(batch_size or config.eval_batch_size, process_count,
                                  'eval_batch_size')
  source, num_classes = get_eval_source(config, dataset)
  if label_field == 'real_label' and not source.has_real_labels:
    raise ValueError(f"label_field='real_label' needs a dataset with ReaL labels "
                     f"(imagenet2012_real), not {source.name or dataset!r}.")
  size = config.image_size
  counts = [source.num_examples(split, process_index=i, process_count=process_count)
            for i in range(process_count)]
  num_steps = max(1, math.ceil(max(counts) / local_batch))

  def preprocess(example):
    data = _decode_checked(example['image'], example['source_id'])
    labels = ops.multi_hot(example[label_field], num_classes)
    return {'image': ops.eval_transform(ops.decode(data), image_size=size, pp=pp,
                                        crop_fraction=crop_fraction),
            'labels': labels,
            # An image without a label (ReaL has ~1k of them) is left out like padding.
            'mask': tf.reduce_any(labels > 0)}

  padding = {'image': tf.zeros([size, size, 3], tf.float32),
             'labels': tf.zeros([num_classes], tf.float32),
             'mask': tf.constant(False)}

  def warn(bad_id):
    logging.warning('Evaluation record %s cannot be decoded or preprocessed: left out.',
                    bad_id.decode('utf-8', 'replace'))
    return bad_id

  def report(example, bad_id):
    # Eager-only logging of the bad record's id, through a host callback.
    bad_id = tf.cond(tf.strings.length(bad_id) > 0,
                     lambda: tf.numpy_function(warn, [bad_id], tf.string, stateful=True),
                     lambda: bad_id)
    with tf.control_dependencies([bad_id]):
      return {k: tf.identity(v) for k, v in example.items()}

  ds = source.read(split, process_index=process_index, process_count=process_count)
  # A bad record is left out like padding (mask False), with a warning naming it.
  ds = _map_or_substitute(ds, preprocess, padding, lambda example: example['source_id'])
  ds = ds.map(report)
  # Endless padding after the real examples, then exactly num_steps batches:
  # the last real batch is filled up with masked-out examples, and processes
  # with fewer examples run the same number of steps.
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
  ds = ds.batch(local_batch, drop_remainder=True).take(num_steps)
  ds = ds.prefetch(config.input.prefetch).with_options(_dataset_options(config))
  return EvalData(dataset=ds, num_examples=sum(counts), num_steps=num_steps,
                  local_batch_size=local_batch, num_classes=num_classes)
