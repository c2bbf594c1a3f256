"""JAX's persistent compilation cache: a restarted or resumed run skips recompiling.

`enable(cache_dir)` points JAX at a cache directory (local or `gs://...`; JAX
reads remote paths through etils.epath). Every later compilation whose
executable is in the cache (same program, shardings, devices, jax/jaxlib
version and flags) is loaded instead of compiled: the train step of a resumed
run, the evaluators, the init function.

What is written: every computation that took at least `min_compile_time_secs`
to compile. JAX's default (1 s) would skip the train step of small models and
every evaluation step; 0 would also write one file for each of the hundreds
of tiny eager ops (slow on a bucket). 0.1 s keeps every jitted step and skips
the eager crumbs. Entry size is unrestricted (-1): JAX may otherwise raise the
minimum size on some file systems and silently skip the step.

Call it before the first compilation; a later call resets JAX's cache state
so it still takes effect for what is compiled afterwards.

An entry cut short (the process killed, preempted or out of disk while JAX
wrote it) must not disable the cache. JAX writes an entry in place and never
rewrites one that exists, so such an entry made every later start warn
("Error reading persistent compilation cache entry"), compile again and keep
the broken file: after a preemption, just when the cache should pay off.
`enable` therefore has JAX use `_ReplaceableEntries` around its file cache:
an entry is written with `paths.atomic_write` (a temporary file renamed into
place: a reader sees all of it or nothing; a bucket object is published whole
anyway), and an entry JAX compiled anew, because it found none
or could not read the one there, replaces what is there. A temporary file
that a killed writer left in a local directory is deleted by the next
`enable` once it is an hour old.
"""

from __future__ import annotations

import glob
import os
import time

import jax
from absl import logging
from jax.experimental.compilation_cache import compilation_cache

from mixer import paths

DEFAULT_MIN_COMPILE_TIME_SECS = 0.1
_ENTRY_SUFFIX = '-cache'  # What jax._src.lru_cache names an entry: f'{key}-cache'.
STALE_PARTIAL_SECS = 3600  # A write this old is over: its writer was killed.


class _ReplaceableEntries:
  """JAX's file cache with whole-file writes that replace the entry (see the module doc).

  JAX calls `put` only for an executable it has just compiled, i.e. after `get`
  found no entry or one it could not read, so replacing is always right. With
  eviction on (`jax_compilation_cache_max_size`) JAX's own `put` keeps its
  bookkeeping: a broken entry is removed first, then JAX writes.
  """

  def __init__(self, file_cache):
    self._file_cache = file_cache
    self._path = file_cache._path  # pylint: disable=protected-access  (JAX reads it)

  def get(self, key: str):
    return self._file_cache.get(key)

  def put(self, key: str, value: bytes) -> None:
    entry = self._path / f'{key}{_ENTRY_SUFFIX}'
    if getattr(self._file_cache, 'eviction_enabled', False):
      if entry.exists():
        entry.unlink()
      self._file_cache.put(key, value)
      return
    paths.atomic_write(str(entry), lambda f: f.write(value))


def _install_replaceable_entries() -> None:
  """Makes JAX wrap each file cache it opens in `_ReplaceableEntries`."""
  # jax.experimental.compilation_cache has no hook for the cache's class; this private one
  # is what JAX's own `jax_compilation_cache_check_contents` wrapper is built on.
  from jax._src import compilation_cache as jax_cache  # pylint: disable=g-import-not-at-top
  make_file_cache = getattr(jax_cache, 'get_file_cache', None)
  if make_file_cache is None or getattr(make_file_cache, 'mixer_replaceable', False):
    if make_file_cache is None:
      logging.warning('This JAX has no get_file_cache: a cache entry cut short by a kill '
                      'stays unreadable (JAX then compiles again at every start).')
    return

  def get_file_cache(path):
    made = make_file_cache(path)
    if made is None or not hasattr(made[0], 'eviction_enabled'):  # Not the plain file cache.
      return made
    return _ReplaceableEntries(made[0]), made[1]

  get_file_cache.mixer_replaceable = True
  jax_cache.get_file_cache = get_file_cache


def _remove_stale_partials(cache_dir: str) -> None:
  """Deletes the temporary files (`paths.atomic_write`'s) that killed writers left.

  `paths.remove_stale_temp_files` would also take a file another run sharing the
  directory is writing now, and needs the entries' names; so by age instead.
  Buckets have none: an object is published whole or not at all.
  """
  if paths.is_remote(cache_dir):
    return
  for partial in glob.glob(os.path.join(cache_dir, f'.*{_ENTRY_SUFFIX}.*.tmp')):
    try:
      if time.time() - os.path.getmtime(partial) > STALE_PARTIAL_SECS:
        os.remove(partial)
    except FileNotFoundError:  # Renamed into place or removed by its writer meanwhile.
      pass


def enable(cache_dir: str, min_compile_time_secs: float = DEFAULT_MIN_COMPILE_TIME_SECS) -> None:
  """Turns on the persistent compilation cache in `cache_dir` (created if missing)."""
  if not cache_dir:
    raise ValueError('compile_cache.enable needs a directory (a local path or gs://...).')
  jax.config.update('jax_persistent_cache_min_compile_time_secs', min_compile_time_secs)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  _install_replaceable_entries()
  _remove_stale_partials(cache_dir)
  compilation_cache.reset_cache()  # Drop a cache state fixed by earlier compilations.
  compilation_cache.set_cache_dir(cache_dir)
  logging.info('Persistent compilation cache: %s (entries compiled in >= %.2f s).',
               cache_dir, min_compile_time_secs)


def disable() -> None:
  """Turns the persistent cache off again (tests, benchmarks of cold compiles)."""
  jax.config.update('jax_compilation_cache_dir', None)
  compilation_cache.reset_cache()
