"""The stage sequence, its inputs and outputs, and resuming.

Stages are data (`STAGES`): a name, a kind and the stages whose outputs it
reads. `run(config, workdir)` runs the stages of `config.stages_to_run` in
order, skipping finished ones (marked by `DIR/<stage>/done.json`) and
resuming an unfinished training stage from its latest checkpoint. Only
process 0 writes reports, markers and dashboards; every process takes part
in checkpointing and in the collective computations.

One module per concern: the stages as data (`stage_graph`), the config's
checks (`config_checks`), what a stage runs with (`context`), the
runners of each kind (`train_stage`, `pass_stages`), the workdir's paths and
atomic writes (`workdir`), reports and tables (`reporting`, `tables`); this
module runs the stages and keeps the report.

Workdir layout:
  DIR/config.json                the config the workdir was started with
  DIR/report.json                {"stages": {...}, "config": {...}}
  DIR/log.txt                    the full log, appended by every run (main.py)
  DIR/tensorboard/               CLU metric writer (TensorBoard events):
                                 losses, mIoU, per-class IoU, images
                                 (spcl_jax/report/dashboards.py)
  DIR/<stage>/checkpoints/       train state + data iterators (orbax)
  DIR/<stage>/best/              best-mIoU model of a training stage
  DIR/<stage>/eval_history.json  mIoU of every evaluation of the stage
  DIR/<stage>/table.{md,csv}     per-class IoU table of a training stage
  DIR/<stage>/model/             final model of a training stage
  DIR/<stage>/prototypes/        prototype bank (prototypes, spcl)
  DIR/<stage>/labels/            pseudo-label shards (pseudo-label stages)
  DIR/<stage>/done.json          the stage's results; present = finished
  DIR/<stage>/unreadable_checkpoints/  checkpoints found unreadable (moved)

Every write goes to a temporary name and is renamed when complete; a stage's
outputs are trusted only once its done.json exists, and are written again
(replacing any earlier write) by a rerun before that. A run removes the
temporaries an interrupted one left (`workdir.remove_litter`).
"""

import os
import signal

from absl import logging
from clu import metric_writers
import jax
import ml_collections

from spcl_jax.core import mesh as mesh_lib
from spcl_jax.data import sources
from spcl_jax.infra import console
from spcl_jax.infra import storage
from spcl_jax.infra import workdir as workdir_lib
from spcl_jax.report import stage_lines
from spcl_jax.run import builds
from spcl_jax.run import config_checks
from spcl_jax.run import context
from spcl_jax.run import pass_stages
from spcl_jax.run import processes
from spcl_jax.run import source_sampling
from spcl_jax.run import stage_graph
from spcl_jax.run import train_stage

# The exit status of a preempted run (main.py): "temporary failure, rerun the
# same command to resume" (sysexits' EX_TEMPFAIL). 0 means every asked stage
# is finished.
PREEMPTED_EXIT_STATUS = os.EX_TEMPFAIL  # 75


RUNNERS = {'train': train_stage.run_train_stage,
           'prototypes': pass_stages.run_prototypes_stage,
           'pseudo_labels': pass_stages.run_pseudo_labels_stage}


# ---------------------------------------------------------------- pipeline --

def _check_inputs(ctx, stage: stage_graph.Stage) -> None:
  for needed in (stage.model_from, stage.prototypes_from,
                 stage.pseudo_labels_from):
    if needed and not ctx.is_done(needed):
      raise FileNotFoundError(
          f'stage {stage.name!r} needs the output of stage {needed!r}, which '
          f'is not finished in {ctx.workdir}; run it first: python -m '
          f'spcl_jax.main --config=CONFIG:{needed} --workdir={ctx.workdir}')


