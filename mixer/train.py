"""The trainer: `train_and_evaluate(config, workdir)`, read top to bottom.

One linear function, in the order a run happens: check the config, build the
mesh, the model and the optimizer, create (or restore, or load from a released
`.npz`) the train state already sharded, compile the step, then loop: train,
log, evaluate, checkpoint, until `total_steps` or a preemption. `mixer.main`
is only the command line around it; tests and notebooks call it directly.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from mixer import checkpoint, config_lib, input_pipeline, losses, models, optim, reporting
from mixer import weights
from mixer import sharding
from mixer.evaluators import classification, fewshot


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


def build_model(config) -> models.MlpMixer:
  sizes = {f: config.model.get(f) for f in config_lib.MODEL_SIZE_FIELDS}
  return models.get_model(config.model.name, num_classes=config.num_classes,
                          dtype=jnp.dtype(config.model_dtype), **sizes)


def describe_model(model: models.MlpMixer, config) -> dict[str, Any]:
  """What must match for a checkpoint to be this run's (stored in each checkpoint)."""
  return {'name': config.model.name, 'image_size': int(config.image_size),
          **{f: getattr(model, f) for f in ('num_classes', 'patch_size', 'hidden_dim',
                                            'num_blocks', 'tokens_mlp_dim', 'channels_mlp_dim')}}


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


def compile_train_step(model, loss_fn, tx, schedule, config, mesh, rules, abstract_state,
                       state_sharding, rng):
  """Ahead-of-time compiled update step for global batches of `config.batch_size`.

  Only shapes and shardings are needed (no data, no state in memory), so the
  same call compiles for a TPU topology from a CPU machine (`mixer.compile_check`).
  The state argument is donated: the step updates it in place.
  """
  repl = sharding.replicated(mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  abstract_batch = {
      'image': jax.ShapeDtypeStruct((config.batch_size, config.image_size, config.image_size, 3),
                                    jnp.float32, sharding=batch_sharding),
      'labels': jax.ShapeDtypeStruct((config.batch_size, config.num_classes), jnp.float32,
                                     sharding=batch_sharding)}
  abstract_rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=repl)
  train_step = jax.jit(
      make_train_step(model, loss_fn, tx, schedule, config, mesh),
      in_shardings=(state_sharding, batch_sharding, repl),
      out_shardings=(state_sharding, repl),
      donate_argnums=(0,))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return train_step.lower(abstract_state, abstract_batch, abstract_rng).compile()


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


def _log_memory(compiled) -> None:
  plan = memory_per_device(compiled)
  if plan is None:
    logging.info('The backend reports no memory analysis for the train step.')
    return
  logging.info('Compiled train step, per device: %s', ', '.join(
      f'{name}={size / 2**20:.1f} MiB' for name, size in plan.items()))


