"""The runner of a training stage (`run_train_stage`): its initial state,
its step, the loop with its checkpoints, evaluations, dashboards and
preemption, and its final model."""

import hashlib
import os
import signal

from absl import logging
from clu import periodic_actions
import jax
import jax.numpy as jnp
import numpy as np

from spcl_jax.core import mesh as mesh_lib
from spcl_jax.core import pass_steps
from spcl_jax.core import train_state
from spcl_jax.core import train_steps
from spcl_jax.data import global_batches
from spcl_jax.data import loaders
from spcl_jax.infra import checkpoint
from spcl_jax.infra import console
from spcl_jax.infra import storage
from spcl_jax.infra import workdir as workdir_lib
from spcl_jax.models import from_config
from spcl_jax.report import dashboards
from spcl_jax.run import context
from spcl_jax.run import passes
from spcl_jax.run import pretraining
from spcl_jax.run import processes as processes_lib
from spcl_jax.run import source_sampling
from spcl_jax.run import stage_graph
from spcl_jax.run import stage_outputs
from spcl_jax.run import step_loop


class NonFiniteLossError(FloatingPointError):
  pass


def _make_step(ctx, stage, model, tx, state_parts):
  cfg = ctx.config.stages[stage.name]
  if stage.step == 'warmup':
    return train_steps.make_warmup_step(model, from_config.discriminator_for(ctx.config),
                                        tx, state_parts['d_tx'], cfg,
                                        ctx.config.discriminator)
  if stage.step == 'spcl':
    thresholds = None
    if cfg.target_mask == 'online':
      thresholds = jnp.asarray(workdir_lib.read_json(ctx.done_path(
          stage.pseudo_labels_from))['class_thresholds'], jnp.float32)
    return train_steps.make_spcl_step(model, tx, cfg, thresholds)
  return train_steps.make_self_training_step(model, tx, cfg)


def _initial_state(ctx, stage, model):
  cfg = ctx.config.stages[stage.name]
  rng = jax.random.PRNGKey(context.stage_seed(ctx, stage.name, 'state'))
  init_rng, disc_rng, state_rng = jax.random.split(rng, 3)
  adversarial = stage.step == 'warmup' and cfg.adversarial_weight > 0

  def fresh(stop=None):   # on this process alone (no collective)
    del stop   # cannot stop
    variables = (pretraining.initial_variables(ctx.config, init_rng)
                 if stage.model_from is None else None)
    disc_params = None
    if adversarial:
      disc_params = from_config.discriminator_for(ctx.config).init(
          disc_rng, jnp.zeros((1, 64, 64, ctx.config.model.num_classes)))
    return variables, disc_params

  if jax.process_count() == 1:
    variables, disc_params = processes_lib.interruptible(
        ctx, f'{stage.name}/initialise', f'initialising the {stage.name} '
        'model', fresh)
  else:   # it computes on the devices: not beside the poll's collectives
    variables, disc_params = fresh()
  if stage.model_from is not None:
    variables = stage_outputs.load_model(ctx, stage.model_from, model)
  variables = jax.device_get(variables)
  tx = train_state.segmenter_optimizer(cfg, variables['params'],
                                       variables['batch_stats'])
  parts = {'d_tx': train_state.discriminator_optimizer(cfg) if adversarial
           else None}
  bank = None
  if stage.prototypes_from:
    bank = jax.device_get(stage_outputs.load_prototypes(
        ctx, stage.prototypes_from, model.num_features))
  state = train_state.new_train_state(
      variables, tx, state_rng, prototype_bank=bank, disc_params=disc_params,
      d_tx=parts['d_tx'], num_features=model.num_features,
      num_classes=ctx.config.model.num_classes)
  return jax.device_put(state, mesh_lib.replicated(ctx.mesh)), tx, parts


def _check_finite(stage_name, step, watch, checkpoints) -> dict:
  """The metrics' means since the last log, read on the host (this waits
  for the steps dispatched so far); raises NonFiniteLossError naming the
  first step whose metrics were not finite and the last good checkpoint
  (every checkpoint is written after a check: none holds a non-finite
  state)."""
  reading = watch.read()
  last = checkpoints.latest_step()
  message = step_loop.non_finite_message(
      stage_name, step, reading,
      f'the last good checkpoint is step {last} in '
      f'{checkpoints.manager.directory}' if last is not None else
      'no checkpoint of this stage was written yet')
  if message:
    raise NonFiniteLossError(message)
  return reading.means


