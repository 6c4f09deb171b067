"""The stage sequence, its inputs and outputs, and resuming.

Stages are data (`STAGES`): a name, a kind and the stages whose outputs it
reads. `run(config, workdir)` runs the stages of `config.stages_to_run` in
order, skipping finished ones (marked by `DIR/<stage>/done.json`) and
resuming an unfinished training stage from its latest checkpoint. Only
process 0 writes reports, markers and dashboards; every process takes part
in checkpointing and in the collective computations.

Workdir layout:
  DIR/config.json                the config the workdir was started with
  DIR/report.json                {"stages": {...}, "config": {...}}
  DIR/log.txt                    the full log, appended by every run (main.py)
  DIR/tensorboard/               CLU metric writer (TensorBoard events):
                                 losses, mIoU, per-class IoU, images
                                 (spcl_jax/dashboards.py)
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

import dataclasses
import hashlib
import json
import os
import signal

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from spcl_jax import checkpoint
from spcl_jax import console
from spcl_jax import dashboards
from spcl_jax import evaluation
from spcl_jax import input_pipeline as ip
from spcl_jax import labels as label_table
from spcl_jax import models
from spcl_jax.models import layers
from spcl_jax import reporting
from spcl_jax import sharding as sharding_lib
from spcl_jax import spcl
from spcl_jax import step_loop
from spcl_jax import train
from spcl_jax import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  kind: str                           # 'train' | 'prototypes' | 'pseudo_labels'
  step: str | None = None             # train stages: 'warmup' | 'spcl' | ...
  model_from: str | None = None       # stage whose final model it starts from
  prototypes_from: str | None = None
  pseudo_labels_from: str | None = None


STAGES = (
    Stage('warmup', 'train', step='warmup'),
    Stage('prototypes', 'prototypes', model_from='warmup'),
    Stage('pseudo_labels', 'pseudo_labels', model_from='warmup'),
    Stage('spcl', 'train', step='spcl', model_from='warmup',
          prototypes_from='prototypes', pseudo_labels_from='pseudo_labels'),
    Stage('pseudo_labels_2', 'pseudo_labels', model_from='spcl'),
    Stage('self_training', 'train', step='self_training', model_from='spcl',
          pseudo_labels_from='pseudo_labels_2'),
)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}

# Config keys that may differ when a workdir is resumed.
_RESUMABLE_CHANGES = ('stages_to_run', 'testing.', 'data.data_dir',
                      'log_every_steps', 'evaluation.dashboard_images',
                      'model.remat',   # the same gradients, less memory
                      # when and how batches are read, not which ones; where
                      # several processes may stop, not what they compute
                      'data.device_prefetch',
                      'checkpoint.preemption_check_every_steps')
# Fields added after workdirs were written, with the value that reproduces
# what those workdirs ran: absent there and this value here is no change.
_ADDED_FIELDS = {'model.remat': 'none', 'micro_batches': 1}


# `testing.transfer_guard`: '' (none) or a jax.transfer_guard level.
TRANSFER_GUARD_LEVELS = ('', 'allow', 'log', 'disallow', 'log_explicit',
                         'disallow_explicit')


class Preempted(Exception):
  """SIGTERM arrived; the latest state was checkpointed."""


# The exit status of a preempted run (main.py): "temporary failure, rerun the
# same command to resume" (sysexits' EX_TEMPFAIL). 0 means every asked stage
# is finished.
PREEMPTED_EXIT_STATUS = os.EX_TEMPFAIL  # 75


class NonFiniteLossError(FloatingPointError):
  pass


class ConfigMismatchError(ValueError):
  pass


# ------------------------------------------------------------------ checks --

def validate(config: ml_collections.ConfigDict,
             num_devices: int | None = None,
             stages: tuple = STAGES) -> None:
  """Semantic checks that fail before anything is compiled (batch sizes
  against `num_devices`, default: every device of every process; stage
  names against `stages`)."""
  from configs import default as default_config  # pylint: disable=g-import-not-at-top
  problems = list(default_config.released_conflicts(config))
  if config.chain_model not in CHAIN_MODELS:
    problems.append(f'chain_model: {config.chain_model!r}, expected one of '
                    f'{CHAIN_MODELS}')
  if config.model.layer_init not in layers.LAYER_INITS:
    problems.append(f'model.layer_init: {config.model.layer_init!r}, '
                    f'expected one of {layers.LAYER_INITS}')
  if config.model.frozen_bn_epsilon < 0:
    problems.append(f'model.frozen_bn_epsilon = '
                    f'{config.model.frozen_bn_epsilon} must be >= 0')
  if config.data.image_interpolation not in ip.INTERPOLATIONS:
    problems.append(f'data.image_interpolation: '
                    f'{config.data.image_interpolation!r}, expected one of '
                    f'{sorted(ip.INTERPOLATIONS)}')
  if not (isinstance(config.seed, int) and 0 <= config.seed < SEED_LIMIT):
    problems.append(f'seed = {config.seed!r} must be an integer in '
                    f'[0, {SEED_LIMIT})')
  for name in config.stages_to_run:
    if name not in {s.name for s in stages}:
      problems.append(f'stages_to_run: unknown stage {name!r} (known: '
                      f'{[s.name for s in stages]})')
  if config.model.name not in models.MODELS:
    problems.append(f'model.name: unknown model {config.model.name!r} '
                    f'(known: {sorted(models.MODELS)})')
  if config.model.dtype not in ('float32', 'bfloat16'):
    problems.append(f"model.dtype: {config.model.dtype!r}, expected "
                    "'float32' or 'bfloat16'")
  space = config.data.label_space
  if space not in label_table.LABEL_SPACES:
    problems.append(f'data.label_space: {space!r}, expected one of '
                    f'{sorted(label_table.LABEL_SPACES)}')
  elif config.model.num_classes != len(label_table.LABEL_SPACES[space]):
    problems.append(f'model.num_classes = {config.model.num_classes} but '
                    f'data.label_space {space!r} has '
                    f'{len(label_table.LABEL_SPACES[space])} classes')
  for class_set in config.evaluation.class_sets:
    try:
      label_table.class_set_indices(class_set, space)
    except ValueError as e:
      problems.append(f'evaluation.class_sets: {e}')
  images = config.evaluation.dashboard_images
  if not (isinstance(images, int) and images >= 0):
    problems.append(f'evaluation.dashboard_images = {images!r} must be an '
                    'integer >= 0 (0: no images)')
  if config.stages.spcl.target_mask not in ('offline', 'online'):
    problems.append(f"stages.spcl.target_mask: "
                    f"{config.stages.spcl.target_mask!r}, expected 'offline' "
                    "or 'online'")
  for name in [s.name for s in stages if s.kind == 'pseudo_labels']:
    if config.stages[name].labels_from not in LABEL_SOURCES:
      problems.append(f"stages.{name}.labels_from: "
                      f"{config.stages[name].labels_from!r}, expected one "
                      f"of {LABEL_SOURCES}")
    quantile = config.stages[name].threshold_quantile
    if not 0.0 < quantile < 1.0:
      problems.append(f'stages.{name}.threshold_quantile = {quantile}, '
                      'expected a fraction in (0, 1) (0.5: the median)')
  if config.stages.spcl.prototype_update not in ('after_loss', 'before_loss'):
    problems.append(f"stages.spcl.prototype_update: "
                    f"{config.stages.spcl.prototype_update!r}, expected "
                    "'after_loss' or 'before_loss'")
  if config.stages.self_training.source_weight < 0:
    problems.append('stages.self_training.source_weight = '
                    f'{config.stages.self_training.source_weight} must be '
                    '>= 0 (the weight of the source cross-entropy)')
  every = config.checkpoint.preemption_check_every_steps
  if not (isinstance(every, int) and every >= 1):
    problems.append(f'checkpoint.preemption_check_every_steps = {every!r} '
                    'must be an integer >= 1')
  prefetch = config.data.device_prefetch
  if not (isinstance(prefetch, int) and prefetch >= 0):
    problems.append(f'data.device_prefetch = {prefetch!r} must be an '
                    'integer >= 0 (0: no prefetching)')
  if config.testing.transfer_guard not in TRANSFER_GUARD_LEVELS:
    problems.append(f'testing.transfer_guard: '
                    f'{config.testing.transfer_guard!r}, expected one of '
                    f'{TRANSFER_GUARD_LEVELS}')
  if config.data.source_scale_range and not config.data.source_crop_size:
    problems.append('data.source_scale_range = '
                    f'{tuple(config.data.source_scale_range)} needs '
                    'data.source_crop_size (scaled sources are cropped)')
  devices = jax.device_count() if num_devices is None else num_devices
  batch_keys = (('warmup', 'source_batch_size'), ('warmup',
                                                  'target_batch_size'),
                ('spcl', 'source_batch_size'), ('spcl', 'target_batch_size'),
                ('self_training', 'target_batch_size'),
                ('prototypes', 'batch_size'), ('pseudo_labels', 'batch_size'),
                ('pseudo_labels_2', 'batch_size'))
  if config.stages.self_training.source_batch_size:  # 0: target only
    batch_keys += (('self_training', 'source_batch_size'),)
  for extra in stages[len(STAGES):]:   # each a copy of its kind's block
    batch_keys += ((extra.name, 'target_batch_size')
                   if extra.kind == 'train' else (extra.name, 'batch_size'),)
  for stage, key in batch_keys:
    value = config.stages[stage][key]
    if value <= 0 or value % devices:
      problems.append(f'stages.{stage}.{key} = {value} must be a positive '
                      f'multiple of the {devices} devices')
  problems.extend(train.memory_config_problems(config, devices))
  if config.data.eval_batch_size % devices:
    problems.append(f'data.eval_batch_size = {config.data.eval_batch_size} '
                    f'must be a multiple of the {devices} devices')
  for name in [s.name for s in stages if s.kind == 'train']:
    stage = config.stages[name]
    if not 0 < stage.steps <= stage.schedule_steps:
      problems.append(f'stages.{name}: need 0 < steps ({stage.steps}) <= '
                      f'schedule_steps ({stage.schedule_steps})')
  if problems:
    raise ValueError('invalid config:\n  ' + '\n  '.join(problems))


def _flatten(config: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in config.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_to_json(config) -> dict:
  return json.loads(json.dumps(config.to_dict(), default=list))


def _added_with_old_value(key: str, old: dict, new: dict) -> bool:
  return key not in old and any(
      (key == field or key.endswith('.' + field)) and new.get(key) == value
      for field, value in _ADDED_FIELDS.items())


def check_workdir_config(config, workdir: str,
                         allow_config_change: bool) -> None:
  """Refuses to resume a workdir written by a different config."""
  path = os.path.join(workdir, 'config.json')
  current = config_to_json(config)
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    old, new = _flatten(previous), _flatten(current)
    differing = sorted(
        key for key in set(old) | set(new)
        if old.get(key) != new.get(key)
        and not any(key == p or key.startswith(p) for p in _RESUMABLE_CHANGES)
        and not _added_with_old_value(key, old, new))
    if differing and not allow_config_change:
      lines = [f'  {key}: {old.get(key, "<absent>")!r} -> '
               f'{new.get(key, "<absent>")!r}' for key in differing]
      raise ConfigMismatchError(
          f'{workdir} was started with a different config:\n'
          + '\n'.join(lines) + '\nUse a new --workdir, or pass '
          '--allow_config_change to resume with the new values.')
  if jax.process_index() == 0:
    workdir_lib.write_json(path, current)


# ------------------------------------------------------------- the context --

@dataclasses.dataclass
class Context:
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  writer: metric_writers.MetricWriter
  preempted: bool = False
  pass_batches_done: int = 0   # by `pass_batches`, for the SIGTERM hook
  # the stages of the run: `STAGES`, or them and more (`run`'s `stages`)
  stages: tuple = STAGES

  def stage(self, name: str) -> Stage:
    return {s.name: s for s in self.stages}[name]

  def stage_dir(self, name: str, *parts: str) -> str:
    return os.path.join(self.workdir, name, *parts)

  def done_path(self, name: str) -> str:
    return self.stage_dir(name, 'done.json')

  def is_done(self, name: str) -> bool:
    return os.path.exists(self.done_path(name))

  def data_dir(self) -> str:
    return os.path.expanduser(self.config.data.data_dir)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _crash_after(ctx, write: str, wait=None) -> None:
  workdir_lib.crash_after_write(ctx.config, write, wait)


def _any_process(flag: bool) -> bool:
  """Whether `flag` is set on any process: a collective (an all-gather that
  waits for every process) when there are several."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


