"""The trainer: `train_and_evaluate(config, workdir)`, read top to bottom.

One linear function, in the order a run happens: check the config, build the
mesh, model and optimizer (`mixer.trainer_setup`, the one set-up path), open
the training data and every evaluator's data (so a missing dataset fails in
seconds, before any state exists), create, restore or load the sharded train
state, compile the step, then loop: train, log, run the evaluators that are
due, checkpoint, until `total_steps` or a preemption. The loop knows no
evaluator by name: it asks each one in `config.evals` whether it is due.

`total_steps=0` is evaluate-only mode: with `init_from`, or a workdir that holds
a checkpoint, every evaluator runs once on those parameters, its metrics are
written, and nothing else changes. `mixer.main` is only the command line
around this function; tests and notebooks call it directly.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from jax.experimental import multihost_utils

from mixer import checkpoint, config_lib, evaluators, input_pipeline, models
from mixer import reporting, sharding, trainer_setup, weights


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


@contextlib.contextmanager
def _sigterm_requests_stop(stop: threading.Event):
  """In a single process, SIGTERM sets `stop`: the loop saves a checkpoint and returns.

  Multi-process runs get preemption notices from JAX's coordination service
  instead (all hosts must agree on the step), so no handler is installed there.
  """
  if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
    yield
    return

  def on_sigterm(signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint at the next step, then stopping.')
    stop.set()

  previous = signal.signal(signal.SIGTERM, on_sigterm)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def _gather_to_host(tree):
  """Full numpy values of (possibly multi-host sharded) arrays, on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def _restore_or_create_state(setup, checkpointer, latest, config, workdir):
  """The train state: resumed from `latest`, loaded from `config.init_from`, or fresh.

  Returns (state, core_hours so far, where it came from).
  """
  model_meta = trainer_setup.describe_model(setup.model, config)
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
    with setup.context():
      state, meta = checkpointer.restore(latest, setup.abstract_state)
    return state, float(meta.get('core_hours', 0.0)), f'step {latest} of {checkpointer.directory}'
  if config.init_from:
    params = weights.load_for_model(
        config.init_from, setup.model, config.image_size,
        from_image_size=config.init_from_image_size, head=config.init_head,
        head_bias=config.init_head_bias)
    return setup.state_from_params(params), 0.0, config.init_from
  if not config.total_steps:
    raise ValueError('config.total_steps=0 (evaluate-only) needs parameters to evaluate: set '
                     'config.init_from=PATH.npz, or pass the --workdir of a run that holds a '
                     'checkpoint.')
  return setup.create_state(), 0.0, 'a fresh initialisation'


def _label_names(config) -> Any:
  """What the sidecar records about class names: a built-in set, a list, or None."""
  if config.dataset in ('imagenet2012', 'imagenet21k'):
    return config.dataset
  source, _ = input_pipeline.get_eval_source(config, None)
  return getattr(source, 'class_names', None)


