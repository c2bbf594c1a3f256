"""Forward pass and train step: images/s per device and model FLOPs utilisation (MFU).

Both run the trainer's own code: `trainer_setup.build(config)` builds mesh,
model, optimizer and shardings; the train step is `trainer_setup.compile_train_step`
(forward, backward, Adam with clipping and weight decay, donated state), the
forward pass is the model's `apply` jitted with the same shardings. Batches are
fixed arrays already on the devices, so neither the input pipeline nor the
trainer loop is measured (see input_bench and e2e_bench for those).

MFU = model FLOPs per second / peak FLOPs per second, per device. Model FLOPs
are counted analytically (`forward_flops`: every matmul, 2 FLOPs per
multiply-add; a train step is 3x the forward: forward + two backward matmuls
per forward matmul; rematerialised recomputation is not counted, as is
usual for MFU). The peak is, on CPU, the best rate of a large matmul of the
benchmark's dtype timed in the same run (the machine's *achievable* matmul
rate, so CPU MFU says how close the model gets to it), and on GPU/TPU the
device's dense bf16 peak from `PEAK_BF16_FLOPS`.

On a CPU shared with other work, wall-clock rates measure the other work too.
The CPU time this process spends (all its threads) does not: on the CPU
backend each record also has `cpu_seconds_per_step` and `mfu_cpu_time`
(model FLOPs per CPU-second over the matmul's FLOPs per CPU-second), the
figures to compare across runs on a loaded machine. XLA's own FLOP count of the
compiled program (`xla_flops`, where the backend reports one) is recorded too.

  python -m mixer.benchmarks.run --benchmarks=forward,train --models=Mixer-B_16 \\
      --batch_sizes=128,256 --dtype=bfloat16
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mixer import config_lib, models, sharding, trainer_setup

# Dense bf16 peak per JAX device (vendor data sheets). A TPU v2/v3 JAX device is
# one core (half a chip); from v4 on a device is a chip.
PEAK_BF16_FLOPS = {
    'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L4': 121e12,
    'TPU v2': 22.5e12, 'TPU v3': 61.5e12, 'TPU v4': 275e12, 'TPU v5 lite': 197e12,
    'TPU v5': 459e12, 'TPU v6 lite': 918e12,
}
PAPER_IMG_PER_SEC_PER_CORE = {'Mixer-S_32': 11489, 'Mixer-S_16': 3994, 'Mixer-B_32': 4208,
                              'Mixer-B_16': 1384, 'Mixer-L_32': 1314, 'Mixer-L_16': 419,
                              'Mixer-H_14': 194}  # TPU v3, paper Table 3 (train).


def bench_config(model: str = 'Mixer-S_32', batch_size: int = 16, image_size: int = 224,
                 dtype: str = 'float32', scan_blocks: bool = False, remat: str = 'none',
                 fsdp: int = 1, num_classes: int = 1000, num_blocks: int | None = None,
                 residual_dtype: str = 'float32') -> ml_collections.ConfigDict:
  """The base config with a model, batch, resolution, dtype and mesh: what every bench builds.

  `num_blocks` overrides the variant's depth (None: the variant's own).
  """
  config = config_lib.base_config()
  config.model.name = model
  if num_blocks is not None:
    config.model.num_blocks = num_blocks
  config.model.scan_blocks = scan_blocks
  config.model.remat = remat
  config.model.residual_dtype = residual_dtype
  config.update(image_size=image_size, num_classes=num_classes, batch_size=batch_size,
                model_dtype=dtype, weight_decay=0.1, warmup_steps=1, total_steps=10_000)
  config.mesh.fsdp = fsdp
  return config


def config_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What identifies a benchmark record's config (the table's key columns)."""
  return {'model': config.model.name, 'image_size': config.image_size,
          'batch_size': config.batch_size, 'dtype': config.model_dtype,
          'scan_blocks': bool(config.model.scan_blocks), 'remat': config.model.remat,
          'residual_dtype': config.model.residual_dtype or 'float32'}


def forward_flops(model: models.MlpMixer, image_size: int) -> float:
  """Matmul FLOPs of one image's forward pass (2 per multiply-add)."""
  tokens = (image_size // model.patch_size) ** 2
  c = model.hidden_dim
  stem = 2 * tokens * model.patch_size ** 2 * 3 * c
  block = 2 * 2 * c * tokens * model.tokens_mlp_dim + 2 * 2 * tokens * c * model.channels_mlp_dim
  head = 2 * c * model.num_classes
  return float(stem + model.num_blocks * block + head)


def peak_flops_per_device(dtype: str, size: int = 2048, repeats: int = 5) -> dict[str, Any]:
  """The peak MFU is measured against: {'flops' (per s), 'source', 'flops_per_cpu_second'}.

  The data-sheet bf16 peak on GPU/TPU; on CPU a timed matmul (best of
  `repeats`), also per CPU-second of this process.
  """
  kind = jax.devices()[0].device_kind
  if jax.default_backend() != 'cpu':
    for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # 'TPU v5 lite' before 'TPU v5'.
      if name in kind:
        return {'flops': PEAK_BF16_FLOPS[name], 'source': f'{name} dense bf16 data sheet',
                'flops_per_cpu_second': None}
  a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype)
  matmul = jax.jit(lambda x: x @ x).lower(a).compile()
  jax.block_until_ready(matmul(a))
  times = [_time(lambda: matmul(a)) for _ in range(repeats)]
  flops = 2 * size ** 3
  return {'flops': flops / min(w for w, _ in times),
          'source': f'{size}x{size} {dtype} matmul timed in this run (best of {repeats})',
          'flops_per_cpu_second': flops / min(c for _, c in times)}