# ------------------------------------------------------------- data specs --

def _spec(ctx, dataset, split, batch, **kw) -> ip.PipelineSpec:
  data = ctx.config.data
  return ip.PipelineSpec(
      dataset=dataset, split=split, data_dir=ctx.data_dir(),
      global_batch_size=batch, num_classes=ctx.config.model.num_classes,
      label_space=data.label_space, interpolation=data.image_interpolation,
      mean=tuple(data.mean), std=tuple(data.std),
      worker_count=data.worker_count, **kw)


# A run's seed and the seeds derived from it: [0, 2**31) (grain's samplers
# take 32-bit seeds, jax.random.PRNGKey any of these).
SEED_LIMIT = 2 ** 31
SEED_STREAMS = ('source', 'target', 'state')


def stream_seed(seed: int, stage_name: str, stream: str,
                stages: tuple = STAGES) -> int:
  """A reproducible seed in [0, 2**31) for one stage and stream ('source',
  'target', 'state': the train state's PRNG key and initialisation) of the
  run `seed`. Seeds below 2**31 // 1000 keep their earlier derivation
  (seed * 1000 + 10 * stage + stream), so recorded runs stay reproducible;
  larger ones, which used to overflow, go through numpy's SeedSequence.
  A stage's number is its place in `stages` (those after `STAGES` extend
  it, so the seeds of `STAGES` stay the same)."""
  stage, index = [s.name for s in stages].index(stage_name), (
      SEED_STREAMS.index(stream))
  if seed < SEED_LIMIT // 1000:
    return seed * 1000 + stage * 10 + index
  sequence = np.random.SeedSequence([seed, stage, index])
  return int(sequence.generate_state(1, np.uint32)[0]) % SEED_LIMIT


