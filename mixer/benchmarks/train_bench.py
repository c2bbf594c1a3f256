"""Train-step throughput and memory: images/s per device and compiled bytes per device.

Times the trainer's real update (`mixer.train.make_train_step`: forward,
backward, Adam with weight decay and clipping, sharded by the config's rules)
on synthetic batches already on the devices, so it measures the model and the
mesh, not the input pipeline (see `input_bench` for that). Compilation and the
first step are excluded. The paper's reference is 1384 img/s/core for Mixer-B/16
at 224 on TPU v3 (Table 3), measured with the best batch size per model.

  python -m mixer.benchmarks.train_bench --model=Mixer-B_16 --batch_size=256 \
      --dtype=bfloat16          # on a GPU/TPU
  python -m mixer.benchmarks.train_bench   # CPU default: Mixer-S_32, batch 16
"""

from __future__ import annotations

import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixer import config_lib, losses, optim, sharding, train

PAPER_IMG_PER_SEC_PER_CORE = {'Mixer-S_32': 11489, 'Mixer-S_16': 3994, 'Mixer-B_32': 4208,
                              'Mixer-B_16': 1384, 'Mixer-L_32': 1314, 'Mixer-L_16': 419,
                              'Mixer-H_14': 194}  # TPU v3, paper Table 3.


def run(model_name: str = 'Mixer-S_32', batch_size: int = 16, image_size: int = 224,
        steps: int = 5, dtype: str = 'float32', fsdp: int = 1) -> dict:
  config = config_lib.base_config()
  config.model.name = model_name
  config.update(image_size=image_size, num_classes=1000, batch_size=batch_size,
                model_dtype=dtype, weight_decay=0.1, warmup_steps=1, total_steps=10_000)
  config.mesh.fsdp = fsdp
  mesh = sharding.create_mesh(config)
  rules = sharding.logical_rules(config)
  sharding.check_batch_size(batch_size, mesh)
  model = train.build_model(config)
  tx = optim.make_optimizer(config)
  init_state = train.make_init_state(model, tx, config)
  rng = jax.random.key(0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, state_sharding = train.abstract_train_state(init_state, tx, mesh, rules, rng)
    state = jax.jit(init_state, out_shardings=state_sharding)(rng)
    step_fn = train.make_train_step(model, losses.get_loss_fn('softmax_xent'), tx,
                                    optim.make_schedule(config), config, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    images = jax.device_put(
        np.random.default_rng(0).uniform(-1, 1, (batch_size, image_size, image_size, 3))
        .astype(np.float32), batch_sharding)
    labels = jax.device_put(np.eye(1000, dtype=np.float32)[np.arange(batch_size) % 1000],
                            batch_sharding)
    batch = {'image': images, 'labels': labels}
    compile_start = time.perf_counter()
    compiled = jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding, None),
                       out_shardings=(state_sharding, None),
                       donate_argnums=(0,)).lower(state, batch, rng).compile()
    compile_seconds = time.perf_counter() - compile_start
    state, metrics = compiled(state, batch, rng)  # Warm-up.
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
  plan = train.memory_per_device(compiled)
  rate = steps * batch_size / seconds
  return {
      'benchmark': 'train_step', 'model': model_name, 'image_size': image_size,
      'batch_size': batch_size, 'dtype': dtype, 'mesh': dict(mesh.shape),
      'devices': jax.device_count(), 'device_kind': jax.devices()[0].device_kind,
      'compile_seconds': round(compile_seconds, 1), 'step_seconds': round(seconds / steps, 4),
      'img_per_sec': round(rate, 1), 'img_per_sec_per_device': round(rate / jax.device_count(), 1),
      'paper_tpu_v3_img_per_sec_per_core': PAPER_IMG_PER_SEC_PER_CORE.get(model_name),
      'compiled_bytes_per_device': plan['total'] if plan else None,
      'loss_is_finite': bool(jnp.isfinite(metrics['train/loss'])),
  }


def main():
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  model = flags.DEFINE_string('model', 'Mixer-S_32', 'Variant name.')
  batch = flags.DEFINE_integer('batch_size', 16, 'Global batch size.')
  size = flags.DEFINE_integer('image_size', 224, 'Image size.')
  steps = flags.DEFINE_integer('steps', 5, 'Timed steps.')
  dtype = flags.DEFINE_string('dtype', 'float32', 'Compute dtype.')
  fsdp = flags.DEFINE_integer('fsdp', 1, 'FSDP axis size.')

  def _main(argv):
    del argv
    print(json.dumps(run(model.value, batch.value, size.value, steps.value, dtype.value,
                         fsdp.value)))

  app.run(_main)


if __name__ == '__main__':
  main()
