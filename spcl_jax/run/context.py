"""What a stage runs with: its `Context` (config, workdir, mesh, writer, the
run's stages), the specs of the data it reads, and their seeds."""

import dataclasses
import os

from clu import metric_writers
import jax
import ml_collections
import numpy as np

from spcl_jax.data import global_batches
from spcl_jax.data import loaders
from spcl_jax.data import sources
from spcl_jax.infra import storage
from spcl_jax.run import stage_graph


@dataclasses.dataclass
class Context:
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  writer: metric_writers.MetricWriter
  preempted: bool = False
  pass_batches_done: int = 0   # by `passes.pass_batches`, for the SIGTERM hook
  # the stages of the run: `stage_graph.STAGES`, or them and more
  # (`pipeline.run`'s `stages`)
  stages: tuple = stage_graph.STAGES

  def stage(self, name: str) -> stage_graph.Stage:
    return {s.name: s for s in self.stages}[name]

  def stage_dir(self, name: str, *parts: str) -> str:
    return os.path.join(self.workdir, name, *parts)

  def done_path(self, name: str) -> str:
    return self.stage_dir(name, 'done.json')

  def is_done(self, name: str) -> bool:
    return storage.exists(self.done_path(name))

  def data_dir(self) -> str:
    return sources.data_dir_path(self.config.data.data_dir)


def _reading(data) -> dict:
  """The read-ahead fields of `data` (a workdir's config written before
  they existed has none: its commands read with PipelineSpec's defaults)."""
  return {field: data[field] for field in ('read_threads', 'read_ahead')
          if field in data}


def source_sampling_fields(data) -> dict:
  """The source stream's sampling fields of `data` (a workdir's config
  written before they existed has none: it read uniformly)."""
  if 'source_sampling' not in data:
    return {}
  return dict(sampling=data.source_sampling,
              sub_epoch_draws=data.source_sampling_sub_epoch,
              log_offset=data.source_sampling_log_offset)


def _spec(ctx, dataset, split, batch, **kw) -> loaders.PipelineSpec:
  data = ctx.config.data
  return loaders.PipelineSpec(
      dataset=dataset, split=split, data_dir=ctx.data_dir(),
      global_batch_size=batch, num_classes=ctx.config.model.num_classes,
      label_space=data.label_space, interpolation=data.image_interpolation,
      color_jitter_implementation=data.color_jitter_implementation,
      # absent from a workdir's config written before they existed
      color_jitter_order=data.get('color_jitter_order', 'after_resize'),
      scaled_size_rounding=data.get('scaled_size_rounding', 'round'),
      mean=tuple(data.mean), std=tuple(data.std),
      worker_count=data.worker_count, **_reading(data), **kw)


# A run's seed and the seeds derived from it: [0, 2**31) (grain's samplers
# take 32-bit seeds, jax.random.PRNGKey any of these).
SEED_LIMIT = 2 ** 31
SEED_STREAMS = ('source', 'target', 'state')


def stream_seed(seed: int, stage_name: str, stream: str,
                stages: tuple = stage_graph.STAGES) -> int:
  """A reproducible seed in [0, 2**31) for one stage and stream ('source',
  'target', 'state': the train state's PRNG key and initialisation) of the
  run `seed`. Seeds below 2**31 // 1000 keep their earlier derivation
  (seed * 1000 + 10 * stage + stream), so recorded runs stay reproducible;
  larger ones, which used to overflow, go through numpy's SeedSequence.
  A stage's number is its place in `stages` (those after
  `stage_graph.STAGES` extend it, so the seeds of `stage_graph.STAGES` stay
  the same)."""
  stage, index = [s.name for s in stages].index(stage_name), (
      SEED_STREAMS.index(stream))
  if seed < SEED_LIMIT // 1000:
    return seed * 1000 + stage * 10 + index
  sequence = np.random.SeedSequence([seed, stage, index])
  return int(sequence.generate_state(1, np.uint32)[0]) % SEED_LIMIT


def stage_seed(ctx, stage_name: str, stream: str) -> int:
  return stream_seed(ctx.config.seed, stage_name, stream, ctx.stages)


def train_specs(ctx, stage: stage_graph.Stage) -> dict:
  cfg, data = ctx.config.stages[stage.name], ctx.config.data
  pseudo = (ctx.stage_dir(stage.pseudo_labels_from, 'labels')
            if stage.pseudo_labels_from else None)

  def source():
    if data.source_crop_size:   # random scale of the original, then crop
      geometry = dict(scale_range=tuple(data.source_scale_range) or None,
                      crop=tuple(data.source_crop_size))
      if data.get('source_crop_from', 'original') == 'resized':
        geometry['size'] = tuple(data.source_size)  # resized first
    else:                       # the released recipe: resized, no crop
      geometry = dict(size=tuple(data.source_size))
    return _spec(ctx, data.source, data.source_split, cfg.source_batch_size,
                 color_jitter=tuple(data.source_color_jitter) or None,
                 flip=data.source_flip,
                 seed=stage_seed(ctx, stage.name, 'source'),
                 **geometry, **source_sampling_fields(data))

  if stage.step == 'self_training':   # the step takes (target[, source])
    specs = {'target_iterator': _spec(
        ctx, data.target, data.target_split, cfg.target_batch_size,
        pseudo_labels=pseudo, color_jitter=tuple(cfg.color_jitter),
        scale_range=tuple(cfg.scale_range), crop=tuple(cfg.crop_size),
        flip=cfg.flip, seed=stage_seed(ctx, stage.name, 'target'))}
    if cfg.source_batch_size:
      specs['source_iterator'] = source()
    return specs
  specs = {'source_iterator': source()}
  if stage.step == 'spcl' or cfg.adversarial_weight > 0:
    specs['target_iterator'] = _spec(
        ctx, data.target, data.target_split, cfg.target_batch_size,
        size=tuple(data.target_size),
        pseudo_labels=pseudo if stage.step == 'spcl' else None,
        seed=stage_seed(ctx, stage.name, 'target'))
  return specs


def eval_spec(ctx, dataset, split, size, batch,
              resize_label) -> loaders.PipelineSpec:
  return _spec(ctx, dataset, split, batch, size=tuple(size),
               resize_label=resize_label, shuffle=False)


def global_batch(ctx, batch):
  """The device part of a local evaluation batch, as global arrays."""
  keys = ('image', 'label', 'valid')
  return global_batches.to_global({k: batch[k] for k in keys}, ctx.mesh, keys)