def _seed(ctx, stage_name: str, stream: str) -> int:
  return stream_seed(ctx.config.seed, stage_name, stream, ctx.stages)


def _train_specs(ctx, stage: Stage) -> dict:
  cfg, data = ctx.config.stages[stage.name], ctx.config.data
  pseudo = (ctx.stage_dir(stage.pseudo_labels_from, 'labels')
            if stage.pseudo_labels_from else None)

  def source():
    if data.source_crop_size:   # random scale of the original, then crop
      geometry = dict(scale_range=tuple(data.source_scale_range) or None,
                      crop=tuple(data.source_crop_size))
    else:                       # the released recipe: resized, no crop
      geometry = dict(size=tuple(data.source_size))
    return _spec(ctx, data.source, data.source_split, cfg.source_batch_size,
                 color_jitter=tuple(data.source_color_jitter) or None,
                 flip=data.source_flip, seed=_seed(ctx, stage.name, 'source'),
                 **geometry)

  if stage.step == 'self_training':   # the step takes (target[, source])
    specs = {'target_iterator': _spec(
        ctx, data.target, data.target_split, cfg.target_batch_size,
        pseudo_labels=pseudo, color_jitter=tuple(cfg.color_jitter),
        scale_range=tuple(cfg.scale_range), crop=tuple(cfg.crop_size),
        flip=cfg.flip, seed=_seed(ctx, stage.name, 'target'))}
    if cfg.source_batch_size:
      specs['source_iterator'] = source()
    return specs
  specs = {'source_iterator': source()}
  if stage.step == 'spcl' or cfg.adversarial_weight > 0:
    specs['target_iterator'] = _spec(
        ctx, data.target, data.target_split, cfg.target_batch_size,
        size=tuple(data.target_size),
        pseudo_labels=pseudo if stage.step == 'spcl' else None,
        seed=_seed(ctx, stage.name, 'target'))
  return specs


