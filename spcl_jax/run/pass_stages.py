"""The runners of the stages that make one pass over a split with a trained
model: the prototype bank (`run_prototypes_stage`) and pseudo labels
(`run_pseudo_labels_stage`)."""

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from spcl_jax.core import labels as label_table
from spcl_jax.core import mesh as mesh_lib
from spcl_jax.core import metrics
from spcl_jax.core import pass_steps
from spcl_jax.core import spcl
from spcl_jax.data import pseudo_labels
from spcl_jax.infra import checkpoint
from spcl_jax.infra import workdir as workdir_lib
from spcl_jax.models import from_config
from spcl_jax.run import context
from spcl_jax.run import passes
from spcl_jax.run import processes as processes_lib
from spcl_jax.run import stage_graph
from spcl_jax.run import stage_outputs


def run_prototypes_stage(ctx, stage: stage_graph.Stage) -> dict:
  """Eq. 2 over the whole source set with the warm-up model."""
  config = ctx.config
  model = from_config.model_for_pass(config)
  variables = stage_outputs.load_model(ctx, stage.model_from, model)
  data = config.data
  spec = context.eval_spec(
      ctx, data.source, data.source_split, data.source_size,
      config.stages[stage.name].batch_size, resize_label=True)
  init_step = processes_lib.CompiledInterruptibly(
      ctx, f'{stage.name}/compile', f'compiling the {stage.name} step',
      jax.jit(pass_steps.make_prototype_init_step(model)))
  sums = spcl.PrototypeInitSums.zeros(config.model.num_classes,
                                      model.num_features)
  for batch in passes.pass_batches(ctx, stage.name, spec):
    sums = sums.merge(init_step(variables,
                                context.global_batch(ctx, batch)))
  # replicated over the mesh as one global array: with several processes,
  # orbax refuses a host-local one (process 0 alone would own the file)
  bank = jax.device_put(jax.device_get(spcl.prototype_bank_from_sums(sums)),
                        mesh_lib.replicated(ctx.mesh))
  checkpoint.save_tree(ctx.stage_dir(stage.name, 'prototypes'), bank)
  processes_lib.crash_after(ctx, f'{stage.name}/prototypes')
  images = np.asarray(sums.num_images)
  return {'model_from': stage.model_from,
          **model_record(ctx, stage),
          'classes_with_prototype': int((images > 0).sum()),
          'images_per_class': dict(zip(
              label_table.class_names(data.label_space),
              (int(n) for n in images)))}


def model_record(ctx, stage: stage_graph.Stage) -> dict:
  """The record of the stage whose model `stage` uses (its mIoU and
  evaluation history), without what that stage's training read
  (`source_sampling`): a pass reads in file order."""
  record = workdir_lib.read_json(ctx.done_path(stage.model_from))
  record.pop('source_sampling', None)
  return record


# What a pseudo-label stage writes (`stages.<name>.labels_from`). Only
# 'model' is the method; the others read the split's own labels and exist to
# take the self-training path apart (which labels, which pixels).
LABEL_SOURCES = ('model', 'stored', 'stored_where_kept',
                 'model_where_correct')


def written_pseudo_labels(labels_from: str, pseudo: np.ndarray,
                          truth: np.ndarray) -> np.ndarray:
  """'model': the thresholded predictions; 'stored': the split's labels;
  'stored_where_kept': the split's labels on the pixels the thresholds kept
  (the model's coverage, every label right); 'model_where_correct': the
  model's labels where they agree with the split's (its precision made
  perfect, its coverage shrunk by its errors)."""
  pseudo = np.asarray(pseudo, np.uint8)
  truth = np.asarray(truth, np.uint8)
  ignore = np.uint8(spcl.IGNORE_INDEX)
  if labels_from == 'model':
    return pseudo
  if labels_from == 'stored':
    return truth
  if labels_from == 'stored_where_kept':
    return np.where(pseudo != ignore, truth, ignore)
  if labels_from == 'model_where_correct':
    return np.where(pseudo == truth, pseudo, ignore)
  raise ValueError(f'labels_from: {labels_from!r}, expected one of '
                   f'{LABEL_SOURCES}')


