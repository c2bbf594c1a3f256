"""TensorFlow loaded once and quietly, for every `python -m mixer.<command>`.

TensorFlow (tf.data, export, serving) writes a few lines from C++ while it
loads, before its logging is set up, so TF_CPP_MIN_LOG_LEVEL cannot hide them
("oneDNN custom operations are on", "All log messages before
absl::InitializeLog() ..."; TF 2.21 prints each twice). `import_quietly` loads
TensorFlow with just those lines filtered out of the process's stderr.
`mixer/__init__.py` calls it when the package is started as a command, so
`mixer.main`, `mixer.compile_check`, `mixer.predict` and the rest start alike.
"""

from __future__ import annotations

import contextlib
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


def import_quietly() -> None:
  """Imports TensorFlow (once) without its C++ start-up lines; its INFO logs are off too.

  A TF_CPP_MIN_LOG_LEVEL set by the user wins.
  """
  if 'tensorflow' in sys.modules:
    return
  # TensorFlow reads this when it loads: hide its C++ INFO lines (CPU-feature notes).
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  with _without_native_stderr_lines(_STARTUP_NOISE):
    import tensorflow  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