def _eval_spec(ctx, dataset, split, size, batch, resize_label) -> ip.PipelineSpec:
  return _spec(ctx, dataset, split, batch, size=tuple(size),
               resize_label=resize_label, shuffle=False)


def _global(ctx, batch):
  """The device part of a local evaluation batch, as global arrays."""
  keys = ('image', 'label', 'valid')
  return ip.to_global({k: batch[k] for k in keys}, ctx.mesh, keys)


# ---------------------------------------------------------------- evaluate --

def pass_batches(ctx, stage_name: str, spec: ip.PipelineSpec, **kw):
  """The batches of one pass over a split (evaluation, prototypes, pseudo
  labels), stopping between two batches once any process got SIGTERM: the
  pass is lost (nothing of it is kept) and runs again on the next run. In
  tests, `testing.sigterm_stage` = a pass stage's name sends SIGTERM before
  its batch number `testing.sigterm_at_step` (counted over its passes)."""
  testing = ctx.config.testing
  hooked = (testing.sigterm_stage == stage_name
            and ctx.stage(stage_name).kind != 'train')  # there: steps
  for batch in ip.eval_batches(spec, **kw):
    if hooked:
      if ctx.pass_batches_done == testing.sigterm_at_step:
        os.kill(os.getpid(), signal.SIGTERM)
      ctx.pass_batches_done += 1
    if _any_process(ctx.preempted):
      raise Preempted(f'{stage_name} preempted during its pass over '
                      f'{spec.dataset} {spec.split}; the pass runs again')
    yield batch


def evaluate(ctx, model, variables, eval_step, stage_name: str = '') -> dict:
  """Target validation split: confusion matrix over the whole split."""
  data = ctx.config.data
  spec = _eval_spec(ctx, data.target, data.val_split, data.eval_size,
                    data.eval_batch_size, resize_label=False)
  confusion = np.zeros((model.num_classes,) * 2, np.int64)
  for batch in pass_batches(ctx, stage_name or 'evaluation', spec):
    confusion += np.asarray(eval_step(variables, _global(ctx, batch)))
  return summarize_all(ctx, confusion)


def summarize_all(ctx, confusion) -> dict:
  return evaluation.summarize_sets(confusion, ctx.config.evaluation.class_sets,
                                   ctx.config.data.label_space)


# ------------------------------------------------------------------ models --

