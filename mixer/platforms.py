"""Which jax backend a command uses: the CPU on a machine with libtpu but no TPU.

libtpu is installed by the `tpu` extra, on TPU VMs and also on any machine that
runs `mixer.compile_check` (compiling for a TPU slice needs the TPU compiler;
`make install` installs it for the tests). On a machine without a TPU chip,
jax's first backend query would still load libtpu, which prints several lines of
start-up warnings (missing TPU metadata, worker host names) before jax falls
back to the CPU. `use_cpu_without_accelerator` skips that attempt; `mixer/__init__.py`
calls it, so every `python -m mixer.<command>` starts quietly.
"""

from __future__ import annotations

import importlib.util
import os


def use_cpu_without_accelerator() -> None:
  """Restricts jax to the CPU when libtpu is installed but no TPU (and no GPU) is attached.

  Call before the first backend query (jax.devices(), jit, ...). A JAX_PLATFORMS
  set by the user wins; on a TPU VM or a GPU machine nothing changes.
  """
  if os.environ.get('JAX_PLATFORMS') or importlib.util.find_spec('libtpu') is None:
    return
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  if has_tpu_chips() or hardware_utils.has_visible_nvidia_gpu():
    return
  jax.config.update('jax_platforms', 'cpu')


def has_tpu_chips() -> bool:
  """Whether TPU chips are attached to this machine."""
  # Private but pinned (jax==0.10.2): the same PCI scan jax's own TPU start-up does
  # (jax._src.cloud_tpu_init), so "no TPU" here means what it means to jax.
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
