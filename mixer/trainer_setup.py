"""The one set-up path: config -> mesh, rules, model, loss, optimizer, abstract state, shardings.

`build(config, devices)` is what the trainer, `mixer.compile_check`, the
benchmarks and the sharding tests call, so each of them runs exactly the
trainer's step. Nothing here allocates the state: shapes come from
`jax.eval_shape`, shardings from the logical-axis rules, and
`Setup.create_state()` is `jax.jit(init, out_shardings=...)`, so no unsharded
copy is ever built on any device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from mixer import losses, models, optim, sharding


def build_model(config, num_classes: int | None = None) -> models.MlpMixer:
  """The config's MlpMixer: the `model.name` variant with every non-None `config.model` field."""
  overrides = {field: value for field, value in config.model.items()
               if field != 'name' and value is not None}
  return models.get_model(
      config.model.name,
      num_classes=config.num_classes if num_classes is None else num_classes,
      dtype=jnp.dtype(config.model_dtype), **overrides)


def describe_model(model: models.MlpMixer, config) -> dict[str, Any]:
  """What must match for a checkpoint to be this run's (stored in each checkpoint)."""
  return {'name': config.model.name, 'image_size': int(config.image_size),
          'num_classes': model.num_classes, 'scan_blocks': bool(model.scan_blocks),
          **{f: getattr(model, f) for f in models.ARCHITECTURE_FIELDS}}


def make_init_state(model, tx, config):
  """`init_state(rng, boxed=False)`: the train state dict {'step', 'params', 'opt_state'}.

  With boxed=True the params keep their logical-axis boxes (for the sharding
  rules) and the optimizer state is left out.
  """
  def init_state(rng, boxed=False):
    dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    params = model.init({'params': rng}, dummy, train=False)['params']
    if config.init_head_bias and 'head' in params:
      params['head']['bias'] = jax.tree.map(
          lambda b: jnp.full_like(b, config.init_head_bias), params['head']['bias'])
    if boxed:
      return {'params': params}
    params = nn.unbox(params)
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}
  return init_state


def abstract_train_state(init_state, tx, mesh, rules, rng):
  """Shapes (jax.eval_shape) and shardings (logical rules) of the train state; nothing allocated."""
  boxed = jax.eval_shape(functools.partial(init_state, boxed=True), rng)['params']
  params_sharding = sharding.param_shardings(boxed, mesh, rules)
  opt_sharding = sharding.opt_state_shardings(
      tx, models.unbox(boxed), params_sharding, mesh)
  state_sharding = {'step': sharding.replicated(mesh), 'params': params_sharding,
                    'opt_state': opt_sharding}
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(init_state, rng), state_sharding)
  return abstract_state, state_sharding


def make_train_step(model, loss_fn, tx, schedule, config, mesh):
  """The update: forward/backward over `grad_accum_steps` micro-batches, then one optimizer step."""
  accum = int(config.grad_accum_steps)

  def micro_loss(params, images, labels, rng):
    logits = model.apply({'params': params}, images, train=True, rngs={'dropout': rng})
    return jnp.mean(loss_fn(logits, labels))

  def loss_and_grads(params, images, labels, rng):
    if accum == 1:
      return jax.value_and_grad(micro_loss)(params, images, labels, rng)
    # Micro-batch i takes examples i, i+accum, ...: each one is spread over all
    # data-parallel devices instead of living on a few of them.
    def split(x):
      x = jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1)
      return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, sharding.BATCH_AXES)))

    def accumulate(carry, xs):
      index, micro_images, micro_labels = xs
      loss, grads = jax.value_and_grad(micro_loss)(
          params, micro_images, micro_labels, jax.random.fold_in(rng, index))
      loss_sum, grad_sum = carry
      return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(
        accumulate, (jnp.zeros((), jnp.float32), zeros),
        (jnp.arange(accum), split(images), split(labels)))
    return loss / accum, jax.tree.map(lambda g: g / accum, grads)

  def train_step(state, batch, rng):
    rng = jax.random.fold_in(rng, state['step'])
    loss, grads = loss_and_grads(state['params'], batch['image'], batch['labels'], rng)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = {'train/loss': loss,
               'train/grad_norm': optax.tree.norm(grads),
               'train/param_norm': optax.tree.norm(params),
               'train/learning_rate': schedule(state['step'])}
    return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, metrics

  return train_step


def _lower_train_step(setup: Setup):
  """`setup`'s update step, traced and lowered to StableHLO (what `compile_train_step` compiles)."""
  config, mesh, rng = setup.config, setup.mesh, setup.dropout_rng
  repl = sharding.replicated(mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  abstract_batch = {
      'image': jax.ShapeDtypeStruct((config.batch_size, config.image_size, config.image_size, 3),
                                    jnp.float32, sharding=batch_sharding),
      'labels': jax.ShapeDtypeStruct((config.batch_size, config.num_classes), jnp.float32,
                                     sharding=batch_sharding)}
  abstract_rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=repl)
  train_step = jax.jit(
      make_train_step(setup.model, setup.loss_fn, setup.tx, setup.schedule, config, mesh),
      in_shardings=(setup.state_sharding, batch_sharding, repl),
      out_shardings=(setup.state_sharding, repl),
      donate_argnums=(0,))
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    return train_step.lower(setup.abstract_state, abstract_batch, abstract_rng)


