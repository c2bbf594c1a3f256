"""Paths that may be local or in a bucket (gs://...), and atomic file writes.

The trainer's workdir, weights and data may live in a bucket; etils' `epath`
(part of the orbax/TFDS stack) reads and writes those. Local writes go to a
temporary file in the same directory that is fsync'ed and renamed over the
target, so an existing file is either kept whole or replaced whole.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO


def is_remote(path: str) -> bool:
  """gs://, s3://, ... paths: the trainer's workdir may live in a bucket."""
  return '://' in os.fspath(path)


def exists(path: str) -> bool:
  if is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top  (remote paths only)
    return epath.Path(path).exists()
  return os.path.exists(path)


def read_bytes(path: str) -> bytes:
  if is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top
    return epath.Path(path).read_bytes()
  with open(path, 'rb') as f:
    return f.read()


def current_umask() -> int:
  umask = os.umask(0o022)  # Reading the umask means setting it; restore it at once.
  os.umask(umask)
  return umask


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
  """Calls `write(file)` on a temporary file, then renames it over `path`.

  A kill at any moment leaves either the old file or the new one, never half
  of one. Bucket objects appear only once fully uploaded, so one upload of the
  bytes is atomic there too.
  """
  path = os.fspath(path)
  if is_remote(path):
    import io  # pylint: disable=g-import-not-at-top
    from etils import epath  # pylint: disable=g-import-not-at-top
    buffer = io.BytesIO()
    write(buffer)
    epath.Path(path).write_bytes(buffer.getvalue())
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(
      dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      # mkstemp makes the file private (0600); give it the mode open() would.
      os.fchmod(f.fileno(), 0o666 & ~current_umask())
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp_path)
    raise
  # Makes the rename itself durable; some filesystems refuse to fsync a directory.
  with contextlib.suppress(OSError):
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)


def remove_stale_temp_files(directory: str, names) -> list[str]:
  """Removes `atomic_write`'s temporary files for `names` left in `directory` by a killed run.

  Only files of exactly our pattern (`.<name>.<random>.tmp`) are touched; call
  it while holding the directory's lock, when no write of ours is in flight.
  Bucket writes leave no temporary files. Returns the removed paths.
  """
  if is_remote(directory) or not os.path.isdir(directory):
    return []
  removed = []
  for entry in os.listdir(directory):
    if entry.endswith('.tmp') and any(entry.startswith(f'.{name}.') for name in names):
      path = os.path.join(directory, entry)
      with contextlib.suppress(OSError):
        os.remove(path)
        removed.append(path)
  return removed
