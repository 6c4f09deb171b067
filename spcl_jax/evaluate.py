r"""Evaluates a finished training stage of a pipeline workdir.

  python -m spcl_jax.evaluate --workdir=DIR [--stage=NAME]
      [--checkpoint=final|best] [--dataset=NAME --split=SPLIT --data_dir=D]
      [--class_sets=19,16,13] [--flip] [--scales=0.75,1.0,1.25]
      [--output=OUT]

Defaults: the last finished training stage, its final model, the config's
validation split (DIR/config.json: `data.target`, `data.val_split`,
`data.data_dir`) at `data.eval_size`, the config's class sets, and
OUT = DIR/<stage>/evaluation/<checkpoint>-<dataset>-<split>[-flip]
[-scales_...]. The confusion matrix is summed over the whole split on every
device, as in training; at scale 1 without flip the result is the stage's
own evaluation (report.json). With --flip / --scales the softmax
probabilities of the passes are averaged (`spcl_jax.core.pass_steps`).

Prints the per-class IoU table and writes OUT/metrics.json, OUT/table.md
and OUT/table.csv. Exit status 1 on an error, printed in one line naming
the stage, file or value (the asked stage is not finished: the stages that
exist are listed; an output directory that cannot be written is reported
before any compute).
"""

import os
import sys

# First: TensorFlow's native log level must be set before it is imported.
from spcl_jax.infra import console  # pylint: disable=g-bad-import-order
console.quiet_native_logs(sys.argv)

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
import jax
import ml_collections

from spcl_jax.core import labels as label_table
from spcl_jax.core import pass_steps
from spcl_jax.data import sources
from spcl_jax.infra import storage
from spcl_jax.infra import workdir as workdir_lib
from spcl_jax.report import tables
from spcl_jax.run import passes
from spcl_jax.run import trained_model


def default_output(workdir: str, stage: str, checkpoint: str, dataset: str,
                   split: str, flip: bool, scales) -> str:
  parts = [checkpoint, dataset.replace('/', '_'), split]
  if flip:
    parts.append('flip')
  if not pass_steps.is_plain(scales, False):
    parts.append('scales_' + '_'.join(f'{s:g}' for s in scales))
  return os.path.join(workdir, stage, 'evaluation', '-'.join(parts))


def row_name(stage: str, checkpoint: str, flip: bool, scales) -> str:
  extras = [checkpoint] + (['flip'] if flip else [])
  if not pass_steps.is_plain(scales, False):
    extras.append('scales ' + ','.join(f'{s:g}' for s in scales))
  return f'{stage} ({", ".join(extras)})'


def evaluation_config(config: ml_collections.ConfigDict, dataset: str,
                      split: str, data_dir: str, class_sets,
                      num_devices: int | None = None
                      ) -> ml_collections.ConfigDict:
  """The workdir's config made to evaluate `dataset:split` from `data_dir`
  on `class_sets`, in batches that split over the devices (what
  `passes.evaluate` reads)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for size in class_sets:
    label_table.class_set_indices(size, config.data.label_space)
  config.data.target, config.data.val_split = dataset, split
  config.data.data_dir = data_dir
  config.data.eval_batch_size = trained_model.batch_size(config, num_devices)
  config.evaluation.class_sets = tuple(class_sets)
  return config


def evaluate(workdir: str, stage: str | None = None,
             checkpoint: str = 'final', dataset: str | None = None,
             split: str | None = None, data_dir: str | None = None,
             class_sets=None, flip: bool = False, scales=(1.0,),
             output: str | None = None) -> tuple[dict, str]:
  """Evaluates a stage's model; returns (metrics, output directory) after
  writing metrics.json, table.md and table.csv there. Every check (stage,
  checkpoint, class sets, scales, data, output directory) comes first."""
  if data_dir:
    storage.check_supported('--data_dir', data_dir)
  workdir = storage.resolve(workdir)
  config = trained_model.read_config(workdir)
  stage = trained_model.choose_stage(workdir, stage)
  scales = pass_steps.check_scales(scales)
  data = config.data
  dataset, split = dataset or data.target, split or data.val_split
  data_dir = sources.data_dir_path(data_dir or data.data_dir)
  class_sets = tuple(class_sets or config.evaluation.class_sets)
  config = evaluation_config(config, dataset, split, data_dir, class_sets)
  ctx = trained_model.context(config, workdir, checkpoint)
  model_dir = trained_model.model_directory(ctx, stage)
  sources.open_source(dataset, split, data_dir)   # built, and has the split
  sources.check_labelled(dataset, split, data_dir)   # and labels
  output = trained_model.check_output_dir(output or default_output(
      workdir, stage, checkpoint, dataset, split, flip, scales))

  logging.info('evaluating %s on %s:%s (%s)', model_dir, dataset, split,
               'flip' if flip else 'no flip')
  model, variables = trained_model.load(ctx, stage)
  eval_step = jax.jit(pass_steps.make_eval_step(model, scales, flip))
  result = passes.evaluate(ctx, model, variables, eval_step)
  metrics = {**result, 'stage': stage, 'checkpoint': checkpoint,
             'model_directory': model_dir, 'dataset': dataset,
             'split': split, 'data_dir': data_dir, 'flip': flip,
             'scales': list(scales), 'eval_size': list(data.eval_size)}
  if jax.process_index() == 0:
    workdir_lib.write_json(os.path.join(output, 'metrics.json'), metrics)
    tables.write(output, {row_name(stage, checkpoint, flip, scales):
                          metrics})
  return metrics, output


def _command(f) -> None:
  class_sets = f.class_sets and trained_model.parse_numbers(
      f.class_sets, int, 'class_sets')
  scales = trained_model.parse_numbers(f.scales, float, 'scales')
  metrics, output = evaluate(f.workdir, f.stage, f.checkpoint, f.dataset,
                             f.split, f.data_dir, class_sets, f.flip,
                             scales, f.output)
  print(tables.markdown({row_name(metrics['stage'], metrics['checkpoint'],
                                  metrics['flip'], metrics['scales']):
                         metrics}))
  print(f'{metrics["stage"]} on {metrics["dataset"]}:{metrics["split"]}: '
        f'mIoU {metrics["miou"]:.2f}, tail mIoU {metrics["tail_miou"]:.2f} '
        f'({metrics["class_set"]} classes, '
        f'{metrics["num_pixels"]} pixels) -> {output}')


if __name__ == '__main__':
  trained_model.define_model_flags()
  flags.DEFINE_string('dataset', None, 'built dataset (default: data.target)')
  flags.DEFINE_string('split', None, 'split (default: data.val_split)')
  flags.DEFINE_string('data_dir', None, 'default: data.data_dir')
  flags.DEFINE_list('class_sets', None,
                    'e.g. 19,16,13 (default: evaluation.class_sets)')
  flags.DEFINE_string('output', None, 'output directory')
  app.run(trained_model.command_main(_command))