def update_report(ctx, stage_name: str, result: dict,
                  only_if_missing: bool = False) -> None:
  """Writes `result` as the report's entry of `stage_name` (process 0);
  `only_if_missing`: only if the report has no entry for it (a finished
  stage whose run stopped between its done.json and the report)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(ctx.workdir, 'report.json')
  report = (workdir_lib.read_json(path) if storage.exists(path)
            else {'stages': {}})
  if only_if_missing and stage_name in report['stages']:
    return
  report['stages'][stage_name] = result
  order = [s.name for s in ctx.stages]
  report['stages'] = dict(sorted(report['stages'].items(),
                                 key=lambda item: order.index(item[0])))
  report['config'] = config_checks.config_to_json(ctx.config)
  workdir_lib.write_json(path, report, sort_keys=False)


def run(config: ml_collections.ConfigDict, workdir: str,
        allow_config_change: bool = False,
        stages: tuple = stage_graph.STAGES) -> dict:
  """Runs `config.stages_to_run` in order; returns the report's stages.
  `stages`: the pipeline's stages (`stage_graph.STAGES`, or them followed
  by more, each with a block `config.stages.<name>` of its kind:
  experiments such as benchmarks/self_training_rounds.py)."""
  if tuple(stages[:len(stage_graph.STAGES)]) != stage_graph.STAGES:
    raise ValueError('stages must begin with stage_graph.STAGES (the seeds '
                     'of a stage follow its place)')
  config_checks.validate(config, stages=stages)
  workdir = storage.resolve(workdir)
  config_checks.check_datasets(config, workdir, stages)  # before any write
  storage.makedirs(workdir)
  config_checks.check_workdir_config(config, workdir, allow_config_change)
  writer = metric_writers.create_default_writer(
      os.path.join(workdir, 'tensorboard'),
      just_logging=jax.process_index() > 0)
  ctx = context.Context(config, workdir, mesh_lib.make_mesh(), writer,
                        stages=tuple(stages))
  if jax.process_index() == 0:
    workdir_lib.remove_litter(workdir, [s.name for s in stages])
  processes.sync('litter-removed')
  previous = signal.signal(signal.SIGTERM, lambda *_: setattr(
      ctx, 'preempted', True))
  try:
    if jax.process_index() == 0 and not storage.exists(
        os.path.join(workdir, 'report.json')):
      writer.write_hparams({k: v if isinstance(v, (int, float, str, bool))
                            else str(v)
                            for k, v in config_checks.flatten(
                                config_checks.config_to_json(config)).items()})
    builds.ensure_demo_data(ctx)
    source_sampling.ensure_statistics(ctx)
    if any(ctx.stage(n).kind == 'train' for n in config.stages_to_run):
      sources.check_labelled(config.data.target, config.data.val_split,
                             ctx.data_dir())   # before training, not at its end
    results = {}
    for stage in ctx.stages:
      if stage.name not in config.stages_to_run:
        continue
      if ctx.is_done(stage.name):
        logging.info('%s: finished earlier, skipped', stage.name)
        results[stage.name] = workdir_lib.read_json(ctx.done_path(stage.name))
        update_report(ctx, stage.name, results[stage.name],
                      only_if_missing=True)
        processes.crash_after(ctx, f'report.json:{stage.name}')
        continue
      if processes.any_process(ctx.preempted):
        raise processes.Preempted(
          f'preempted before stage {stage.name} started')
      _check_inputs(ctx, stage)
      console.set_stage(stage.name)
      logging.info('%s: starting', stage.name)
      result = RUNNERS[stage.kind](ctx, stage)
      processes.sync(f'{stage.name}-finished')
      if jax.process_index() == 0:
        if stage.kind == 'train':
          stage_lines.write_stage_tables(ctx.stage_dir(stage.name), stage.name,
                                         result)
      if stage.kind == 'train':
        processes.crash_after(ctx, f'{stage.name}/table')
      if jax.process_index() == 0:
        workdir_lib.write_json(ctx.done_path(stage.name), result)
      processes.crash_after(ctx, f'{stage.name}/done.json')
      update_report(ctx, stage.name, result)
      processes.crash_after(ctx, f'report.json:{stage.name}')
      processes.sync(f'{stage.name}-reported')
      logging.info('%s', stage_lines.stage_line(stage.kind, stage.name, result))
      results[stage.name] = result
    table = stage_lines.evaluated_stages_table(
        results, {name: ctx.stage(name).kind for name in results})
    if table:
      logging.info('evaluated stages (%s):\n%s', config.data.val_split, table)
    return results
  finally:
    signal.signal(signal.SIGTERM, previous)
    writer.flush()