def load_variables(directory: str, model, mesh):
  """A saved `model` directory's variables, replicated over `mesh`."""
  shapes = jax.eval_shape(lambda: models.init_variables(model,
                                                        jax.random.key(0)))
  return checkpoint.load_tree(directory,
                              checkpoint.abstract_like(shapes, mesh))


# `chain_model`: what a stage starts from (see configs/default.py).
CHAIN_MODELS = ('final', 'best')


def model_directory(ctx, stage_name: str) -> str:
  """The saved model of the finished training stage `stage_name` that a
  later stage starts from: DIR/<stage>/model ('final'), or its best model on
  the validation split, DIR/<stage>/best/<best_step>/state ('best')."""
  if ctx.config.chain_model == 'final':
    return ctx.stage_dir(stage_name, 'model')
  step = workdir_lib.read_json(ctx.done_path(stage_name))['best_step']
  return ctx.stage_dir(stage_name, 'best', str(step), 'state')


def load_model(ctx, stage_name: str, model):
  return load_variables(model_directory(ctx, stage_name), model, ctx.mesh)


def load_prototypes(ctx, stage_name: str, num_features: int):
  c = ctx.config.model.num_classes
  abstract = spcl.PrototypeBank(
      jax.ShapeDtypeStruct((c, num_features), jnp.float32),
      jax.ShapeDtypeStruct((c,), jnp.int32))
  return checkpoint.load_tree(ctx.stage_dir(stage_name, 'prototypes'),
                              checkpoint.abstract_like(abstract, ctx.mesh))


def _num_features(model) -> int:
  return model.backbone.num_features


# ---------------------------------------------------------- training stage --

def _make_step(ctx, stage, model, tx, state_parts):
  cfg = ctx.config.stages[stage.name]
  if stage.step == 'warmup':
    return train.make_warmup_step(model, train.discriminator_for(ctx.config),
                                  tx, state_parts['d_tx'], cfg,
                                  ctx.config.discriminator)
  if stage.step == 'spcl':
    thresholds = None
    if cfg.target_mask == 'online':
      thresholds = jnp.asarray(workdir_lib.read_json(ctx.done_path(
          stage.pseudo_labels_from))['class_thresholds'], jnp.float32)
    return train.make_spcl_step(model, tx, cfg, thresholds)
  return train.make_self_training_step(model, tx, cfg)


def _initial_state(ctx, stage, model):
  cfg = ctx.config.stages[stage.name]
  rng = jax.random.PRNGKey(_seed(ctx, stage.name, 'state'))
  init_rng, disc_rng, state_rng = jax.random.split(rng, 3)
  if stage.model_from is None:
    variables = train.initial_variables(ctx.config, init_rng)
  else:
    variables = load_model(ctx, stage.model_from, model)
  variables = jax.device_get(variables)
  tx = train.segmenter_optimizer(cfg, variables['params'],
                                 variables['batch_stats'])
  parts = {'d_tx': None}
  disc_params = None
  if stage.step == 'warmup' and cfg.adversarial_weight > 0:
    parts['d_tx'] = train.discriminator_optimizer(cfg)
    disc = train.discriminator_for(ctx.config)
    disc_params = disc.init(disc_rng, jnp.zeros(
        (1, 64, 64, ctx.config.model.num_classes)))
  bank = None
  if stage.prototypes_from:
    bank = jax.device_get(load_prototypes(ctx, stage.prototypes_from,
                                          _num_features(model)))
  state = train.new_train_state(
      variables, tx, state_rng, prototype_bank=bank, disc_params=disc_params,
      d_tx=parts['d_tx'], num_features=_num_features(model),
      num_classes=ctx.config.model.num_classes)
  return jax.device_put(state, sharding_lib.replicated(ctx.mesh)), tx, parts


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


def run_train_stage(ctx, stage: Stage) -> dict:
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


