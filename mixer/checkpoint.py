"""Train-state checkpoints: orbax, async, keep-N, preemption-safe, self-verifying, any mesh.

`TrainCheckpointer` wraps orbax's `CheckpointManager` for the trainer. Released
`.npz` weights are `mixer.weights`; this module is only the full train state
(step, params, optimizer state) and its metadata.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import logging

from mixer import paths

# Where unusable checkpoints are moved (beside `checkpoints/`, so orbax never sees them).
MOVED_ASIDE_DIR = 'checkpoints_moved_aside'


class CheckpointError(RuntimeError):
  """No checkpoint in the workdir can be restored and verified."""


def _as_words(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words (1-, 2- and 8-byte dtypes widened or split)."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  width = x.dtype.itemsize
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[width]
  words = jax.lax.bitcast_convert_type(x, unsigned)  # 8 bytes -> trailing axis of 2 words.
  return words.astype(jnp.uint32)


@jax.jit
def _checksums(leaves):
  """Per array: the wrapping uint32 sum of its words and of its words times their position.

  The plain sum changes with any single flipped bit (it moves the sum by 2^k,
  k < 32); the position-weighted sum also catches swapped or shifted words.
  Both are exact integer arithmetic, so they do not depend on the mesh or on
  how the array is split across devices: a checkpoint saved on 8 devices
  verifies on 1.
  """
  out = []
  for leaf in leaves:
    words = _as_words(leaf).reshape(-1)
    position = jnp.arange(1, words.size + 1, dtype=jnp.uint32)
    out.append(jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                          jnp.sum(words * position, dtype=jnp.uint32)]))
  return out


def fingerprint(tree) -> dict[str, str]:
  """{array path: checksum}: one on-device reduction and one small transfer for the whole tree."""
  keyed, _ = jax.tree_util.tree_flatten_with_path(tree)
  sums = jax.device_get(_checksums([leaf for _, leaf in keyed]))
  return {jax.tree_util.keystr(path): '%08x%08x' % tuple(int(v) for v in np.asarray(s))
          for (path, _), s in zip(keyed, sums)}


def _move_aside(step_dir: str, workdir: str) -> str:
  """Moves a checkpoint directory under `<workdir>/checkpoints_moved_aside/` (never deletes it)."""
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')
  target_dir = os.path.join(workdir, MOVED_ASIDE_DIR)
  tf.io.gfile.makedirs(target_dir)
  target = os.path.join(target_dir, f'{os.path.basename(step_dir)}.{stamp}')
  if paths.is_remote(step_dir):
    # Buckets have no directory rename: copy every object, then remove the originals.
    for directory, _, files in tf.io.gfile.walk(step_dir):
      relative = os.path.relpath(directory, step_dir)
      tf.io.gfile.makedirs(os.path.join(target, relative))
      for name in files:
        tf.io.gfile.copy(os.path.join(directory, name), os.path.join(target, relative, name))
    tf.io.gfile.rmtree(step_dir)
  else:
    os.rename(step_dir, target)
  return target


def saved_steps(workdir: str) -> list[int]:
  """Steps of the committed checkpoints in `<workdir>/checkpoints`, read without orbax."""
  directory = os.path.join(workdir, 'checkpoints')
  if not tf.io.gfile.isdir(directory):
    return []
  return sorted(int(e.rstrip('/')) for e in tf.io.gfile.listdir(directory)
                if e.rstrip('/').isdigit())


class TrainCheckpointer:
  """Saves and restores the whole train state under `<workdir>/checkpoints/<step>`.

  - Saves are asynchronous (training goes on while the arrays are written) and
    atomic: orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it only when
    every process has finished, so a run killed mid-save resumes from the last
    complete step.
  - A save happens every `every` steps and whenever a preemption is signalled:
    on multi-host TPU/GPU through JAX's preemption sync point (all hosts agree on
    the step); in a single process when `stop_requested` is set (the trainer's
    SIGTERM handler sets it).
  - The newest `keep` checkpoints are kept.
  - Each checkpoint stores `meta` (JSON): the model description, the run's
    bookkeeping (core-hours so far) and a fingerprint of every array
    (`fingerprint`, computed on device before the async save starts).
  - `restore_latest` restores the newest checkpoint that restores and matches
    its fingerprints; newer ones that do not are moved to
    `<workdir>/checkpoints_moved_aside/` with a warning naming each and why. If
    none is usable, nothing is moved and `CheckpointError` says so.
  """

  def __init__(self, workdir: str, every: int, keep: int):
    self.workdir = workdir
    self.directory = os.path.join(workdir, 'checkpoints')  # Local or e.g. gs://.
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(max(int(every), 1)),
            policies.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=policies.LatestN(max(int(keep), 1)),
        enable_async_checkpointing=True,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'meta'))
    # Set by the trainer's SIGTERM handler (single process; multi-process runs get
    # preemption notices from JAX's coordination service through orbax).
    self.stop_requested = threading.Event()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def last_complete_step(self) -> int | None:
    """The newest step whose save has finished (waits for an in-flight async save)."""
    self._manager.wait_until_finished()
    self._manager.reload()
    return self._manager.latest_step()

  def read_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored['meta'])

  def restore(self, step: int, abstract_state):
    """Restores `state` into the shardings of `abstract_state` (any mesh or device count).

    Raises CheckpointError if an array differs from the fingerprint stored at save time.
    """
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    state, meta = restored['state'], dict(restored['meta'])
    expected = meta.get('fingerprints')
    if expected is not None:  # Checkpoints written before fingerprints existed have none.
      actual = fingerprint(state)
      wrong = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
      if wrong:
        raise CheckpointError(f'{len(wrong)} array(s) differ from their fingerprint at save '
                              f'time, e.g. {wrong[0]}')
    return state, meta

  def restore_latest(self, abstract_state,
                     check_meta: Callable[[int, dict], None] = lambda step, meta: None
                     ) -> tuple[Any, dict, int] | None:
    """(state, meta, step) of the newest usable checkpoint, or None if there is none at all.

    `check_meta(step, meta)` runs before the arrays are read and may raise (e.g.
    for another model's checkpoint); its error propagates and nothing is moved.
    A checkpoint that fails to restore or to verify is skipped; once an older
    one restores, the skipped ones are moved aside with a warning each.
    """
    self._manager.reload()
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    unusable = []
    for step in steps:
      try:
        meta = self.read_meta(step)
      except Exception as error:  # pylint: disable=broad-except  (any damage: try the next one)
        unusable.append((step, f'its metadata does not load ({_short(error)})'))
        continue
      check_meta(step, meta)
      try:
        state, meta = self.restore(step, abstract_state)
      except Exception as error:  # pylint: disable=broad-except
        unusable.append((step, _short(error)))
        continue
      for bad_step, reason in unusable:
        source = os.path.join(self.directory, str(bad_step))
        moved = (_move_aside(source, self.workdir) if jax.process_index() == 0 else
                 os.path.join(self.workdir, MOVED_ASIDE_DIR))
        logging.warning('Checkpoint step %d in %s is unusable (%s): moved it to %s and '
                        'resumed from step %d instead.', bad_step, self.directory, reason,
                        moved, step)
      if unusable:
        if jax.process_count() > 1:
          from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
          multihost_utils.sync_global_devices('mixer_checkpoints_moved_aside')
        self._manager.reload()
      return state, meta, step
    listing = '; '.join(f'step {s}: {r}' for s, r in unusable)
    raise CheckpointError(
        f'no checkpoint in {self.directory} can be restored ({listing}). Nothing was moved '
        'or deleted. Move the checkpoints directory aside to start afresh in this workdir, '
        'or use a new --workdir.')

  def reached_preemption(self, step: int) -> bool:
    return self.stop_requested.is_set() or self._manager.reached_preemption(step)

  def maybe_save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    """Saves if the policy (interval or preemption) says so, or if `force`.

    The fingerprints are computed (on device) before the async save starts, so
    they describe the state in memory, not what reached the disk.
    """
    force = force or self.stop_requested.is_set()
    if not (force or self._manager.should_save(step)):
      return False
    meta = {**meta, 'fingerprints': fingerprint(state)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(json.loads(json.dumps(meta))))
    saved = self._manager.save(step, args=args, force=force)
    if saved:
      logging.info('Checkpoint of step %d started (async) in %s', step, self.directory)
    return saved

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def _short(error: BaseException) -> str:
  """First line of an error, bounded: orbax/tensorstore messages run to pages."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ''
  text = f'{type(error).__name__}: {text}' if text else type(error).__name__
  return text if len(text) <= 300 else text[:297] + '...'
