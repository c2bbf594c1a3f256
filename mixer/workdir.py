"""One run per workdir: an exclusive lock held by process 0 for the whole run.

`<workdir>/.lock` holds the holder's host, pid, process start time and the
UTC time the run began. Locally, the lock is an `fcntl.flock` on that file,
which the kernel drops when the process dies however it dies (SIGKILL, OOM),
so a second run on the same workdir is refused at once, and a lock left by a
dead process on this host is taken over with a warning. A lock file naming
another host is refused (that run may be alive there): the message says which
file to delete if it is not.

On bucket storage (gs://...) there is no flock: the lock is an object that is
created only if absent and read back to check that this run won the race (GCS
reads after writes are strongly consistent). A stale lock there is detected
only for this host (same host, dead pid); otherwise delete the object by hand.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket

from absl import logging

from mixer import paths

LOCK_FILE = '.lock'
# Exit status of a run that stopped for a preemption after saving a checkpoint
# (EX_TEMPFAIL from sysexits.h): rerun the same command on the same workdir to
# resume. `mixer.main` exits with it, `mixer.sweep` and the launch scripts
# requeue on it; 0 means finished, final.npz exported.
EXIT_PREEMPTED = 75


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir."""


def _process_start_time(pid: int) -> str | None:
  """The kernel's start time of `pid` (clock ticks since boot), None if unknown or gone.

  With the pid it identifies a process: a pid reused by a later process has
  another start time.
  """
  try:
    with open(f'/proc/{pid}/stat', encoding='ascii') as f:
      # The command name (field 2) may hold spaces; fields after its ')' are plain.
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(info: dict) -> bool:
  """Whether the process a lock names runs on this host (same pid and start time)."""
  pid = info.get('pid')
  if not isinstance(pid, int):
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # Exists, owned by another user.
  started = info.get('process_start')
  return started is None or _process_start_time(pid) in (None, started)


def _describe(info: dict) -> str:
  return (f"host {info.get('host')!r}, pid {info.get('pid')}, started "
          f"{info.get('started', 'at an unknown time')}")


def _my_info() -> dict:
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'process_start': _process_start_time(os.getpid()),
          'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}


def _refuse(path: str, info: dict, why: str):
  raise WorkdirLockedError(
      f'the workdir {os.path.dirname(path)} is in use by another run ({_describe(info)}): '
      f'{why}. Wait for that run '
      f'to end, or pass another --workdir. If that run is gone, delete {path} and rerun.')


def _parse(text: str) -> dict | None:
  try:
    info = json.loads(text)
  except ValueError:
    return None
  return info if isinstance(info, dict) else None


class _LocalLock:
  def __init__(self, path: str):
    import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only)
    self._fcntl = fcntl
    self.path = path
    self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      info = _parse(self._read()) or {}
      os.close(self._fd)
      _refuse(path, info, 'it holds the lock')
    info = _parse(self._read())
    if info:
      if info.get('host') != socket.gethostname():
        self._release_fd()
        _refuse(path, info, 'the lock names another host, which this host cannot check')
      if info.get('pid') != os.getpid() and _alive(info):
        # Alive but without the flock: e.g. the lock file was replaced under it.
        self._release_fd()
        _refuse(path, info, 'that process is still running')
      if info.get('pid') != os.getpid():
        logging.warning('Taking over the stale lock %s of a process that is gone (%s).',
                        path, _describe(info))
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, (json.dumps(_my_info()) + '\n').encode(), 0)
    os.fsync(self._fd)

  def _read(self) -> str:
    return os.pread(self._fd, 1 << 16, 0).decode('utf-8', 'replace')

  def _release_fd(self):
    self._fcntl.flock(self._fd, self._fcntl.LOCK_UN)
    os.close(self._fd)

  def release(self):
    # Emptied, not removed: removing it would let a waiting run lock an unlinked
    # file while a third one creates a new one. An empty lock file is a free one.
    os.ftruncate(self._fd, 0)
    self._release_fd()


class _BucketLock:
  def __init__(self, path: str):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self._gfile = tf.io.gfile
    self.path = path
    if self._gfile.exists(path):
      with self._gfile.GFile(path, 'r') as f:
        info = _parse(f.read()) or {}
      if info.get('host') != socket.gethostname() or _alive(info):
        _refuse(path, info, 'its lock object exists')
      logging.warning('Taking over the stale lock %s of a process that is gone (%s).',
                      path, _describe(info))
    self._mine = json.dumps(_my_info())
    with self._gfile.GFile(path, 'w') as f:
      f.write(self._mine)
    with self._gfile.GFile(path, 'r') as f:
      won = f.read()
    if won != self._mine:
      _refuse(path, _parse(won) or {}, 'it took the lock at the same moment')

  def release(self):
    with contextlib.suppress(Exception):
      with self._gfile.GFile(self.path, 'r') as f:
        if f.read() == self._mine:
          self._gfile.remove(self.path)


@contextlib.contextmanager
def lock(workdir: str, primary: bool = True):
  """Holds the workdir's lock (on the primary process, e.g. process 0) inside the block.

  Raises WorkdirLockedError at once if another live run holds it.
  """
  if not primary:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  held = _BucketLock(path) if paths.is_remote(path) else _LocalLock(path)
  try:
    yield held
  finally:
    held.release()