def _train_stage(ctx, stage: Stage, opened: list) -> dict:
  config = ctx.config
  cfg = config.stages[stage.name]
  model = train.model_for_stage(config, cfg.bn_trainable)
  eval_model = train.model_for_stage(config, False)
  state, tx, parts = _initial_state(ctx, stage, model)
  specs = _train_specs(ctx, stage)
  iterators = {name: step_loop.DevicePrefetch(
      ip.GlobalBatchIterator(ip.train_loader(spec), ctx.mesh),
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
  step_fn = jax.jit(_make_step(ctx, stage, model, tx, parts),
                    donate_argnums=0)
  eval_step = jax.jit(train.make_eval_step(eval_model))
  dashboard = dashboards.Dashboard(config, ctx.data_dir(), ctx.mesh,
                                   eval_model, stage.name)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=cfg.steps, writer=ctx.writer)
  step = int(jax.device_get(state.step))
  progress = console.TrainProgress(
      stage.name, step, cfg.steps,
      sum(s.global_batch_size for s in specs.values()))
  watch = step_loop.MetricsWatch(step, sharding_lib.replicated(ctx.mesh))
  history_path = ctx.stage_dir(stage.name, 'eval_history.json')
  history = [h for h in (workdir_lib.read_json(history_path) if os.path.exists(
      history_path) else []) if h['step'] <= step]
  invalid_pixels, result, last_saved = 0, None, latest
  timing = False   # set once this run's first step is done (rate window)
  # The host reads the devices only at check points: log, checkpoint and
  # evaluation steps (and every step with testing.sync_every_step, the loop
  # before issue 14). With several processes, they agree on a SIGTERM (a
  # collective) at those and every checkpoint.preemption_check_every_steps;
  # one process looks at its flag after every step.
  agree_every = (1 if config.testing.sync_every_step or jax.process_count()
                 == 1 else config.checkpoint.preemption_check_every_steps)

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
    result = evaluate(ctx, eval_model, state.variables(), eval_step,
                      stage.name)
    history.append({'step': step, 'miou': result['miou']})
    if jax.process_index() == 0:
      workdir_lib.write_json(history_path, history)
    _crash_after(ctx, f'{stage.name}/eval_history.json')
    ctx.writer.write_scalars(step, {f'{stage.name}/eval_miou':
                                    result['miou']})
    dashboard.write(ctx.writer, step, state.variables(), result)
    logging.info('%s: step %d mIoU %.2f', stage.name, step, result['miou'])
    best.offer(step, state.variables(), result['miou'])
    _crash_after(ctx, f'{stage.name}/best/{step}')
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
      except Preempted:   # SIGTERM during the evaluation: keep the step
        checkpoints.save(step, state, iterators)
        checkpoints.wait()
        logging.info('%s: preempted at step %d during its evaluation; '
                     'checkpoint saved, the evaluation runs on resume',
                     stage.name, step)
        raise Preempted(f'{stage.name} preempted at step {step}') from None
    if is_save_step(step):
      checkpoints.save(step, state, iterators)
      last_saved = step
      _crash_after(ctx, f'{stage.name}/checkpoints/{step}',
                   wait=checkpoints.wait)
    if is_agree_step(step) and _any_process(ctx.preempted):
      if not checked:
        _check_finite(stage.name, step, watch, checkpoints)
      if last_saved != step:
        checkpoints.save(step, state, iterators)
      checkpoints.wait()
      logging.info('%s: preempted at step %d; checkpoint saved', stage.name,
                   step)
      raise Preempted(f'{stage.name} preempted at step {step}')
  checkpoints.wait()
  logging.info('%s: process %d state digest %s', stage.name,
               jax.process_index(), state_digest(state))
  checkpoint.save_tree(ctx.stage_dir(stage.name, 'model'), state.variables())
  _crash_after(ctx, f'{stage.name}/model')
  if stage.step == 'spcl':
    checkpoint.save_tree(ctx.stage_dir(stage.name, 'prototypes'),
                         state.prototype_bank)
    _crash_after(ctx, f'{stage.name}/prototypes')
  if result is None:  # resumed at the last step: its evaluation is not kept
    result = evaluate(ctx, eval_model, state.variables(), eval_step,
                      stage.name)
  best_step = best.manager.best_step()
  checkpoints.close()
  best.close()
  result.update({'steps': step, 'eval_history': history,
                 'best_step': best_step,
                 'best_miou': max((h['miou'] for h in history),
                                  default=result['miou'])})
  return result


# ----------------------------------------------------------- other stages --

def run_prototypes_stage(ctx, stage: Stage) -> dict:
  """Eq. 2 over the whole source set with the warm-up model."""
  config = ctx.config
  model = train.model_for_stage(config, False)
  variables = load_model(ctx, stage.model_from, model)
  data = config.data
  spec = _eval_spec(ctx, data.source, data.source_split, data.source_size,
                    config.stages[stage.name].batch_size, resize_label=True)
  init_step = jax.jit(train.make_prototype_init_step(model))
  sums = spcl.PrototypeInitSums.zeros(config.model.num_classes,
                                      _num_features(model))
  for batch in pass_batches(ctx, stage.name, spec):
    sums = sums.merge(init_step(variables, _global(ctx, batch)))
  # replicated over the mesh as one global array: with several processes,
  # orbax refuses a host-local one (process 0 alone would own the file)
  bank = jax.device_put(jax.device_get(spcl.prototype_bank_from_sums(sums)),
                        sharding_lib.replicated(ctx.mesh))
  checkpoint.save_tree(ctx.stage_dir(stage.name, 'prototypes'), bank)
  _crash_after(ctx, f'{stage.name}/prototypes')
  images = np.asarray(sums.num_images)
  return {'model_from': stage.model_from,
          **workdir_lib.read_json(ctx.done_path(stage.model_from)),
          'classes_with_prototype': int((images > 0).sum()),
          'images_per_class': dict(zip(
              label_table.class_names(data.label_space),
              (int(n) for n in images)))}


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


def run_pseudo_labels_stage(ctx, stage: Stage) -> dict:
  """Per-class thresholds (histogram pass), then pseudo labels (second
  pass) of the target training split, written as shards keyed by image_id.
  Where the split has labels, their agreement with the pseudo labels is
  reported (a diagnostic; training never reads those labels)."""
  config = ctx.config
  cfg = config.stages[stage.name]
  model = train.model_for_stage(config, False)
  variables = load_model(ctx, stage.model_from, model)
  data = config.data
  spec = _eval_spec(ctx, data.target, data.target_split, data.target_size,
                    cfg.batch_size, resize_label=False)
  histogram_step = jax.jit(train.make_histogram_step(model,
                                                     cfg.histogram_bins))
  histogram = np.zeros((model.num_classes, cfg.histogram_bins), np.int64)
  for batch in pass_batches(ctx, stage.name, spec, purpose='confidences'):
    histogram += np.asarray(histogram_step(variables, _global(ctx, batch)))
  thresholds = spcl.class_thresholds_from_histogram(
      histogram, cfg.threshold_cap, cfg.threshold_quantile)
  label_step = jax.jit(train.make_pseudo_label_step(model))
  agreement = np.zeros((model.num_classes,) * 2, np.int64)
  truth_pixels = np.zeros(model.num_classes, np.int64)
  kept = total = 0
  directory = ctx.stage_dir(stage.name, 'labels')
  with ip.PseudoLabelWriter(directory, jax.process_index(),
                            jax.process_count(),
                            {'model_from': stage.model_from}) as writer:
    for batch in pass_batches(ctx, stage.name, spec, purpose='labels'):
      labels = label_step(variables, _global(ctx, batch),
                          jnp.asarray(thresholds))
      local = np.asarray(multihost_utils.global_array_to_host_local_array(
          labels, ctx.mesh, jax.sharding.PartitionSpec(
              sharding_lib.DATA_AXIS)))
      for image_id, valid, pseudo, truth in zip(
          batch['image_id'], batch['valid'], local, batch['label']):
        if not valid:
          continue
        pseudo = written_pseudo_labels(cfg.labels_from, pseudo, truth)
        writer.add(str(image_id), pseudo)
        kept += int((pseudo != spcl.IGNORE_INDEX).sum())
        total += pseudo.size
        agreement += np.asarray(evaluation.confusion_matrix(
            np.asarray(truth), np.asarray(pseudo, np.int32),
            model.num_classes))
        truth = np.asarray(truth).reshape(-1)
        truth_pixels += np.bincount(truth[truth < model.num_classes],
                                    minlength=model.num_classes)
  _crash_after(ctx, f'{stage.name}/labels')
  counts = multihost_utils.process_allgather(
      np.array([kept, total], np.int64)).reshape(-1, 2).sum(0) if (
          jax.process_count() > 1) else np.array([kept, total])
  if jax.process_count() > 1:
    agreement = multihost_utils.process_allgather(agreement).reshape(
        -1, *agreement.shape).sum(0)
    truth_pixels = multihost_utils.process_allgather(truth_pixels).reshape(
        -1, model.num_classes).sum(0)
  result = {'model_from': stage.model_from,
            **workdir_lib.read_json(ctx.done_path(stage.model_from)),
            'labels_from': cfg.labels_from,
            'class_thresholds': [float(t) for t in thresholds],
            'predicted_pixels': dict(zip(
                label_table.class_names(data.label_space),
                (int(n) for n in histogram.sum(1)))),
            'pseudo_label_coverage': float(counts[0] / max(counts[1], 1)),
            'pseudo_label_miou_vs_labels': summarize_all(ctx, agreement)[
                'miou'],
            **evaluation.pseudo_label_quality(agreement, truth_pixels,
                                              data.label_space)}
  return result


RUNNERS = {'train': run_train_stage, 'prototypes': run_prototypes_stage,
           'pseudo_labels': run_pseudo_labels_stage}


# ---------------------------------------------------------------- pipeline --

def _check_inputs(ctx, stage: Stage) -> None:
  for needed in (stage.model_from, stage.prototypes_from,
                 stage.pseudo_labels_from):
    if needed and not ctx.is_done(needed):
      raise FileNotFoundError(
          f'stage {stage.name!r} needs the output of stage {needed!r}, which '
          f'is not finished in {ctx.workdir}; run it first: python -m '
          f'spcl_jax.main --config=CONFIG:{needed} --workdir={ctx.workdir}')


def _ensure_demo_data(ctx) -> None:
  """Builds the demo dataset if its current version is missing (a build of
  an older version is left alone and not read)."""
  data = ctx.config.data
  if not data.build_if_missing:
    return
  for dataset in {data.source, data.target}:
    name, _, config_name = dataset.partition('/')
    if name != 'sim2real_demo':
      continue
    from data_prep import builders  # pylint: disable=g-import-not-at-top
    version = str(builders.DATASETS[name].VERSION)
    config_dir = os.path.join(ctx.data_dir(), name, config_name or 'default')
    info = os.path.join(config_dir, version, 'dataset_info.json')
    if not os.path.exists(info):
      if jax.process_index() == 0:
        logging.info('building %s %s into %s', dataset, version,
                     ctx.data_dir())
        builders.build(name, ctx.data_dir(), config_name or None)
      _sync('demo-data-built')
    if jax.process_index() == 0:   # what a killed build left behind
      workdir_lib.remove_incomplete_tfds_builds(config_dir)


def update_report(ctx, stage_name: str, result: dict,
                  only_if_missing: bool = False) -> None:
  """Writes `result` as the report's entry of `stage_name` (process 0);
  `only_if_missing`: only if the report has no entry for it (a finished
  stage whose run stopped between its done.json and the report)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(ctx.workdir, 'report.json')
  report = (workdir_lib.read_json(path) if os.path.exists(path)
            else {'stages': {}})
  if only_if_missing and stage_name in report['stages']:
    return
  report['stages'][stage_name] = result
  order = [s.name for s in ctx.stages]
  report['stages'] = dict(sorted(report['stages'].items(),
                                 key=lambda item: order.index(item[0])))
  report['config'] = config_to_json(ctx.config)
  workdir_lib.write_json(path, report, sort_keys=False)


def run(config: ml_collections.ConfigDict, workdir: str,
        allow_config_change: bool = False, stages: tuple = STAGES) -> dict:
  """Runs `config.stages_to_run` in order; returns the report's stages.
  `stages`: the pipeline's stages (`STAGES`, or them followed by more, each
  with a block `config.stages.<name>` of its kind: experiments such as
  benchmarks/self_training_rounds.py)."""
  if tuple(stages[:len(STAGES)]) != STAGES:
    raise ValueError('stages must begin with pipeline.STAGES (the seeds of '
                     'a stage follow its place)')
  validate(config, stages=stages)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  check_workdir_config(config, workdir, allow_config_change)
  writer = metric_writers.create_default_writer(
      os.path.join(workdir, 'tensorboard'),
      just_logging=jax.process_index() > 0)
  ctx = Context(config, workdir, sharding_lib.make_mesh(), writer,
                stages=tuple(stages))
  if jax.process_index() == 0:
    workdir_lib.remove_litter(workdir, [s.name for s in stages])
  _sync('litter-removed')
  previous = signal.signal(signal.SIGTERM, lambda *_: setattr(
      ctx, 'preempted', True))
  try:
    if jax.process_index() == 0 and not os.path.exists(
        os.path.join(workdir, 'report.json')):
      writer.write_hparams({k: v if isinstance(v, (int, float, str, bool))
                            else str(v)
                            for k, v in _flatten(config_to_json(config)).items()})
    _ensure_demo_data(ctx)
    if any(ctx.stage(n).kind == 'train' for n in config.stages_to_run):
      ip.check_labelled(config.data.target, config.data.val_split,
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
        continue
      if _any_process(ctx.preempted):
        raise Preempted(f'preempted before stage {stage.name} started')
      _check_inputs(ctx, stage)
      console.set_stage(stage.name)
      logging.info('%s: starting', stage.name)
      result = RUNNERS[stage.kind](ctx, stage)
      _sync(f'{stage.name}-finished')
      if jax.process_index() == 0:
        if stage.kind == 'train':
          reporting.write_stage_tables(ctx.stage_dir(stage.name), stage.name,
                                       result)
        workdir_lib.write_json(ctx.done_path(stage.name), result)
      _crash_after(ctx, f'{stage.name}/done.json')
      update_report(ctx, stage.name, result)
      _crash_after(ctx, f'report.json:{stage.name}')
      _sync(f'{stage.name}-reported')
      logging.info('%s', reporting.stage_line(stage.kind, stage.name, result))
      results[stage.name] = result
    table = reporting.evaluated_stages_table(
        results, {name: ctx.stage(name).kind for name in results})
    if table:
      logging.info('evaluated stages (%s):\n%s', config.data.val_split, table)
    return results
  finally:
    signal.signal(signal.SIGTERM, previous)
    writer.flush()
