"""MLP-Mixer in JAX/Flax."""

from mixer import platforms as _platforms

# Every entry point (python -m mixer.main, mixer.compile_check, mixer.predict, ...) imports
# this package first: on a machine with libtpu but no TPU, jax is kept on the CPU before its
# first backend query, so libtpu's start-up warnings never show (see mixer/platforms.py).
_platforms.use_cpu_without_accelerator()

import sys as _sys  # noqa: E402

# While `python -m mixer.<command>` imports this package, sys.argv[0] is '-m'
# (the module's path only once it runs): a command, not a library import, so
# TensorFlow's first import, if the command needs it, hides its start-up lines.
if _sys.argv and _sys.argv[0] == '-m':
  from mixer import tf_startup as _tf_startup  # noqa: E402
  _tf_startup.quiet_first_import()
