"""The source's class statistics for a run (`data.source_sampling`): made
before the first training stage that samples the source class-balanced,
and the report's share of each stage's sampled source images that
contained each class.

The statistics live in the source's build (spcl_jax/data/class_statistics.py):
computed once, by process 0, with a progress line, the first time a run
needs them; every later run reads them.
"""

import jax
import numpy as np

from spcl_jax.core import labels as label_table
from spcl_jax.data import class_statistics
from spcl_jax.data import loaders
from spcl_jax.data import sources
from spcl_jax.run import processes


def samples_class_balanced(config, stages) -> bool:
  """Whether a training stage of `stages` in `config.stages_to_run` reads
  the source stream with `data.source_sampling = 'class_balanced'`."""
  if config.data.get('source_sampling', 'uniform') != 'class_balanced':
    return False
  return any(stage.kind == 'train' and stage.name in config.stages_to_run
             and (stage.step != 'self_training'
                  or config.stages[stage.name].source_batch_size)
             for stage in stages)


def ensure_statistics(ctx) -> None:
  """Computes the source split's class statistics (process 0; the others
  wait) when an unfinished training stage to run samples it
  class-balanced and its build has none. SIGTERM while they are computed
  stops the run (`processes.Preempted`); the next run computes them
  again."""
  unfinished = tuple(s for s in ctx.stages if not ctx.is_done(s.name))
  if not samples_class_balanced(ctx.config, unfinished):
    return
  data = ctx.config.data
  source = sources.open_source(data.source, data.source_split, ctx.data_dir())
  missing = class_statistics.load(data.source, data.source_split,
                                  ctx.data_dir(), len(source)) is None
  if not processes.any_process(missing):
    return

  def compute(stop):   # on process 0; the others wait for it
    del stop   # the scan cannot stop part-way; its file is written whole
    if jax.process_index() == 0:
      class_statistics.load_or_compute(
          data.source, data.source_split, ctx.data_dir(),
          threads=loaders.eval_read_threads(), source=source)

  processes.interruptible(ctx, 'class_statistics',
                          f'computing the class statistics of {data.source}',
                          compute)


def stage_report(spec: loaders.PipelineSpec | None, steps: int) -> dict:
  """The report's `source_sampling` entry of a training stage whose source
  stream is `spec` (None: it reads no source) and that ran `steps` steps:
  the rule, how many source images it sampled and, where the source's
  class statistics exist (always under 'class_balanced'), the percentage
  of them that contained each class. Computed from the statistics and the
  sampled record keys; no label is read."""
  if spec is None:
    return {}
  report = {'rule': spec.sampling, 'images': steps * spec.global_batch_size}
  source = sources.open_source(spec.dataset, spec.split, spec.data_dir)
  statistics = class_statistics.load(spec.dataset, spec.split, spec.data_dir,
                                     len(source))
  if statistics is None:   # uniform, and no run has needed them yet
    return report
  presence = statistics.for_label_space(spec.label_space)
  keys = sampled_record_keys(spec, source, presence, steps)
  shares = class_statistics.sampled_shares(presence, keys)
  report['class_shares'] = {
      name: round(100.0 * float(share), 3) for name, share in zip(
          label_table.class_names(spec.label_space), shares)}
  return report


def sampled_record_keys(spec: loaders.PipelineSpec, source,
                        presence: np.ndarray, steps: int) -> np.ndarray:
  """int64 [steps * global batch]: the record keys of the first `steps`
  global batches of `spec`'s training stream."""
  sampler = loaders.record_sampler(spec, source, presence)
  positions = loaders.stream_positions(
      steps, spec.global_batch_size, spec.worker_count).ravel()
  if hasattr(sampler, 'record_keys'):
    return sampler.record_keys(positions)
  return np.asarray([sampler[int(p)].record_key for p in positions], np.int64)