def _export_info(config, model, step: int) -> dict[str, Any]:
  """The sidecar of final.npz: what predict and export need to use it with no flags."""
  classification = [e for e in config.evals.values() if e.type == 'classification']
  pp = classification[0] if classification else evaluators.settings('classification')
  from mixer import preprocess_ops  # pylint: disable=g-import-not-at-top
  return {
      'model': {'name': config.model.name,
                **{f: getattr(model, f) for f in models.ARCHITECTURE_FIELDS}},
      'image_size': int(config.image_size),
      'num_classes': int(model.num_classes),
      'preprocessing': {'pp': pp.pp, 'crop_fraction': float(pp.crop_fraction),
                        'resize_method': preprocess_ops.EVAL_RESIZE_METHOD[pp.pp],
                        'value_range': [-1.0, 1.0]},
      'labels': _label_names(config),
      'loss': config.loss,
      'dataset': config.dataset,
      'step': int(step),
      'config': config.to_dict(),
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains and evaluates; resumes from `<workdir>/checkpoints` when present.

  Returns the last evaluation's metrics (with the final step under 'step').
  """
  #################### Config and workdir ####################
  config_lib.validate(config)
  workdir = reporting.prepare_workdir(workdir)
  logging.info('Config:\n%s', config)

  #################### Mesh, model, optimizer, abstract state ####################
  # Shapes come from jax.eval_shape and shardings from the logical-axis rules:
  # no unsharded copy of the state is ever built on any device.
  setup = trainer_setup.build(config)
  mesh = setup.mesh
  logging.info('Mesh %s over %d devices (%s) in %d process(es).', dict(mesh.shape),
               jax.device_count(), jax.devices()[0].device_kind, jax.process_count())
  logging.info('Parameters:\n%s', parameter_overview.get_parameter_overview(
      setup.abstract_params, include_stats=False))

  #################### Data and evaluators, opened before any state ####################
  checkpointer = checkpoint.TrainCheckpointer(workdir, config.checkpoint_every,
                                              config.keep_checkpoints)
  latest = checkpointer.latest_step()
  start_step = latest or 0
  train_iter = None
  if start_step < config.total_steps:
    train_iter = input_pipeline.create_train_iterator(config, start_step=start_step)
  evals = evaluators.create(config, setup)
  logging.info('Evaluators: %s.', ', '.join(
      f'{e.name} (every {e.every_steps or "end"})' for e in evals))

  def evaluate(params, step, due_only=True):
    results = {}
    with setup.context():
      for evaluator in evals:
        if not due_only or evaluators.is_due(evaluator, step, config.total_steps):
          results.update(evaluator.run(params))
    return results

  writer = reporting.create_writer(workdir)
  with contextlib.ExitStack() as cleanup:
    cleanup.enter_context(_sigterm_requests_stop(checkpointer.stop_requested))
    cleanup.enter_context(metric_writers.ensure_flushes(writer))

    #################### Create, restore or load the state ####################
    state, core_hours, origin = _restore_or_create_state(
        setup, checkpointer, latest, config, workdir)
    step = int(jax.device_get(state['step']))
    logging.info('Parameters from %s (step %d).', origin, step)

    #################### Evaluate-only mode ####################
    if not config.total_steps:
      results = evaluate(state['params'], step, due_only=False)
      writer.write_scalars(step, results)
      print(f'Evaluated the parameters of {origin} (step {step}): {results}')
      checkpointer.close()
      return {'step': step, **results}

    #################### Compile the update step ####################
    compile_start = time.perf_counter()
    compiled_step = trainer_setup.compile_train_step(setup)
    logging.info('Compiled the train step in %.1f s.', time.perf_counter() - compile_start)
    trainer_setup.log_memory(compiled_step)

    #################### Train loop ####################
    throughput = reporting.Throughput(jax.device_count(), core_hours)
    # Logs steps/s and the ETA (not written to metrics.jsonl: perf/* covers throughput).
    progress = periodic_actions.ReportProgress(
        num_train_steps=config.total_steps, every_steps=config.log_every, every_secs=None)
    profile_steps = tuple(config.profile_steps or ())
    results: dict[str, float] = {}
    if step == 0:
      writer.write_hparams({k: v for k, v in config.to_dict().items()
                            if isinstance(v, (int, float, str, bool))})

    def meta():
      return {'model': trainer_setup.describe_model(setup.model, config),
              'core_hours': throughput.core_hours}

    def fetch_finite_metrics(metrics, step):
      values = jax.device_get(metrics)
      if not math.isfinite(float(values['train/loss'])):
        raise NonFiniteLossError(
            f'Training loss is {values["train/loss"]} at step {step}: aborting. The last good '
            f'checkpoint (step {checkpointer.latest_step()}) in {checkpointer.directory} is '
            'kept. Lower config.lr, raise config.warmup_steps, or use float32 '
            '(config.model_dtype).')
      return values

    logging.info('Training from step %d to %d.', step, config.total_steps)
    throughput.start()
    while step < config.total_steps:
      if profile_steps and step == profile_steps[0] and jax.process_index() == 0:
        jax.profiler.start_trace(os.path.join(workdir, 'profile'))
      local_batch = next(train_iter)
      batch = sharding.put_local_batch(
          {'image': local_batch['image'], 'labels': local_batch['labels']}, mesh)
      state, metrics = compiled_step(state, batch, setup.dropout_rng)
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
      if any(evaluators.is_due(e, step, config.total_steps) for e in evals):
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
      results = evaluate(state['params'], step, due_only=False)
      writer.write_scalars(step, results)
    checkpointer.close()
    final_params = _gather_to_host(state['params'])
    final_path = os.path.join(workdir, 'final.npz')
    if jax.process_index() == 0:
      weights.save_npz(final_params, final_path)
      weights.write_sidecar(final_path, _export_info(config, setup.model, step))
      curves = reporting.plot_curves(workdir)
      logging.info('Exported %s; training curves in %s.', final_path, curves)
      print(f'Final: {results}\nExported released-format weights to {final_path} (with '
            f'{os.path.basename(weights.sidecar_path(final_path))}: image size, '
            'preprocessing, labels)\nPredict with:\n'
            f'  python -m mixer.predict --weights={final_path} IMAGE...')
    multihost_utils.sync_global_devices('mixer_train_done')
  writer.close()
  return {'step': step, **results}
