"""Command line: `python -m mixer.main --config=configs/<setting>.py --workdir=DIR`.

Config overrides use ml_collections syntax (`--config.batch_size=64`,
`--config.model.hidden_dim=64`, `--config=configs/mixer_jft.py:variant=B_16`).
Multi-host runs call `jax.distributed.initialize()` when started on a TPU pod or
cluster (detected, or forced with MIXER_DISTRIBUTED=1), or when
`--coordinator_address`, `--num_processes` and `--process_id` are given (GPU
clusters, several processes on one machine).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file (configs/*.py), optionally `file.py:arg`.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and exports.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process.')
flags.mark_flags_as_required(['config', 'workdir'])


def _on_multihost_cluster() -> bool:
  """True on a TPU pod slice (several workers) or when the launcher asks for it."""
  if os.environ.get('MIXER_DISTRIBUTED', '') == '1':
    return True
  workers = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return ',' in workers or bool(os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'))


def initialize_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top  (after flag parsing)
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise app.UsageError('--coordinator_address, --num_processes and --process_id '
                           'must be given together.')
    jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _on_multihost_cluster():
    jax.distributed.initialize()  # Everything is detected from the TPU/cluster environment.
  else:
    return
  logging.info('Process %d of %d.', jax.process_index(), jax.process_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  initialize_distributed()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # tf.data runs on the host; the GPUs are JAX's.
  from mixer import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
