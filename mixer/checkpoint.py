"""Train-state checkpoints: orbax, async, keep-N, preemption-safe, restore into any mesh.

`TrainCheckpointer` wraps orbax's `CheckpointManager` for the trainer. Released
`.npz` weights are `mixer.weights`; this module is only the full train state
(step, params, optimizer state) and its metadata.
"""

from __future__ import annotations

import json
import os
import threading

import orbax.checkpoint as ocp
from absl import logging


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
  - Each checkpoint stores `meta` (JSON): the model description and the run's
    bookkeeping (core-hours so far), so a workdir holding another model's
    checkpoint is refused before anything is written.
  """

  def __init__(self, workdir: str, every: int, keep: int):
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

  def read_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored['meta'])

  def restore(self, step: int, abstract_state):
    """Restores `state` into the shardings of `abstract_state` (any mesh or device count)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['meta'])

  def reached_preemption(self, step: int) -> bool:
    return self.stop_requested.is_set() or self._manager.reached_preemption(step)

  def maybe_save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    """Saves if the policy (interval or preemption) says so, or if `force`."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(json.loads(json.dumps(meta))))
    saved = self._manager.save(step, args=args, force=force or self.stop_requested.is_set())
    if saved:
      logging.info('Checkpoint of step %d started (async) in %s', step, self.directory)
    return saved

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
