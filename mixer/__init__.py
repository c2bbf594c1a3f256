"""MLP-Mixer in JAX/Flax."""

from mixer import platforms as _platforms

# Every entry point (python -m mixer.main, mixer.compile_check, mixer.predict, ...) imports
# this package first: on a machine with libtpu but no TPU, jax is kept on the CPU before its
# first backend query, so libtpu's start-up warnings never show (see mixer/platforms.py).
_platforms.use_cpu_without_accelerator()
