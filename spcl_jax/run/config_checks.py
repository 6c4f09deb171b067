"""A run's config: the semantic checks made before anything is compiled
(`validate`), its JSON form, and the check that a resumed workdir was
started with the same config (`check_workdir_config`)."""

import json
import math
import os

import jax
import ml_collections

from spcl_jax.core import labels as label_table
from spcl_jax.core import train_state
from spcl_jax.core import train_steps
from spcl_jax.data import loaders
from spcl_jax.data import resize
from spcl_jax.data import sources
from spcl_jax.data import transforms
from spcl_jax.infra import storage
from spcl_jax.infra import workdir as workdir_lib
from spcl_jax import models
from spcl_jax.models import layers
from spcl_jax.run import builds
from spcl_jax.run import context
from spcl_jax.run import pass_stages
from spcl_jax.run import released
from spcl_jax.run import source_sampling
from spcl_jax.run import stage_graph
from spcl_jax.run import stage_outputs


# Config keys that may differ when a workdir is resumed.
_RESUMABLE_CHANGES = ('stages_to_run', 'testing.', 'data.data_dir',
                      'log_every_steps', 'evaluation.dashboard_images',
                      'model.remat',   # the same gradients, less memory
                      # when and how batches are read, not which ones; where
                      # several processes may stop, not what they compute
                      'data.device_prefetch', 'data.read_threads',
                      'data.read_ahead', 'max_steps_in_flight',
                      'checkpoint.preemption_check_every_steps')
def _old_frozen_bn_epsilon(old: dict):
  """What a workdir's passes ran with before `model.pass_bn_epsilon`."""
  return old.get('model.frozen_bn_epsilon')


# Fields added after workdirs were written, with the value that reproduces
# what those workdirs ran (or a function of the workdir's flat config that
# gives it): absent there and this value here is no change.
_ADDED_FIELDS = {'model.remat': 'none', 'micro_batches': 1,
                 'color_jitter_implementation': 'float',
                 'source_sampling': 'uniform',
                 'source_sampling_sub_epoch': 3000,
                 'source_sampling_log_offset': 1.01,
                 'images_per_loss_mean': 0,
                 'color_jitter_order': 'after_resize',
                 'scaled_size_rounding': 'round',
                 'model.pass_bn_epsilon': _old_frozen_bn_epsilon,
                 'optimizer': 'sgd', 'adam_betas': [0.9, 0.999],
                 'decay_norms': True, 'lr_warmup_steps': 0,
                 'lr_warmup_ratio': 1e-6, 'model.drop_path_rate': 0.0,
                 'model.head_dropout': 0.0,
                 'source_crop_from': 'original'}


# `testing.transfer_guard`: '' (none) or a jax.transfer_guard level.
TRANSFER_GUARD_LEVELS = ('', 'allow', 'log', 'disallow', 'log_explicit',
                         'disallow_explicit')


class ConfigMismatchError(ValueError):
  pass


# The batch-size fields whose images a training step's pixel-averaged losses
# weigh (`images_per_loss_mean`), by step; the warm-up's target batch only
# feeds the discriminator (a mean over its outputs, equal for every image).
_LOSS_WEIGHTED_BATCHES = {
    'warmup': ('source_batch_size',),
    'spcl': ('source_batch_size', 'target_batch_size'),
    'self_training': ('target_batch_size', 'source_batch_size'),
}


