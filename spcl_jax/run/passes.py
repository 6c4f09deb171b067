"""One pass over a split, over the mesh: its batches (stopping between two
once any process got SIGTERM), and the evaluation pass (the confusion
matrix of the whole target validation split, summarised)."""

import os
import signal

import numpy as np

from spcl_jax.core import metrics
from spcl_jax.data import loaders
from spcl_jax.run import context
from spcl_jax.run import processes


def pass_batches(ctx, stage_name: str, spec: loaders.PipelineSpec, **kw):
  """The batches of one pass over a split (evaluation, prototypes, pseudo
  labels), stopping between two batches once any process got SIGTERM (with
  several processes, they agree on it every `processes.agree_every` batches): the
  pass is lost (nothing of it is kept) and runs again on the next run. In
  tests, `testing.sigterm_stage` = a pass stage's name sends SIGTERM before
  its batch number `testing.sigterm_at_step` (counted over its passes)."""
  testing = ctx.config.testing
  hooked = (testing.sigterm_stage == stage_name
            and ctx.stage(stage_name).kind != 'train')  # there: steps
  every = processes.agree_every(ctx)
  for i, batch in enumerate(loaders.eval_batches(spec, **kw)):
    if hooked:
      if ctx.pass_batches_done == testing.sigterm_at_step:
        os.kill(os.getpid(), signal.SIGTERM)
      ctx.pass_batches_done += 1
    if i % every == 0 and processes.any_process(ctx.preempted):
      raise processes.Preempted(f'{stage_name} preempted during its pass over '
                                f'{spec.dataset} {spec.split}; the pass runs again')
    yield batch


def evaluate(ctx, model, variables, eval_step, stage_name: str = '') -> dict:
  """Target validation split: confusion matrix over the whole split."""
  data = ctx.config.data
  spec = context.eval_spec(ctx, data.target, data.val_split, data.eval_size,
                           data.eval_batch_size, resize_label=False)
  confusion = np.zeros((model.num_classes,) * 2, np.int64)
  for batch in pass_batches(ctx, stage_name or 'evaluation', spec):
    confusion += np.asarray(eval_step(variables, context.global_batch(ctx, batch)))
  return summarize_all(ctx, confusion)


def summarize_all(ctx, confusion) -> dict:
  return metrics.summarize_sets(confusion, ctx.config.evaluation.class_sets,
                                ctx.config.data.label_space)