def _gather_to_host(tree):
  """Full numpy values of (possibly multi-host sharded) arrays, on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains and evaluates; resumes from `<workdir>/checkpoints` when present.

  Returns the last evaluation's metrics (with the final step under 'step').
  """
  #################### Config and workdir ####################
  config_lib.validate(config)
  workdir = reporting.prepare_workdir(workdir)
  if config.warmup_steps >= config.total_steps:
    raise ValueError(f'config.warmup_steps={config.warmup_steps} must be below '
                     f'config.total_steps={config.total_steps}.')
  if config.batch_size % config.grad_accum_steps:
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by '
                     f'config.grad_accum_steps={config.grad_accum_steps}.')
  logging.info('Config:\n%s', config)

  #################### Mesh ####################
  mesh = sharding.create_mesh(config)
  rules = sharding.logical_rules(config)
  logging.info('Mesh %s over %d devices (%s) in %d process(es).', dict(mesh.shape),
               jax.device_count(), jax.devices()[0].device_kind, jax.process_count())
  sharding.check_batch_size(config.batch_size // config.grad_accum_steps, mesh,
                            'config.batch_size / config.grad_accum_steps')
  sharding.check_batch_size(config.eval_batch_size, mesh, 'config.eval_batch_size')
  repl = sharding.replicated(mesh)

  #################### Model, loss and optimizer ####################
  model = build_model(config)
  loss_fn = losses.get_loss_fn(config.loss)
  schedule = optim.make_schedule(config)
  tx = optim.make_optimizer(config)

  #################### Abstract state and its shardings ####################
  # Shapes come from jax.eval_shape and shardings from the logical-axis rules:
  # no unsharded copy of the state is ever built on any device.
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  init_state = make_init_state(model, tx, config)
  abstract_state, state_sharding = abstract_train_state(init_state, tx, mesh, rules, init_rng)
  params_sharding, opt_sharding = state_sharding['params'], state_sharding['opt_state']
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                 abstract_state['params'])
  logging.info('Parameters:\n%s', parameter_overview.get_parameter_overview(
      abstract_params, include_stats=False))

  #################### Create, restore or load the state ####################
  model_meta = describe_model(model, config)
  checkpointer = checkpoint.TrainCheckpointer(workdir, config.checkpoint_every,
                                              config.keep_checkpoints)
  latest = checkpointer.latest_step()
  core_hours = 0.0
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    if latest is not None:
      saved_model = checkpointer.read_meta(latest).get('model')
      if saved_model != model_meta:
        differences = {k: (saved_model.get(k) if saved_model else None, v)
                       for k, v in model_meta.items()
                       if not saved_model or saved_model.get(k) != v}
        raise ValueError(
            f'{workdir} holds a checkpoint (step {latest}) of another model: '
            f'(checkpoint, config) differ in {differences}. Use a new --workdir for this config, '
            'or restore the config of that run. Nothing in the workdir was changed.')
      state, meta = checkpointer.restore(latest, abstract_state)
      core_hours = float(meta.get('core_hours', 0.0))
      logging.info('Resumed from step %d of %s.', latest, checkpointer.directory)
    elif config.init_from:
      params = weights.load_for_model(
          config.init_from, model, config.image_size,
          from_image_size=config.init_from_image_size, head=config.init_head,
          head_bias=config.init_head_bias)
      params = sharding.put_host_tree(params, params_sharding)
      opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(params)
      state = {'step': jax.device_put(jnp.zeros((), jnp.int32), repl), 'params': params,
               'opt_state': opt_state}
      logging.info('Initialised from %s.', config.init_from)
    else:
      state = jax.jit(init_state, out_shardings=state_sharding)(init_rng)
  start_step = int(jax.device_get(state['step']))

  #################### Input pipeline ####################
  train_iter = input_pipeline.create_train_iterator(config, start_step=start_step)
  eval_data = input_pipeline.create_eval_iterator(config)

  #################### Compile the update step ####################
  compile_start = time.perf_counter()
  compiled_step = compile_train_step(model, loss_fn, tx, schedule, config, mesh, rules,
                                     abstract_state, state_sharding, dropout_rng)
  logging.info('Compiled the train step in %.1f s.', time.perf_counter() - compile_start)
  _log_memory(compiled_step)

  #################### Evaluators ####################
  evaluator = classification.ClassificationEvaluator(model, loss_fn, mesh, eval_data)
  real_evaluator = None
  if config.real_eval:  # ImageNet ReaL labels (Beyer et al. 2020) for the validation images.
    real_evaluator = classification.ClassificationEvaluator(
        model, loss_fn, mesh, input_pipeline.create_eval_iterator(
            config, dataset='imagenet2012_real', split='validation'), prefix='real')

  @jax.jit
  def _prelogits(params, images):
    return model.apply({'params': params}, images, train=False, return_prelogits=True)

  def embed_fn(params, local_batch):
    batch = sharding.put_local_batch(local_batch, mesh)
    outputs = (_prelogits(params, batch['image']), batch['labels'], batch['mask'])
    return tuple(np.asarray(x) for x in _gather_to_host(outputs))

  fewshot_evaluator = None
  if config.fewshot.every_steps and config.fewshot.datasets:
    fewshot_evaluator = fewshot.FewShotEvaluator(
        config.fewshot, embed_fn,
        lambda dataset, split: input_pipeline.create_eval_iterator(
            config, dataset=dataset, split=split))

  def evaluate(params, step):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      results = evaluator.run(params)
      if real_evaluator:
        results['eval/real_accuracy'] = real_evaluator.run(params)['real/real_accuracy']
      if fewshot_evaluator and (step % config.fewshot.every_steps == 0
                                or step == config.total_steps):
        results.update(fewshot_evaluator.run(params))
    return results

  #################### Train loop ####################
  writer = reporting.create_writer(workdir)
  throughput = reporting.Throughput(jax.device_count(), core_hours)
  # Logs steps/s and the ETA (not written to metrics.jsonl: perf/* covers throughput).
  progress = periodic_actions.ReportProgress(
      num_train_steps=config.total_steps, every_steps=config.log_every, every_secs=None)
  profile_steps = tuple(config.profile_steps or ())
  results: dict[str, float] = {}
  step = start_step
  if step == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items()
                          if isinstance(v, (int, float, str, bool))})

  def meta():
    return {'model': model_meta, 'core_hours': throughput.core_hours}

  def fetch_finite_metrics(metrics, step):
    values = jax.device_get(metrics)
    if not math.isfinite(float(values['train/loss'])):
      raise NonFiniteLossError(
          f'Training loss is {values["train/loss"]} at step {step}: aborting. The last good '
          f'checkpoint (step {checkpointer.latest_step()}) in {checkpointer.directory} is kept. '
          'Lower config.lr, raise config.warmup_steps, or use float32 (config.model_dtype).')
    return values

  logging.info('Training from step %d to %d.', step, config.total_steps)
  throughput.start()
  with metric_writers.ensure_flushes(writer):
    while step < config.total_steps:
      if profile_steps and step == profile_steps[0] and jax.process_index() == 0:
        jax.profiler.start_trace(os.path.join(workdir, 'profile'))
      local_batch = next(train_iter)
      batch = sharding.put_local_batch(
          {'image': local_batch['image'], 'labels': local_batch['labels']}, mesh)
      state, metrics = compiled_step(state, batch, dropout_rng)
      step += 1
      throughput.add_images(config.batch_size)
      progress(step)
      if profile_steps and step == profile_steps[1] and jax.process_index() == 0:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()

      is_last = step == config.total_steps
      if step % config.log_every == 0 or is_last:
        values = fetch_finite_metrics(metrics, step)
        rate = throughput.pause()
        values['perf/core_hours'] = throughput.core_hours
        if rate is not None:
          values['perf/img_per_sec_per_core'] = rate
        writer.write_scalars(step, values)
        throughput.start()
      if step % config.eval_every == 0 or is_last:
        throughput.pause()
        results = evaluate(state['params'], step)
        writer.write_scalars(step, results)
        logging.info('Step %d: %s', step, results)
        throughput.start()
      if step % config.checkpoint_every == 0 or is_last:
        fetch_finite_metrics(metrics, step)  # Never checkpoint a diverged state.
      preempted = checkpointer.reached_preemption(step)
      if step % config.checkpoint_every == 0 or is_last or preempted:
        throughput.pause()
        checkpointer.maybe_save(step, state, meta(), force=is_last or preempted)
        throughput.start()
      if preempted:
        logging.warning('Preemption at step %d: checkpoint saved, stopping.', step)
        checkpointer.close()
        # ensure_flushes (above) flushes the writer on the way out.
        return {'step': step, **results}

  #################### Finish: final eval, export, curves ####################
  throughput.pause()
  if not results:  # Resumed at the end (e.g. preempted during the final export).
    results = evaluate(state['params'], step)
    writer.write_scalars(step, results)
  checkpointer.close()
  final_params = _gather_to_host(state['params'])
  final_path = os.path.join(workdir, 'final.npz')
  if jax.process_index() == 0:
    weights.save_npz(final_params, final_path)
    curves = reporting.plot_curves(workdir)
    logging.info('Exported %s; training curves in %s.', final_path, curves)
    print(f'Final: {results}\nExported released-format weights to {final_path}\n'
          f'Predict with (the architecture is read from the file):\n  python -m mixer.predict '
          f'--weights={final_path} --image_size={config.image_size} '
          '--labels=<one class name per line> IMAGE...')
  multihost_utils.sync_global_devices('mixer_train_done')
  writer.close()
  return {'step': step, **results}
