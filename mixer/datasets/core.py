"""The interface every data source implements, and split/shard arithmetic.

A source turns (split, process_index, process_count) into a `tf.data.Dataset`
of *encoded* examples in a fixed order:

  {'image': tf.string scalar      encoded JPEG/PNG/GIF/BMP bytes,
   'label': tf.int64 [k]           class ids: k=1 one-hot, k>1 multi-hot, k=0 none,
   'real_label': tf.int64 [m]      only where `has_real_labels` (ImageNet ReaL),
   'source_id': tf.string scalar   where the example came from, for error messages}

Decoding happens later, in `mixer.input_pipeline`, after the shuffle, so the
shuffle buffer holds compact bytes. The order must be a pure function of the
arguments: the pipeline's determinism and resume guarantees rest on it.
"""

from __future__ import annotations

import abc
import types
from collections.abc import Mapping

import tensorflow as tf
import tensorflow_datasets as tfds


class DataSource(abc.ABC):
  """A dataset split into per-process parts of encoded examples."""

  #: Human-readable name, used in messages.
  name: str = ''
  #: Whether examples carry 'real_label' (ImageNet ReaL multi-labels).
  has_real_labels: bool = False

  @property
  @abc.abstractmethod
  def num_classes(self) -> int | None:
    """Number of classes, or None where the source does not know it."""

  @property
  def class_names(self) -> list[str] | None:
    """Readable class names in label order, where the source knows them (for the sidecar)."""
    return None

  @abc.abstractmethod
  def num_examples(self, split: str, *, process_index: int = 0,
                   process_count: int = 1) -> int:
    """Examples in process `process_index`'s part of `split`."""

  @abc.abstractmethod
  def read(self, split: str, *, process_index: int = 0,
           process_count: int = 1) -> tf.data.Dataset:
    """Encoded examples of process `process_index`'s part of `split`, in a fixed order."""

  def check_split(self, split: str) -> None:
    """Raises (FileNotFoundError, ValueError) if `split` cannot be read; cheap, no decoding.

    Sources whose example count is expensive (a scan of every record) override it.
    """
    if self.num_examples(split) == 0:
      raise ValueError(f'Split {split!r} of {self.name!r} has no examples.')


def shard_bounds(num_items: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[start, end) of part `process_index` of `process_count` near-equal parts."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, process_count='
                     f'{process_count}).')
  return (num_items * process_index // process_count,
          num_items * (process_index + 1) // process_count)


def select_split(split: str, split_sizes: Mapping[str, int]) -> list[tuple[str, int, int]]:
  """Resolves a TFDS-style split spec over in-memory splits.

  Args:
    split: e.g. 'train', 'train[:90%]', 'train[10:20]+test'.
    split_sizes: number of examples of each named split.

  Returns:
    A list of (split name, start, end) index ranges, in spec order.

  Raises:
    ValueError: naming the unknown split or the malformed spec.
  """
  try:
    instruction = tfds.core.ReadInstruction.from_spec(split)
    # `to_absolute` wants objects with `.num_examples`; a namespace is enough.
    infos = {name: types.SimpleNamespace(num_examples=size, shard_lengths=[size])
             for name, size in split_sizes.items()}
    absolute = instruction.to_absolute(infos)
  except (ValueError, AssertionError) as e:
    raise ValueError(
        f'Cannot read split {split!r}: {e} Available splits: {sorted(split_sizes)}; '
        "slices look like 'train[:90%]' or 'train[100:200]'.") from e
  ranges = []
  for part in absolute:
    size = split_sizes[part.splitname]
    start = 0 if part.from_ is None else part.from_ % size if part.from_ < 0 else part.from_
    end = size if part.to is None else part.to % size if part.to < 0 else part.to
    ranges.append((part.splitname, start, end))
  return ranges


def ensure_rank1_labels(label: tf.Tensor) -> tf.Tensor:
  """A scalar or vector of class ids as int64 `[k]`."""
  return tf.reshape(tf.cast(label, tf.int64), [-1])
