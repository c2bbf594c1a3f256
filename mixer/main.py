"""Command line: `python -m mixer.main --config=configs/<setting>.py --workdir=DIR`.

Config overrides use ml_collections syntax (`--config.batch_size=64`,
`--config.model.hidden_dim=64`, `--config=configs/mixer_jft.py:variant=B_16`).
Multi-host runs call `jax.distributed.initialize()` when started on a TPU pod or
cluster (detected, or forced with MIXER_DISTRIBUTED=1), or when
`--coordinator_address`, `--num_processes` and `--process_id` are given (GPU
clusters, several processes on one machine).
"""

import errno
import gc
import logging as std_logging
import os
import sys

from mixer import tf_startup

tf_startup.quiet_first_import()  # Already done when started as `python -m mixer.main`.

import tensorflow as tf  # noqa: E402  (first import: its start-up lines are filtered)
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mixer import config_lib  # noqa: E402
from mixer.workdir import EXIT_PREEMPTED  # noqa: E402  (stopped with a checkpoint: rerun)

# jax logs at INFO that it found no TPU ("Unable to initialize backend 'tpu'") on
# every machine without one; its warnings (e.g. a GPU it cannot use) still show.
std_logging.getLogger('jax._src.xla_bridge').setLevel(std_logging.WARNING)
# ... and "Resetting cache at <empty>" when the persistent cache is turned on; our own
# line names the cache directory.
std_logging.getLogger('jax._src.compilation_cache').setLevel(std_logging.WARNING)

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file (configs/*.py), optionally `file.py:arg`.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and exports.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process.')
_VERBOSE = flags.DEFINE_bool(
    'verbose', False, 'Show the traceback of errors with a known cause (also MIXER_VERBOSE=1).')

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


def _config_override_hint(argv) -> str:
  """For an override `--config.a.b=v` that failed, names the valid keys at that level."""
  config_arg = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  overrides = [a[len('--config.'):].split('=', 1)[0] for a in argv if a.startswith('--config.')]
  if not config_arg or not overrides:
    return ''
  path, _, arg = config_arg.partition(':')
  if not os.path.isfile(path):
    return f'Config file {path!r} does not exist: pass an existing file, e.g. configs/digits.py.'
  module = config_lib.load_config_module(path)
  config = module.get_config(arg) if arg else module.get_config()
  for override in overrides:
    node, parts = config, override.split('.')
    for depth, part in enumerate(parts):
      if not hasattr(node, 'keys') or part not in node:
        where = '.'.join(['config'] + parts[:depth])
        valid = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else '(not a dict)'
        return (f'Unknown config key {"config." + override!r}: {where} has no {part!r}. '
                f'Valid keys of {where}: {valid}.')
      node = node[part]
  return ''


def _parse_flags(argv):
  """absl flag parsing, with config errors (bad key, missing file) stated plainly."""
  for arg in argv:
    if arg.startswith('--config='):
      path = arg.split('=', 1)[1].partition(':')[0]
      if not os.path.isfile(path):
        raise SystemExit(f'Error in the command line: config file {path!r} does not exist '
                         f'(working directory {os.getcwd()}). Pass an existing file, e.g. '
                         '--config=configs/digits.py.')
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # pylint: disable=broad-except  (re-raised with a clear message)
    hint = _config_override_hint(argv)
    raise SystemExit(f'Error in the command line: {hint or error}') from error


class _QuietLibraries:
  """Drops INFO records of orbax (several lines per save) so progress stays readable."""

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


_DISK_HINTS = {
    errno.ENOSPC: 'the disk is full: free space (or use a --workdir on a larger disk), then '
                  'rerun the same command; the run resumes from its last checkpoint',
    errno.EDQUOT: 'the disk quota is exhausted: free space, then rerun the same command',
    errno.EROFS: 'the file system is read-only: pass a --workdir on a writable disk',
    errno.EACCES: 'permission denied: pass a --workdir (and data) you can write and read',
    errno.EPERM: 'permission denied: pass a --workdir (and data) you can write and read',
    errno.ENOTDIR: 'a path component is a file, not a directory: --workdir must be a directory',
    errno.EEXIST: 'a file is in the way: move it, or pass another --workdir',
    errno.ENOENT: 'no such file or directory: check the path',
    errno.EFBIG: 'a file grew past the size limit (ulimit -f): raise the limit, then rerun',
}


def _known_error_message(error: BaseException) -> str | None:
  """One line naming the problem and the fix, for errors with a known cause; None otherwise."""
  from mixer import checkpoint, input_pipeline, train, workdir  # pylint: disable=g-import-not-at-top
  if isinstance(error, OSError) and error.errno in _DISK_HINTS:
    where = f': {error.filename}' if error.filename else ''
    return f'{error.strerror or error}{where} ({_DISK_HINTS[error.errno]}).'
  if isinstance(error, (ValueError, OSError, checkpoint.CheckpointError,
                        workdir.WorkdirLockedError, train.NonFiniteLossError,
                        input_pipeline.BadDataError)):
    # The config, weights, data and workdir checks raise these with the fix in the message.
    return ' '.join(str(error).split()) or type(error).__name__
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_logger().addFilter(_QuietLibraries())
  try:
    initialize_distributed()
    tf.config.set_visible_devices([], 'GPU')  # tf.data runs on the host; the GPUs are JAX's.
    from mixer import train  # pylint: disable=g-import-not-at-top
    # The ~480k objects the imports left (TensorFlow, jax, flax, ...) live as long as the
    # process: frozen, Python's full collections stop walking them, which took 0.22 s each
    # on 2 cores. Tracing (many long-lived objects) set off such walks again and again: the
    # digits demo's step traced in 0.7 CPU-s without, 0.4 with. And one in the loop stalls
    # the step (on a pod, every host waits for it).
    gc.collect()
    gc.freeze()
    result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except Exception as error:  # pylint: disable=broad-except  (known causes: one line)
    message = _known_error_message(error)
    if message is None or _VERBOSE.value or os.environ.get('MIXER_VERBOSE', '') == '1':
      raise  # Unexpected (or asked for): the full traceback.
    sys.stderr.write(f'error: {message}\n(--verbose or MIXER_VERBOSE=1 shows the traceback.)\n')
    sys.stderr.flush()
    sys.exit(1)
  if result.get(train.PREEMPTED):
    logging.warning('Stopped for a preemption after saving a checkpoint: exit status %d; '
                    'rerun the same command to resume.', EXIT_PREEMPTED)
    sys.exit(EXIT_PREEMPTED)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