def state_digest(state) -> str:
  """SHA-256 of this process's copy of the (replicated) parameters, BN
  statistics and prototypes: equal on every process of a healthy run."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves((state.params, state.batch_stats,
                               state.prototype_bank)):
    digest.update(np.asarray(leaf.addressable_data(0)).tobytes())
  return digest.hexdigest()


def run_train_stage(ctx, stage: stage_graph.Stage) -> dict:
  """Trains `stage`, evaluating it every `eval_every_steps` (the mIoU in
  DIR/<stage>/eval_history.json, dashboards in DIR/tensorboard); its data
  loaders are closed however it ends (their worker processes stopped, the
  batches they had ready released)."""
  opened = []
  try:
    return _train_stage(ctx, stage, opened)
  finally:
    for iterator in opened:
      iterator.close()


def _train_stage(ctx, stage: stage_graph.Stage, opened: list) -> dict:
  config = ctx.config
  cfg = config.stages[stage.name]
  model = from_config.model_for_stage(config, cfg.bn_trainable)
  eval_model = from_config.model_for_evaluation(config, stage.name)
  state, tx, parts = _initial_state(ctx, stage, model)
  specs = context.train_specs(ctx, stage)
  iterators = {name: step_loop.DevicePrefetch(
      global_batches.GlobalBatchIterator(loaders.train_loader(spec), ctx.mesh),
      config.data.device_prefetch) for name, spec in specs.items()}
  opened.extend(iterators.values())
  checkpoints = checkpoint.StageCheckpoints(
      ctx.stage_dir(stage.name, 'checkpoints'), config.checkpoint.keep,
      tuple(iterators))
  best = checkpoint.BestCheckpoint(ctx.stage_dir(stage.name, 'best'))
  latest, restored = checkpoints.restore_newest_readable(
      checkpoint.abstract_like(state, ctx.mesh), iterators,
      ctx.stage_dir(stage.name, 'unreadable_checkpoints'))
  if latest is not None:
    logging.info('%s: resuming from step %d', stage.name, latest)
    state = restored
  best.discard_after(latest or 0)
  # compiled on their first call, SIGTERM heard while it compiles
  step_fn = processes_lib.CompiledInterruptibly(
      ctx, f'{stage.name}/compile', f'compiling the {stage.name} step',
      jax.jit(_make_step(ctx, stage, model, tx, parts), donate_argnums=0))
  eval_step = processes_lib.CompiledInterruptibly(
      ctx, f'{stage.name}/compile_evaluation',
      f'compiling the {stage.name} evaluation step',
      jax.jit(pass_steps.make_eval_step(eval_model)))
  dashboard = dashboards.Dashboard(
      config, ctx.data_dir(), ctx.mesh, eval_model, stage.name,
      compile_step=lambda jitted: processes_lib.CompiledInterruptibly(
          ctx, f'{stage.name}/compile_dashboard',
          f'compiling the {stage.name} dashboard images step', jitted))
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=cfg.steps, writer=ctx.writer)
  step = int(jax.device_get(state.step))
  progress = console.TrainProgress(
      stage.name, step, cfg.steps,
      sum(s.global_batch_size for s in specs.values()))
  watch = step_loop.MetricsWatch(step, mesh_lib.replicated(ctx.mesh))
  in_flight = step_loop.DispatchWindow(config.max_steps_in_flight)
  history_path = ctx.stage_dir(stage.name, 'eval_history.json')
  history = [h for h in (workdir_lib.read_json(history_path) if storage.exists(
      history_path) else []) if h['step'] <= step]
  invalid_pixels, result, last_saved = 0, None, latest
  timing = False   # set once this run's first step is done (rate window)
  # The host reads the devices only at check points: log, checkpoint and
  # evaluation steps (and every step with testing.sync_every_step, the loop
  # before issue 14). With several processes, they agree on a SIGTERM (a
  # collective) at those and every checkpoint.preemption_check_every_steps;
  # one process looks at its flag after every step.
  agree_every = processes_lib.agree_every(ctx, config.testing.sync_every_step)

  def is_eval_step(step):
    return step % cfg.eval_every_steps == 0 or step == cfg.steps

  def is_log_step(step):
    return step % config.log_every_steps == 0 or step == cfg.steps

  def is_save_step(step):
    return step % config.checkpoint.every_steps == 0 or step == cfg.steps

  def is_check_step(step):
    return (config.testing.sync_every_step or is_log_step(step)
            or is_save_step(step) or is_eval_step(step))

  def is_agree_step(step):
    return step % agree_every == 0 or is_check_step(step)

  def evaluate_and_keep(step):
    result = passes.evaluate(ctx, eval_model, state.variables(),
                             eval_step, stage.name)
    # best/ first: a step in the history has been offered to best/ (a
    # resume evaluates again a step the history lacks)
    best.offer(step, state.variables(), result['miou'])
    processes_lib.crash_after(ctx, f'{stage.name}/best/{step}')
    history.append({'step': step, 'miou': result['miou']})
    if jax.process_index() == 0:
      workdir_lib.write_json(history_path, history)
    processes_lib.crash_after(ctx, f'{stage.name}/eval_history.json')
    ctx.writer.write_scalars(step, {f'{stage.name}/eval_miou':
                                    result['miou']})
    logging.info('%s: step %d mIoU %.2f', stage.name, step, result['miou'])
    dashboard.write(ctx.writer, step, state.variables(), result)
    return result

  if (latest is not None and is_eval_step(step)
      and all(h['step'] != step for h in history)):
    result = evaluate_and_keep(step)   # preempted during it: it runs now
  while step < cfg.steps:
    # Between check points nothing is read from the devices: the steps are
    # dispatched ahead of their execution and the batches prefetched.
    with step_loop.transfer_guard(config.testing.transfer_guard):
      if (config.testing.sigterm_stage == stage.name
          and step == config.testing.sigterm_at_step):
        os.kill(os.getpid(), signal.SIGTERM)
      batches = [next(iterators[name]) for name in iterators]
      invalid_pixels += sum(int(b['invalid_label_pixels'].sum())  # numpy
                            for b in batches)
      state, metrics = step_fn(state, *[{'image': b['image'],
                                         'label': b['label']}
                                        for b in batches])
      step += 1
      watch.add(metrics)
      in_flight.add(jax.tree.leaves(metrics)[0])
      if not timing:   # the rate leaves out compiling / restoring
        jax.block_until_ready(metrics)
        progress.step_done(step)
        timing = True
      report_progress(step)
    checked = is_check_step(step)
    if checked:
      means = _check_finite(stage.name, step, watch, checkpoints)
    if is_log_step(step):
      scalars = progress.log(step, means)
      scalars[f'{stage.name}/invalid_label_pixels'] = invalid_pixels
      ctx.writer.write_scalars(step, scalars)
      watch.reset()
    if is_eval_step(step):
      try:
        result = evaluate_and_keep(step)
      except processes_lib.Preempted:
        # SIGTERM during the evaluation: keep the step
        checkpoints.save(step, state, iterators)
        checkpoints.wait()
        logging.info('%s: preempted at step %d during its evaluation; '
                     'checkpoint saved, the evaluation runs on resume',
                     stage.name, step)
        raise processes_lib.Preempted(
            f'{stage.name} preempted at step {step}') from None
    if is_save_step(step):
      checkpoints.save(step, state, iterators)
      last_saved = step
      processes_lib.crash_after(ctx, f'{stage.name}/checkpoints/{step}',
                                wait=checkpoints.wait)
    if is_agree_step(step) and processes_lib.any_process(ctx.preempted):
      if not checked:
        _check_finite(stage.name, step, watch, checkpoints)
      if last_saved != step:
        checkpoints.save(step, state, iterators)
      checkpoints.wait()
      logging.info('%s: preempted at step %d; checkpoint saved', stage.name,
                   step)
      raise processes_lib.Preempted(f'{stage.name} preempted at step {step}')
  checkpoints.wait()
  logging.info('%s: process %d state digest %s', stage.name,
               jax.process_index(), state_digest(state),
               extra={console.FILE_ONLY: True})
  checkpoint.save_tree(ctx.stage_dir(stage.name, 'model'), state.variables())
  processes_lib.crash_after(ctx, f'{stage.name}/model')
  if stage.step == 'spcl':
    checkpoint.save_tree(ctx.stage_dir(stage.name, 'prototypes'),
                         state.prototype_bank)
    processes_lib.crash_after(ctx, f'{stage.name}/prototypes')
  if result is None:  # resumed at the last step: its evaluation is not kept
    result = passes.evaluate(ctx, eval_model, state.variables(),
                             eval_step, stage.name)
  best_step = best.manager.best_step()
  checkpoints.close()
  best.close()
  result.update({'steps': step, 'eval_history': history,
                 'best_step': best_step,
                 'best_miou': max((h['miou'] for h in history),
                                  default=result['miou'])})
  sampling = source_sampling.stage_report(specs.get('source_iterator'), step)
  if sampling:
    result['source_sampling'] = sampling
  return result
