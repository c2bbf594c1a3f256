"""TensorFlow's first import made quiet, for every `python -m mixer.<command>`.

TensorFlow (tf.data, export, serving) writes a few lines from C++ while it
loads, before its logging is set up, so TF_CPP_MIN_LOG_LEVEL cannot hide them
("oneDNN custom operations are on", "All log messages before
absl::InitializeLog() ..."; TF 2.21 prints each twice). `quiet_first_import`
makes the first `import tensorflow`, wherever it happens (tensorflow_datasets
included), drop just those lines from the process's stderr; a command that
never needs TensorFlow does not load it. `mixer/__init__.py` calls it when the
package is started as a command, `mixer.main` when it is imported.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

_STARTUP_NOISE = re.compile(
    r'All log messages before absl::InitializeLog\(\) is called are written to STDERR'
    r'|oneDNN custom operations are on')


@contextlib.contextmanager
def _without_native_stderr_lines(pattern: re.Pattern):
  """Drops lines matching `pattern` that C++ code writes to fd 2 inside the block.

  Everything else written meanwhile (a real error, a traceback) is passed on,
  in order, when the block ends, also if it raises.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      for line in capture.read().decode('utf-8', 'replace').splitlines(keepends=True):
        if not pattern.search(line):
          sys.stderr.write(line)
      sys.stderr.flush()


class _QuietFirstImport(importlib.abc.MetaPathFinder):
  """Finds `tensorflow` once, with a loader that runs its import inside the stderr filter."""

  def find_spec(self, name, path=None, target=None):
    del path, target
    if name != 'tensorflow':
      return None
    sys.meta_path.remove(self)  # Once; and the real finders locate the package.
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
      return spec
    exec_module = spec.loader.exec_module

    def quiet_exec_module(module):
      with _without_native_stderr_lines(_STARTUP_NOISE):
        exec_module(module)

    spec.loader.exec_module = quiet_exec_module
    return spec


def quiet_first_import() -> None:
  """Makes the first `import tensorflow` drop TF's start-up lines; its INFO logs are off too.

  A TF_CPP_MIN_LOG_LEVEL set by the user wins. Nothing is imported here.
  """
  if 'tensorflow' in sys.modules or any(isinstance(f, _QuietFirstImport) for f in sys.meta_path):
    return
  # TensorFlow reads this when it loads: hide its C++ INFO lines (CPU-feature notes).
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  sys.meta_path.insert(0, _QuietFirstImport())