def run_pseudo_labels_stage(ctx, stage: stage_graph.Stage) -> dict:
  """Per-class thresholds (histogram pass), then pseudo labels (second
  pass) of the target training split, written as shards keyed by image_id.
  Where the split has labels, their agreement with the pseudo labels is
  reported (a diagnostic; training never reads those labels)."""
  config = ctx.config
  cfg = config.stages[stage.name]
  model = from_config.model_for_pass(config)
  variables = stage_outputs.load_model(ctx, stage.model_from, model)
  data = config.data
  spec = context.eval_spec(
      ctx, data.target, data.target_split, data.target_size, cfg.batch_size,
      resize_label=False)
  histogram_step = processes_lib.CompiledInterruptibly(
      ctx, f'{stage.name}/compile', f'compiling the {stage.name} '
      'confidence step',
      jax.jit(pass_steps.make_histogram_step(model, cfg.histogram_bins)))
  histogram = np.zeros((model.num_classes, cfg.histogram_bins), np.int64)
  for batch in passes.pass_batches(ctx, stage.name, spec,
                                   purpose='confidences'):
    histogram += np.asarray(histogram_step(
        variables, context.global_batch(ctx, batch)))
  thresholds = spcl.class_thresholds_from_histogram(
      histogram, cfg.threshold_cap, cfg.threshold_quantile)
  label_step = processes_lib.CompiledInterruptibly(
      ctx, f'{stage.name}/compile_labels', f'compiling the {stage.name} '
      'label step', jax.jit(pass_steps.make_pseudo_label_step(model)))
  agreement = np.zeros((model.num_classes,) * 2, np.int64)
  truth_pixels = np.zeros(model.num_classes, np.int64)
  kept = total = 0
  directory = ctx.stage_dir(stage.name, 'labels')
  with pseudo_labels.PseudoLabelWriter(directory, jax.process_index(),
                                       jax.process_count(),
                                       {'model_from': stage.model_from}) as writer:
    for batch in passes.pass_batches(ctx, stage.name, spec,
                                     purpose='labels'):
      labels = label_step(variables, context.global_batch(ctx, batch),
                          jnp.asarray(thresholds))
      local = np.asarray(multihost_utils.global_array_to_host_local_array(
          labels, ctx.mesh, jax.sharding.PartitionSpec(
              mesh_lib.DATA_AXIS)))
      for image_id, valid, pseudo, truth in zip(
          batch['image_id'], batch['valid'], local, batch['label']):
        if not valid:
          continue
        pseudo = written_pseudo_labels(cfg.labels_from, pseudo, truth)
        writer.add(str(image_id), pseudo)
        kept += int((pseudo != spcl.IGNORE_INDEX).sum())
        total += pseudo.size
        agreement += np.asarray(metrics.confusion_matrix(
            np.asarray(truth), np.asarray(pseudo, np.int32),
            model.num_classes))
        truth = np.asarray(truth).reshape(-1)
        truth_pixels += np.bincount(truth[truth < model.num_classes],
                                    minlength=model.num_classes)
  processes_lib.crash_after(ctx, f'{stage.name}/labels')
  counts = multihost_utils.process_allgather(
      np.array([kept, total], np.int64)).reshape(-1, 2).sum(0) if (
          jax.process_count() > 1) else np.array([kept, total])
  if jax.process_count() > 1:
    agreement = multihost_utils.process_allgather(agreement).reshape(
        -1, *agreement.shape).sum(0)
    truth_pixels = multihost_utils.process_allgather(truth_pixels).reshape(
        -1, model.num_classes).sum(0)
  result = {'model_from': stage.model_from,
            **model_record(ctx, stage),
            'labels_from': cfg.labels_from,
            'class_thresholds': [float(t) for t in thresholds],
            'predicted_pixels': dict(zip(
                label_table.class_names(data.label_space),
                (int(n) for n in histogram.sum(1)))),
            'pseudo_label_coverage': float(counts[0] / max(counts[1], 1)),
            'pseudo_label_miou_vs_labels': passes.summarize_all(
                ctx, agreement)['miou'],
            **metrics.pseudo_label_quality(agreement, truth_pixels,
                                           data.label_space)}
  return result