def loss_weighting_problems(config, stages=stage_graph.STAGES) -> list:
  """What is wrong with the training stages' `images_per_loss_mean`: an
  integer >= 0 dividing every global batch whose losses it weighs."""
  problems = []
  for stage in [s for s in stages if s.kind == 'train']:
    block = config.stages[stage.name]
    n = block.get('images_per_loss_mean', 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
      problems.append(f'stages.{stage.name}.images_per_loss_mean = {n!r} '
                      'must be an integer >= 0 (0: the mean over the global '
                      "batch's valid pixels; n: one mean per n images)")
      continue
    for key in _LOSS_WEIGHTED_BATCHES[stage.step]:
      size = block[key]
      if n and size > 0 and size % n:
        problems.append(f'stages.{stage.name}.images_per_loss_mean = {n} '
                        f'does not divide stages.{stage.name}.{key} = '
                        f'{size}')
  return problems


def memory_config_problems(config, num_devices: int) -> list:
  """What is wrong with `model.remat` and the training stages'
  `micro_batches` (each must divide every per-device batch its step
  splits); empty when nothing is. Checked before anything is compiled."""
  problems = []
  problem = models.remat_problem(config.model.name,
                                 config.model.get('remat', 'none'))
  if problem:
    problems.append(problem)
  for name in stage_graph.TRAINING_STAGES:
    stage = config.stages[name]
    k = stage.get('micro_batches', 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      problems.append(f'stages.{name}.micro_batches = {k!r} must be an '
                      'integer >= 1 (1: no gradient accumulation)')
      continue
    for key in train_steps.split_batch_fields(name, stage):
      size = stage[key]
      if size <= 0 or size % num_devices:
        continue  # reported by the batch-size check
      if (size // num_devices) % k:
        problems.append(
            f'stages.{name}.micro_batches = {k} does not divide the '
            f'per-device batch of stages.{name}.{key} = {size} on '
            f'{num_devices} devices ({size // num_devices} per device)')
  return problems


# Model fields one family has and the other not, with the value that means
# "unused" (configs/default.py's).
_FAMILY_FIELDS = {
    'deeplab': {'drop_path_rate': 0.0, 'head_dropout': 0.0},
    # (layer_init also initialises the discriminator: allowed for both)
    'segformer': {'aspp_rates': (6, 12, 18, 24), 'base_width': 64},
}


def model_family_problems(model) -> list:
  """Fields set for the other model family than `model.name`'s (e.g. ASPP
  rates for a SegFormer, stochastic depth for a DeepLab): refused rather
  than ignored."""
  if model.name not in models.MODELS:
    return []  # reported as an unknown model
  family = models.MODELS[model.name].family
  problems = []
  for field, unused in _FAMILY_FIELDS[family].items():
    value = model.get(field, unused)
    if (tuple(value) if isinstance(value, (list, tuple)) else value) != unused:
      problems.append(f'model.{field} = {value!r} but {model.name} is a '
                      f'{family} model without it; leave it at {unused!r}')
  for field in ('drop_path_rate', 'head_dropout'):
    rate = model.get(field, 0.0)
    if (isinstance(rate, bool) or not isinstance(rate, (int, float))
        or not 0 <= rate < 1):
      problems.append(f'model.{field} = {rate!r} must be a number in [0, 1)')
  return problems


def optimizer_problems(config, stages=stage_graph.STAGES) -> list:
  """What is wrong with the training stages' optimiser fields."""
  problems = []
  spec = models.MODELS.get(config.model.name)
  for name in [s.name for s in stages if s.kind == 'train']:
    stage = config.stages[name]
    if (not stage.get('decay_norms', True) and spec is not None
        and spec.family == 'deeplab'):
      problems.append(f'stages.{name}.decay_norms = False but '
                      f'{config.model.name} has no module named *norm* '
                      '(its BatchNorms are bn*); leave it True')
    kind = stage.get('optimizer', 'sgd')
    if kind not in train_state.OPTIMIZERS:
      problems.append(f'stages.{name}.optimizer: {kind!r}, expected one of '
                      f'{train_state.OPTIMIZERS}')
    betas = stage.get('adam_betas', (0.9, 0.999))
    if len(betas) != 2 or not all(
        isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
      problems.append(f'stages.{name}.adam_betas = {tuple(betas)!r} must be '
                      'two numbers in [0, 1)')
    warmup = stage.get('lr_warmup_steps', 0)
    if (isinstance(warmup, bool) or not isinstance(warmup, int)
        or not 0 <= warmup <= stage.schedule_steps):
      problems.append(f'stages.{name}.lr_warmup_steps = {warmup!r} must be '
                      'an integer in [0, schedule_steps] (0: no warm-up)')
    ratio = stage.get('lr_warmup_ratio', 1e-6)
    if (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
        or not 0 <= ratio <= 1):
      problems.append(f'stages.{name}.lr_warmup_ratio = {ratio!r} must be a '
                      'fraction in [0, 1] (of the rate at step 0)')
  return problems


def source_sampling_problems(data) -> list:
  """What is wrong with `data.source_sampling` and its numbers; empty when
  nothing is. A config written before they existed has none (uniform)."""
  if 'source_sampling' not in data:
    return []
  problems = []
  if data.source_sampling not in loaders.SAMPLINGS:
    problems.append(f'data.source_sampling: {data.source_sampling!r}, '
                    f'expected one of {loaders.SAMPLINGS}')
  draws = data.source_sampling_sub_epoch
  if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
    problems.append(f'data.source_sampling_sub_epoch = {draws!r} must be an '
                    'integer >= 1 (draws per sub-epoch; the release: 3000)')
  offset = data.source_sampling_log_offset
  if (isinstance(offset, bool) or not isinstance(offset, (int, float))
      or not math.isfinite(offset) or offset <= 1):
    problems.append(f'data.source_sampling_log_offset = {offset!r} must be '
                    'a number > 1 (class weight 1 / log(offset + share); the '
                    'release: 1.01)')
  return problems


# ------------------------------------------------------------------ checks --

def validate(config: ml_collections.ConfigDict,
             num_devices: int | None = None,
             stages: tuple = stage_graph.STAGES) -> None:
  """Semantic checks that fail before anything is compiled (batch sizes
  against `num_devices`, default: every device of every process; stage
  names against `stages`)."""
  problems = list(released.conflicts(config))
  choices = (
      ('chain_model', config.chain_model, stage_outputs.CHAIN_MODELS),
      ('model.layer_init', config.model.layer_init, layers.LAYER_INITS),
      ('data.color_jitter_order', config.data.color_jitter_order,
       loaders.COLOR_JITTER_ORDERS),
      ('data.scaled_size_rounding', config.data.scaled_size_rounding,
       sorted(transforms.SCALED_SIZE_ROUNDINGS)),
      ('data.color_jitter_implementation',
       config.data.color_jitter_implementation,
       sorted(transforms.COLOR_JITTERS)),
      ('data.image_interpolation', config.data.image_interpolation,
       sorted(resize.INTERPOLATIONS)))
  problems.extend(f'{field}: {value!r}, expected one of {allowed}'
                  for field, value, allowed in choices
                  if value not in allowed)
  for field in ('frozen_bn_epsilon', 'pass_bn_epsilon'):
    epsilon = config.model[field]
    if (isinstance(epsilon, bool) or not isinstance(epsilon, (int, float))
        or not epsilon >= 0):
      problems.append(f'model.{field} = {epsilon!r} must be a number >= 0')
  if not (isinstance(config.seed, int)
          and 0 <= config.seed < context.SEED_LIMIT):
    problems.append(f'seed = {config.seed!r} must be an integer in '
                    f'[0, {context.SEED_LIMIT})')
  for name in config.stages_to_run:
    if name not in {s.name for s in stages}:
      problems.append(f'stages_to_run: unknown stage {name!r} (known: '
                      f'{[s.name for s in stages]})')
  blockless = [s.name for s in stages if s.name not in config.stages]
  if blockless:   # the checks below read every stage's block
    raise ValueError(f'invalid config: no block stages.<name> for the '
                     f'stages {blockless} (each stage needs one of its '
                     'kind, e.g. a copy of stages.self_training)')
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
    if config.stages[name].labels_from not in pass_stages.LABEL_SOURCES:
      problems.append(f"stages.{name}.labels_from: "
                      f"{config.stages[name].labels_from!r}, expected one "
                      f"of {pass_stages.LABEL_SOURCES}")
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
  read_ahead, read_threads = config.data.read_ahead, config.data.read_threads
  if not (isinstance(read_ahead, int) and read_ahead >= 1):
    problems.append(f'data.read_ahead = {read_ahead!r} must be an integer '
                    '>= 1 (records each stream of each worker reads ahead)')
  if not (isinstance(read_threads, int) and read_threads >= 0):
    problems.append(f'data.read_threads = {read_threads!r} must be an '
                    'integer >= 0 (0: read in the stream\'s own thread)')
  in_flight = config.max_steps_in_flight
  if not (isinstance(in_flight, int) and in_flight >= 0):
    problems.append(f'max_steps_in_flight = {in_flight!r} must be an '
                    'integer >= 0 (0: no bound)')
  if config.testing.transfer_guard not in TRANSFER_GUARD_LEVELS:
    problems.append(f'testing.transfer_guard: '
                    f'{config.testing.transfer_guard!r}, expected one of '
                    f'{TRANSFER_GUARD_LEVELS}')
  problems.extend(source_sampling_problems(config.data))
  problems.extend(model_family_problems(config.model))
  problems.extend(optimizer_problems(config, stages))
  crop_from = config.data.get('source_crop_from', 'original')
  if crop_from not in ('original', 'resized'):
    problems.append(f"data.source_crop_from: {crop_from!r}, expected "
                    "'original' or 'resized'")
  elif crop_from == 'resized' and not config.data.source_crop_size:
    problems.append("data.source_crop_from = 'resized' needs "
                    'data.source_crop_size (the crop taken from the resized '
                    'source)')
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
  # each a copy of its kind's block
  for extra in stages[len(stage_graph.STAGES):]:
    batch_keys += ((extra.name, 'target_batch_size')
                   if extra.kind == 'train' else (extra.name, 'batch_size'),)
  for stage, key in batch_keys:
    value = config.stages[stage][key]
    if value <= 0 or value % devices:
      problems.append(f'stages.{stage}.{key} = {value} must be a positive '
                      f'multiple of the {devices} devices')
  problems.extend(memory_config_problems(config, devices))
  problems.extend(loss_weighting_problems(config, stages))
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


def datasets_read(config, stages: tuple = stage_graph.STAGES) -> list:
  """(dataset field, split field) of `config.data` for every split that the
  stages of `stages` in `config.stages_to_run` read, without repeats: a
  training stage its source and target streams and the validation split,
  the prototype stage the source, a pseudo-label stage the target."""
  source, target = ('source', 'source_split'), ('target', 'target_split')
  read = []
  for stage in stages:
    if stage.name not in config.stages_to_run:
      continue
    cfg = config.stages[stage.name]
    if stage.kind == 'prototypes':
      read.append(source)
    elif stage.kind == 'pseudo_labels':
      read.append(target)
    else:
      if stage.step != 'self_training' or cfg.source_batch_size:
        read.append(source)
      if stage.step != 'warmup' or cfg.adversarial_weight > 0:
        read.append(target)
      read.append(('target', 'val_split'))
  return list(dict.fromkeys(read))


def check_datasets(config, workdir: str,
                   stages: tuple = stage_graph.STAGES) -> None:
  """Refuses a run whose data is missing before anything is written or set
  up: every split that the unfinished stages to run read (`datasets_read`)
  must be built in `data.data_dir`, or be one of the demo's, which the run
  builds (`data.build_if_missing`) into a local `data.data_dir` (not into a
  `gs://` one: TFDS's ArrayRecord writer writes local files only). Raises
  `sources.DatasetNotBuiltError` (naming the dataset, the folder
  looked in and the build command), or a ValueError naming the config
  fields and the splits the dataset has."""
  data = config.data
  data_dir = sources.data_dir_path(data.data_dir)
  unfinished = tuple(s for s in stages if not storage.exists(
      os.path.join(workdir, s.name, 'done.json')))
  for field, split_field in datasets_read(config, unfinished):
    dataset, split = data[field], data[split_field]
    try:
      directory = sources.dataset_directory(dataset, data_dir)
    except sources.DatasetNotBuiltError:
      splits = (builds.demo_splits(field, dataset) if data.build_if_missing
                else None)
      if splits is None:
        raise
      if storage.is_remote(data_dir):   # a build writes local files
        raise sources.DatasetNotBuiltError(
            f'data.data_dir = {data_dir!r}: dataset {dataset!r} is not built '
            'there, and a run builds it into a local data_dir only; build it '
            'into a local data_dir and copy it up: '
            f'{sources.build_command(dataset, data_dir)}') from None
      where = 'built by this run'
    else:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      splits = sorted(tfds.builder_from_directory(directory).info.splits)
      where = f'in {directory}'
    if split not in splits:
      raise ValueError(f'data.{split_field} = {split!r}: dataset {dataset!r} '
                       f'(data.{field}, {where}) has no such split; it has '
                       f'{splits}')
  check_source_labelled(config, unfinished)


def check_source_labelled(config, stages: tuple) -> None:
  """Refuses class-balanced sampling (`data.source_sampling`) of a source
  split built without labels (images only), naming the dataset, before
  anything runs: there is no class to balance. A split not built yet is
  the demo's (labelled), built by the run."""
  data = config.data
  if not source_sampling.samples_class_balanced(config, stages):
    return
  try:
    unlabelled = sources.built_without_labels(
        data.source, data.source_split, sources.data_dir_path(data.data_dir))
  except sources.DatasetNotBuiltError:
    return
  if unlabelled:
    raise ValueError(
        f"data.source_sampling = 'class_balanced' needs the source's labels, "
        f'but split {data.source_split!r} of dataset {data.source!r} '
        '(data.source) was built without labels (images only); use '
        "data.source_sampling = 'uniform' or a labelled source")


def flatten(config: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in config.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_to_json(config) -> dict:
  return json.loads(json.dumps(config.to_dict(), default=list))


def _old_values(key: str) -> list:
  """The `_ADDED_FIELDS` values (or functions of an old flat config) of
  flat config `key`: those of the fields it is, by full name or suffix."""
  return [value for field, value in _ADDED_FIELDS.items()
          if key == field or key.endswith('.' + field)]


def is_added_default(key: str, value) -> bool:
  """Whether flat config `key` is a field added after workdirs were
  written, at the value that reproduces them (`_ADDED_FIELDS`): a config
  that differs from an older one only there computes the same."""
  return any(not callable(old) and value == old for old in _old_values(key))


def _added_with_old_value(key: str, old: dict, new: dict) -> bool:
  return key not in old and any(
      new.get(key) == (value(old) if callable(value) else value)
      for value in _old_values(key))


def _read_workdir_config(path: str) -> dict:
  """DIR/config.json as a dict, or a ConfigMismatchError naming the file
  and what to do when it is not the JSON object our runs write."""
  try:
    previous = json.loads(storage.read_bytes(path))
  except ValueError as e:   # not JSON, not UTF-8
    problem = f'is not JSON ({e})'
  else:
    if isinstance(previous, dict):
      return previous
    problem = f'holds a {type(previous).__name__}, not a JSON object'
  raise ConfigMismatchError(
      f'{path} {problem}: it records the config this workdir was started '
      'with. Restore it, delete it to resume with the current config (it is '
      'written again), or use a new --workdir.')


def check_workdir_config(config, workdir: str,
                         allow_config_change: bool) -> None:
  """Refuses to resume a workdir written by a different config."""
  path = os.path.join(workdir, 'config.json')
  current = config_to_json(config)
  if storage.exists(path):
    previous = _read_workdir_config(path)
    old, new = flatten(previous), flatten(current)
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
  workdir_lib.crash_after_write(config, 'config.json')
