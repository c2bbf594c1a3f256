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
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview
from jax.experimental import multihost_utils

from mixer import checkpoint, compile_cache, config_lib, datasets, evaluators, input_pipeline
from mixer import models, paths, reporting, sharding, trainer_setup, weights
from mixer import workdir as workdir_lib
from mixer.benchmarks import profile_bench

# What `train_and_evaluate` returns, as `result[PREEMPTED] = True`, when it
# stopped for a preemption after saving: the command line exits 75 then.
PREEMPTED = 'preempted'
# Files the export writes; a fresh run refuses a workdir that already has one.
FINAL_FILES = ('final.npz', 'final.json')


class NonFiniteLossError(FloatingPointError):
  """The training loss or the parameters became NaN or infinite; nothing non-finite is saved."""


@jax.jit
def _all_finite(tree) -> jax.Array:
  """One on-device reduction: whether every float in `tree` is finite."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _nonfinite_error(what: str, step: int, checkpointer, config) -> NonFiniteLossError:
  """The error for a diverged run: the last complete finite checkpoint and the likely causes."""
  last = checkpointer.last_complete_step()
  kept = (f'The last complete checkpoint (step {last}, finite: non-finite states are never '
          f'saved) is kept in {checkpointer.directory}; rerunning resumes from it.'
          if last is not None else f'There is no checkpoint in {checkpointer.directory}.')
  init = (f' (The initial weights, {config.init_from}, were finite when loaded.)'
          if config.init_from else '')
  return NonFiniteLossError(
      f'{what} at step {step}: nothing was saved or exported. {kept} Likely causes: a '
      f'learning rate too high (config.lr={config.lr}: lower it or raise '
      'config.warmup_steps), bfloat16 overflow (config.model_dtype=float32), or bad input '
      f'data (non-finite or wildly scaled images or labels).{init}')


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


def _restore_or_create_state(setup, checkpointer, latest, config, workdir):
  """The train state: resumed from `latest`, loaded from `config.init_from`, or fresh.

  Returns (state, core_hours so far, where it came from).
  """
  model_meta = trainer_setup.describe_model(setup.model, config)

  def check_model(step, meta):
    saved_model = meta.get('model')
    if saved_model != model_meta:
      differences = {k: (saved_model.get(k) if saved_model else None, v)
                     for k, v in model_meta.items()
                     if not saved_model or saved_model.get(k) != v}
      raise ValueError(
          f'{workdir} holds a checkpoint (step {step}) of another model: '
          f'(checkpoint, config) differ in {differences}. Use a new --workdir for this config, '
          'or restore the config of that run. Nothing in the workdir was changed.')

  if latest is not None:
    with setup.context():
      # The newest checkpoint that restores and matches its fingerprints; newer
      # damaged ones are moved aside with a warning (mixer.checkpoint).
      state, meta, step = checkpointer.restore_latest(setup.abstract_state, check_model)
    return state, float(meta.get('core_hours', 0.0)), f'step {step} of {checkpointer.directory}'
  if config.init_from:
    params = weights.load_for_model(
        config.init_from, setup.model, config.image_size,
        from_image_size=config.init_from_image_size, head=config.init_head,
        head_bias=config.init_head_bias)
    # The loaded params are host numpy arrays: check them there, before any device copy.
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    bad = [jax.tree_util.keystr(k) for k, v in flat if not np.all(np.isfinite(v))]
    if bad:
      raise NonFiniteLossError(
          f'config.init_from={config.init_from} holds NaN or infinite values in {len(bad)} '
          f'array(s), e.g. {bad[0]}: the file is damaged or was exported from a diverged run. '
          'Use other initial weights.')
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
      'config': reporting.config_as_dict(config),
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains and evaluates; resumes from `<workdir>/checkpoints` when present.

  Process 0 holds the workdir's lock (`mixer.workdir`) for the whole run: a
  second run on the same workdir is refused at once.

  Returns the last evaluation's metrics (with the final step under 'step', and
  `PREEMPTED: True` when it stopped for a preemption after saving).
  """
  #################### Config and workdir ####################
  config_lib.validate(config)
  workdir = reporting.prepare_workdir(workdir)
  with workdir_lib.lock(workdir, primary=jax.process_index() == 0):
    if config.total_steps and not checkpoint.saved_steps(workdir):
      # A fresh run: an export already here is not of this run's lineage.
      existing = [os.path.join(workdir, f) for f in FINAL_FILES
                  if paths.exists(os.path.join(workdir, f))]
      if existing:
        raise FileExistsError(
            f'{existing[0]} already exists and {workdir}/checkpoints holds no checkpoint of '
            'the run that wrote it: a fresh run would overwrite it. Move it away, or pass a '
            'new --workdir. Nothing was changed.')
    if jax.process_index() == 0:
      # Temp files of an export or plot killed mid-write; nothing of ours is in flight.
      for path in paths.remove_stale_temp_files(
          workdir, FINAL_FILES + (reporting.CURVES_FILE, reporting.CONFIG_FILE,
                                  reporting.PARAMETERS_FILE, reporting.METRICS_FILE)):
        logging.warning('Removed %s, left by a run killed while writing it.', path)
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """`train_and_evaluate` once the config is valid and the workdir locked."""
  if jax.process_index() == 0:
    reporting.write_config(workdir, config)  # The full config: in the workdir, not the log.

  #################### Every split this run reads exists (seconds, before any state) ##########
  train_split = [(config.dataset, config.train_split)] if config.total_steps else []
  for dataset, split in train_split + evaluators.data_splits(config):
    datasets.check_available(dataset, split, config.data_dir)

  #################### Compilation cache: a restart loads what it compiled before ###########
  if config.compilation_cache_dir != 'off':
    compile_cache.enable(config.compilation_cache_dir or os.path.join(workdir, 'compile_cache'))

  #################### Mesh, model, optimizer, abstract state ####################
  # Shapes come from jax.eval_shape and shardings from the logical-axis rules:
  # no unsharded copy of the state is ever built on any device.
  setup = trainer_setup.build(config)
  mesh = setup.mesh
  if jax.process_index() == 0:
    reporting.write_parameter_table(workdir, setup.abstract_params)

  #################### Data and evaluators, opened before any state ####################
  checkpointer = checkpoint.TrainCheckpointer(workdir, config.checkpoint_every,
                                              config.keep_checkpoints)
  latest = checkpointer.latest_step()
  start_step = latest or 0
  train_iter = None
  if start_step < config.total_steps:
    train_iter = input_pipeline.create_train_iterator(config, start_step=start_step)
  evals = evaluators.create(config, setup)

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
    if latest is not None:
      logging.info('Resumed from %s.', origin)
      # One row per step: rows a killed run wrote past its last checkpoint go.
      reporting.drop_metrics_after(workdir, step)
    else:
      logging.info('Parameters from %s (step %d).', origin, step)
      if config.total_steps:
        reporting.set_aside_metrics(workdir)  # A fresh run: earlier rows are kept aside.
    if train_iter is not None and step != start_step:  # Fell back to an older checkpoint.
      train_iter = input_pipeline.create_train_iterator(config, start_step=step)

    #################### Evaluate-only mode ####################
    if not config.total_steps:
      results = evaluate(state['params'], step, due_only=False)
      writer.write_scalars(step, results)
      print(f'Evaluated the parameters of {origin} (step {step}): {results}')
      checkpointer.close()
      return {'step': step, **results}

    #################### Compile the update step ####################
    compiled_step, compile_time = trainer_setup.timed_compile_train_step(setup)
    logging.info('%s', compile_time.describe())
    train_size = input_pipeline.num_train_examples(config)
    logging.info('%s', reporting.startup_summary(
        workdir=workdir, model_name=config.model.name,
        model_sizes={f: getattr(setup.model, f) for f in models.ARCHITECTURE_FIELDS},
        image_size=config.image_size, num_classes=config.num_classes,
        num_params=parameter_overview.count_parameters(setup.abstract_params),
        mesh_shape=dict(mesh.shape), device_kind=jax.devices()[0].device_kind,
        num_devices=jax.device_count(), num_processes=jax.process_count(),
        dataset=config.dataset, train_size=train_size, batch_size=config.batch_size,
        evaluators=config.evals.to_dict(), total_steps=config.total_steps, start_step=step,
        warmup_steps=config.warmup_steps, model_dtype=config.model_dtype,
        memory=trainer_setup.memory_per_device(compiled_step),
        init_from=origin if origin == config.init_from else None))

    #################### Train loop ####################
    progress = reporting.ProgressLogger(config.total_steps, step, config.batch_size,
                                        jax.device_count(), config.log_every,
                                        core_hours=core_hours)
    profile_steps = tuple(config.profile_steps or ())
    profile_dir = os.path.join(workdir, 'profile')
    results: dict[str, float] = {}
    if step == 0:
      writer.write_hparams(reporting.flatten_hparams(config))

    def meta():
      return {'model': trainer_setup.describe_model(setup.model, config),
              'core_hours': progress.core_hours}

    def fetch_finite_metrics(metrics, step):
      values = jax.device_get(metrics)
      if not math.isfinite(float(values['train/loss'])):
        raise _nonfinite_error(f'The training loss is {values["train/loss"]}', step,
                               checkpointer, config)
      return values

    def check_finite_state(state, metrics, step):
      """Before every checkpoint and the export: loss and parameters, one reduction."""
      if not bool(_all_finite((state['params'], metrics['train/loss']))):
        raise _nonfinite_error('The parameters or the loss are NaN or infinite', step,
                               checkpointer, config)

    while step < config.total_steps:
      if profile_steps and step == profile_steps[0] and jax.process_index() == 0:
        jax.block_until_ready(state)  # Earlier steps still running would land in the trace.
        profile_bench.start_trace(profile_dir, compiled_step)  # With the HLO that names ops.
      local_batch = next(train_iter)
      batch = sharding.put_local_batch(
          {'image': local_batch['image'], 'labels': local_batch['labels']}, mesh)
      state, metrics = compiled_step(state, batch, setup.dropout_rng)
      step += 1
      if profile_steps and step == profile_steps[1] and jax.process_index() == 0:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        logging.info('Profile of steps %d-%d written to %s (TensorBoard); device time per op: '
                     'python -m mixer.benchmarks.profile_bench --trace_dir=%s --steps=%d',
                     profile_steps[0] + 1, step, profile_dir, profile_dir,
                     step - profile_steps[0])

      is_last = step == config.total_steps
      if progress.should_fetch(step):  # The first step, log steps and the last.
        values = fetch_finite_metrics(metrics, step)  # Waits for the step to finish.
        perf = progress.finished(step, values)
        if perf:
          writer.write_scalars(step, {**values, **perf})
      if any(evaluators.is_due(e, step, config.total_steps) for e in evals):
        progress.pause(step, state)
        results = evaluate(state['params'], step)
        writer.write_scalars(step, results)
        logging.info('%s', reporting.format_scalars(step, results))
        if jax.process_index() == 0:
          reporting.plot_curves(workdir, setup.schedule)  # A current picture at every eval.
        progress.resume()
      preempted = checkpointer.reached_preemption(step)
      if step % config.checkpoint_every == 0 or is_last or preempted:
        progress.pause(step)
        check_finite_state(state, metrics, step)  # Never checkpoint a diverged state.
        checkpointer.maybe_save(step, state, meta(), force=is_last or preempted)
        progress.resume()
      if preempted:
        logging.warning('Preemption at step %d: checkpoint saved, stopping.', step)
        checkpointer.close()
        # ensure_flushes (above) flushes the writer on the way out.
        return {'step': step, **results, PREEMPTED: True}

    #################### Finish: final eval, export, curves ####################
    if not results:  # Resumed at the end (e.g. preempted during the final export).
      results = evaluate(state['params'], step, due_only=False)
      writer.write_scalars(step, results)
    if not bool(_all_finite(state['params'])):  # Never export a diverged state.
      raise _nonfinite_error('The parameters are NaN or infinite', step, checkpointer, config)
    checkpointer.close()
    final_params = sharding.gather_to_host(state['params'])
    final_path = os.path.join(workdir, 'final.npz')
    if jax.process_index() == 0:
      weights.save_npz(final_params, final_path)
      weights.write_sidecar(final_path, _export_info(config, setup.model, step))
      curves = reporting.plot_curves(workdir, setup.schedule)
      logging.info('Exported %s; training curves in %s.', final_path, curves)
      print(f'Final: {results}\nExported released-format weights to {final_path} (with '
            f'{os.path.basename(weights.sidecar_path(final_path))}: image size, '
            'preprocessing, labels)\nPredict with:\n'
            f'  python -m mixer.predict --weights={final_path} IMAGE...')
    multihost_utils.sync_global_devices('mixer_train_done')
  writer.close()
  return {'step': step, **results}
