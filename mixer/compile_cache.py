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
"""

from __future__ import annotations

import jax
from absl import logging
from jax.experimental.compilation_cache import compilation_cache

DEFAULT_MIN_COMPILE_TIME_SECS = 0.1


def enable(cache_dir: str, min_compile_time_secs: float = DEFAULT_MIN_COMPILE_TIME_SECS) -> None:
  """Turns on the persistent compilation cache in `cache_dir` (created if missing)."""
  if not cache_dir:
    raise ValueError('compile_cache.enable needs a directory (a local path or gs://...).')
  jax.config.update('jax_persistent_cache_min_compile_time_secs', min_compile_time_secs)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  compilation_cache.reset_cache()  # Drop a cache state fixed by earlier compilations.
  compilation_cache.set_cache_dir(cache_dir)
  logging.info('Persistent compilation cache: %s (entries compiled in >= %.2f s).',
               cache_dir, min_compile_time_secs)


def disable() -> None:
  """Turns the persistent cache off again (tests, benchmarks of cold compiles)."""
  jax.config.update('jax_compilation_cache_dir', None)
  compilation_cache.reset_cache()