def memory_per_device(compiled) -> dict[str, int] | None:
  """Bytes per device XLA planned for a compiled step, or None where the backend has no plan.

  'total' = arguments + outputs + temporaries - donated (aliased) buffers, the
  peak the step needs besides the program itself.
  """
  try:
    memory = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    memory = None
  if memory is None:
    return None
  plan = {name: int(getattr(memory, f'{name}_size_in_bytes'))
          for name in ('argument', 'output', 'temp', 'alias', 'generated_code')}
  plan['total'] = plan['argument'] + plan['output'] + plan['temp'] - plan['alias']
  return plan


@dataclasses.dataclass
class Setup:
  """Everything the train step needs, built from a config; see `build`."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  rules: tuple
  model: models.MlpMixer
  loss_fn: Callable
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  init_state: Callable
  abstract_state: Any
  state_sharding: Any
  init_rng: jax.Array
  dropout_rng: jax.Array

  @property
  def params_sharding(self):
    return self.state_sharding['params']

  @property
  def opt_sharding(self):
    return self.state_sharding['opt_state']

  @property
  def abstract_params(self):
    """Shapes and dtypes of the params, without shardings (for overviews and surgery)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        self.abstract_state['params'])

  def context(self):
    """The mesh and logical-axis rules every jit of the model runs under."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def create_state(self):
    """A freshly initialised train state, created directly in its shardings."""
    with self.context():
      return jax.jit(self.init_state, out_shardings=self.state_sharding)(self.init_rng)

  def state_from_params(self, params):
    """A train state at step 0 around given (host) params, e.g. released weights."""
    with self.context():
      params = sharding.put_host_tree(params, self.params_sharding)
      opt_state = jax.jit(self.tx.init, out_shardings=self.opt_sharding)(params)
      step = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(self.mesh))
      return {'step': step, 'params': params, 'opt_state': opt_state}


def build(config: ml_collections.ConfigDict, devices=None) -> Setup:
  """Builds the mesh (over `devices`, default all), model, optimizer and abstract state."""
  mesh = sharding.create_mesh(config, devices)
  rules = sharding.logical_rules(config)
  sharding.check_batch_size(config.batch_size // config.grad_accum_steps, mesh,
                            'config.batch_size / config.grad_accum_steps')
  model = build_model(config)
  tx = optim.make_optimizer(config)
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  init_state = make_init_state(model, tx, config)
  abstract_state, state_sharding = abstract_train_state(init_state, tx, mesh, rules, init_rng)
  return Setup(config=config, mesh=mesh, rules=rules, model=model,
               loss_fn=losses.get_loss_fn(config.loss), schedule=optim.make_schedule(config),
               tx=tx, init_state=init_state, abstract_state=abstract_state,
               state_sharding=state_sharding, init_rng=init_rng, dropout_rng=dropout_rng)


def compile_train_step(setup: Setup):
  """`setup`'s update step, compiled ahead of time for global batches of `config.batch_size`.

  Only shapes and shardings are needed (no data, no state in memory), so the
  same call compiles for a TPU topology from a CPU machine (`mixer.compile_check`).
  The state argument is donated: the step updates it in place. Call the result
  as `compiled(state, batch, setup.dropout_rng)`.
  """
  return _lower_train_step(setup).compile()


class CompileTime(NamedTuple):
  """What getting the compiled train step cost this process.

  `seconds` is wall-clock, the rest CPU seconds of this process (all threads),
  which other load on the machine does not inflate. `tracing_cpu_seconds` is
  the Python side (tracing the step, lowering it to StableHLO), paid at every
  start; `xla_cpu_seconds` is XLA's compile, or, when `from_cache`, loading
  the executable the persistent compilation cache (`mixer.compile_cache`) kept.
  """
  seconds: float
  cpu_seconds: float
  tracing_cpu_seconds: float
  xla_cpu_seconds: float
  from_cache: bool

  def describe(self) -> str:
    """One line for the log, e.g. 'Compiled the train step in 3.9 s (...)'."""
    what = ('Loaded the train step from the persistent compilation cache' if self.from_cache
            else 'Compiled the train step')
    xla = 'loading' if self.from_cache else 'XLA'
    return (f'{what} in {self.seconds:.1f} s (CPU time: tracing and lowering '
            f'{self.tracing_cpu_seconds:.1f} s, {xla} {self.xla_cpu_seconds:.1f} s).')


_CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'


def timed_compile_train_step(setup: Setup):
  """`compile_train_step(setup)` and its `CompileTime`."""
  hits = []

  def on_event(name, **kwargs):
    del kwargs
    if name == _CACHE_HIT_EVENT:
      hits.append(name)

  start, cpu_start = time.perf_counter(), time.process_time()
  lowered = _lower_train_step(setup)
  cpu_lowered = time.process_time()
  jax.monitoring.register_event_listener(on_event)
  try:
    compiled = lowered.compile()
  finally:
    jax.monitoring.unregister_event_listener(on_event)
  cpu_end = time.process_time()
  return compiled, CompileTime(
      seconds=time.perf_counter() - start, cpu_seconds=cpu_end - cpu_start,
      tracing_cpu_seconds=cpu_lowered - cpu_start, xla_cpu_seconds=cpu_end - cpu_lowered,
      from_cache=bool(hits))


def log_memory(compiled) -> None:
  """Logs the per-device memory plan of a compiled step (where the backend has one)."""
  plan = memory_per_device(compiled)
  if plan is None:
    logging.info('The backend reports no memory analysis for the train step.')
    return
  logging.info('Compiled train step, per device: %s', ', '.join(
      f'{name}={size / 2**20:.1f} MiB' for name, size in plan.items()))