def _time(fn) -> tuple[float, float]:
  """(wall seconds, CPU seconds of this process) of `fn()`, finished."""
  start, cpu_start = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn())
  return time.perf_counter() - start, time.process_time() - cpu_start


def device_batch(setup: trainer_setup.Setup) -> dict[str, jax.Array]:
  """A fixed batch of the config's shape on the devices: uniform images, one-hot labels.

  The 'synthetic' dataset makes the same batch on the host, but its module
  imports TF, and the device benchmarks run where only jax and flax are.
  """
  config = setup.config
  size, n = config.image_size, config.batch_size
  batch_sharding = sharding.batch_sharding(setup.mesh)
  rng = np.random.default_rng(0)
  return {
      'image': jax.device_put(rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32),
                              batch_sharding),
      'labels': jax.device_put(np.eye(config.num_classes, dtype=np.float32)[
          np.arange(n) % config.num_classes], batch_sharding)}


def _xla_flops(compiled) -> float | None:
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    return None
  if isinstance(analysis, list):  # Older jax: one dict per program.
    analysis = analysis[0] if analysis else None
  return float(analysis['flops']) if analysis and 'flops' in analysis else None


def _rate(run_steps, steps: int, repeats: int) -> tuple[float, float, list[float]]:
  """Median (wall, CPU) seconds per step over `repeats` windows of `steps` steps, and the walls."""
  windows = [_time(lambda: run_steps(steps)) for _ in range(repeats)]
  walls = [w / steps for w, _ in windows]
  return statistics.median(walls), statistics.median(c / steps for _, c in windows), walls


def run(config: ml_collections.ConfigDict, modes=('forward', 'train'), steps: int = 3,
        repeats: int = 3, peak: dict[str, Any] | None = None) -> list[dict[str, Any]]:
  """One result per mode for `config` (built with `bench_config`)."""
  setup = trainer_setup.build(config)
  devices = setup.mesh.devices.size
  per_image = forward_flops(setup.model, config.image_size)
  peak = peak or peak_flops_per_device(config.model_dtype)
  batch = device_batch(setup)
  results = []
  common = {
      **config_fields(config),
      'mesh': dict(setup.mesh.shape), 'devices': devices,
      'device_kind': jax.devices()[0].device_kind,
      'peak_flops_per_device': peak['flops'], 'peak_source': peak['source']}
  unknown = set(modes) - {'forward', 'train'}
  if unknown:
    raise ValueError(f"Unknown mode(s) {sorted(unknown)}: use 'forward' and/or 'train'.")
  state = setup.create_state()
  # The train step donates (consumes) the state: the forward pass goes first.
  for mode in sorted(modes):
    start = time.perf_counter()
    if mode == 'train':
      compiled = trainer_setup.compile_train_step(setup)
      holder = {'state': state}

      def run_steps(n, compiled=compiled, holder=holder):
        metrics = None
        for _ in range(n):
          holder['state'], metrics = compiled(holder['state'], batch, setup.dropout_rng)
        return metrics
      flops_per_image = 3 * per_image
    else:
      params_sharding = setup.params_sharding
      with setup.context():
        forward = jax.jit(lambda p, x: setup.model.apply({'params': p}, x),
                          in_shardings=(params_sharding, sharding.batch_sharding(setup.mesh)))
        compiled = forward.lower(state['params'], batch['image']).compile()
      params = state['params']

      def run_steps(n, compiled=compiled, params=params):
        out = None
        for _ in range(n):
          out = compiled(params, batch['image'])
        return out
      flops_per_image = per_image
    compile_seconds = time.perf_counter() - start
    jax.block_until_ready(run_steps(1))  # Warm-up.
    seconds, cpu_seconds, windows = _rate(run_steps, steps, repeats)
    per_device = config.batch_size / seconds / devices
    plan = trainer_setup.memory_per_device(compiled)
    xla_flops = _xla_flops(compiled)
    results.append({
        'benchmark': mode, **common,
        'compile_seconds': round(compile_seconds, 2),
        'step_seconds': round(seconds, 4),
        'step_seconds_windows': [round(w, 4) for w in windows],
        'img_per_sec_per_device': round(per_device, 2),
        'model_gflops_per_image': round(flops_per_image / 1e9, 3),
        'xla_gflops_per_step': round(xla_flops / 1e9, 2) if xla_flops else None,
        'mfu': round(per_device * flops_per_image / peak['flops'], 4),
        **({'cpu_seconds_per_step': round(cpu_seconds, 4),
            'cpu_ms_per_image': round(1000 * cpu_seconds / config.batch_size, 2),
            # CPU time covers all (fake) devices of the process: whole-step FLOPs.
            'mfu_cpu_time': round(config.batch_size * flops_per_image / cpu_seconds
                                  / peak['flops_per_cpu_second'], 4)}
           if peak['flops_per_cpu_second'] else {}),
        'memory_bytes_per_device': plan['total'] if plan else None,
        'paper_tpu_v3_img_per_sec_per_core': (PAPER_IMG_PER_SEC_PER_CORE.get(config.model.name)
                                              if mode == 'train' else None),
    })
  return results
