r"""XLA's compiled peak memory per device of each training step, by setting.

  python -m benchmarks.memory --config=configs/gta5.py
  python -m benchmarks.memory --config=configs/gta5.py --grid
  python -m benchmarks.memory --config=configs/demo.py --stages=spcl \
      --config.data.source_size=64,128 --config.data.target_size=64,128

Compiles (never runs) the warm-up, SPCL and self-training steps at the
config's image and batch sizes for float32 / bfloat16 x `micro_batches`
1 / 2 / 4 x `model.remat` none / blocks, and prints
`compiled.memory_analysis()`'s peak per device (arguments + outputs -
donated aliases + temporaries, which is what the buffer assignment needs
at once) and which GPU sizes it fits. `--devices=D` compiles the program of
one of D data-parallel devices (each holds 1/D of every batch and a copy of
the state). The compile is for this machine's backend: on a CPU the numbers
are XLA:CPU's buffer assignment, an estimate for a GPU (whose fusions and
convolution workspaces differ).

The default run covers the config's own setting and the two settings most
likely to fit 24 GB (bfloat16 with remat at 2 and 4 micro-batches); `--grid`
compiles every combination (12 per stage; a full-size ResNet-101 compile
takes a minute or two on 2 CPU cores).
"""

import itertools
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from spcl_jax import flag_errors
from spcl_jax import models
from spcl_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file[:args]',
                                          lock_config=True)
_GRID = flags.DEFINE_bool('grid', False, 'every dtype x micro_batches x '
                          'remat combination (default: the config\'s and '
                          'two settings for 24 GB)')
_STAGES = flags.DEFINE_list('stages', list(train.TRAINING_STAGES),
                            'training stages to compile')
_DEVICES = flags.DEFINE_integer('devices', 1, 'data-parallel devices the '
                                'global batch is split over')

GPU_SIZES_GB = (16, 24, 40, 80)
DTYPES = ('float32', 'bfloat16')
MICRO_BATCHES = (1, 2, 4)
REMATS = ('none', 'blocks')


def settings(config, grid: bool) -> list:
  """(dtype, micro_batches, remat) to compile for each stage: the config's
  own first (micro_batches from the stage, filled in by the caller as
  None)."""
  if grid:
    return list(itertools.product(DTYPES, MICRO_BATCHES, REMATS))
  return [(config.model.dtype, None, config.model.remat),
          ('bfloat16', 2, 'blocks'), ('bfloat16', 4, 'blocks')]


def _batch_shapes(config, stage_name: str, per_device: int) -> list:
  """The step's batch arguments (after the state) as ShapeDtypeStructs."""
  data, stage = config.data, config.stages[stage_name]

  def batch(size, hw):
    return {'image': jax.ShapeDtypeStruct((size // per_device, *hw, 3),
                                          jnp.float32),
            'label': jax.ShapeDtypeStruct((size // per_device, *hw),
                                          jnp.uint8)}

  source_hw = tuple(data.source_crop_size or data.source_size)
  if stage_name == 'warmup':
    batches = [batch(stage.source_batch_size, source_hw)]
    if stage.adversarial_weight > 0:
      batches.append(batch(stage.target_batch_size, tuple(data.target_size)))
    return batches
  if stage_name == 'spcl':
    return [batch(stage.source_batch_size, source_hw),
            batch(stage.target_batch_size, tuple(data.target_size))]
  batches = [batch(stage.target_batch_size, tuple(stage.crop_size))]
  if stage.source_batch_size:
    batches.append(batch(stage.source_batch_size, tuple(data.source_size)))
  return batches


def compile_step(config, stage_name: str, devices: int):
  """The stage's step compiled for one of `devices` devices (abstract
  state and batches: nothing is initialised or run)."""
  cfg = config.stages[stage_name]
  model = train.model_for_stage(config, cfg.bn_trainable)
  rng = jax.random.PRNGKey(0)
  variables = jax.eval_shape(lambda: models.init_variables(model, rng))
  tx = train.segmenter_optimizer(cfg, variables['params'],
                                 variables['batch_stats'])
  num_classes = config.model.num_classes
  num_features = model.backbone.num_features
  d_tx, disc = None, None
  if stage_name == 'warmup' and cfg.adversarial_weight > 0:
    disc = train.discriminator_for(config)
    d_tx = train.discriminator_optimizer(cfg)

  def state_fn():
    disc_params = None if disc is None else disc.init(
        rng, jnp.zeros((1, 64, 64, num_classes)))
    return train.new_train_state(
        models.init_variables(model, rng), tx, rng, disc_params=disc_params,
        d_tx=d_tx, num_features=num_features, num_classes=num_classes)

  state = jax.eval_shape(state_fn)
  if stage_name == 'warmup':
    step = train.make_warmup_step(model, disc, tx, d_tx, cfg,
                                  config.discriminator)
  elif stage_name == 'spcl':
    thresholds = (jnp.zeros((num_classes,), jnp.float32)
                  if cfg.target_mask == 'online' else None)
    step = train.make_spcl_step(model, tx, cfg, thresholds)
  else:
    step = train.make_self_training_step(model, tx, cfg)
  batches = _batch_shapes(config, stage_name, devices)
  return jax.jit(step, donate_argnums=0).lower(state, *batches).compile()


def peak_bytes(compiled) -> int:
  """Peak memory per device of a compiled program from its buffer
  assignment: arguments + outputs - donated aliases + temporaries (XLA:CPU's
  `peak_memory_in_bytes` leaves out most of the temporaries)."""
  stats = compiled.memory_analysis()
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def _fits(gib: float) -> str:
  fits = [f'{gb} GB' for gb in GPU_SIZES_GB if gib * 2**30 <= gb * 1e9]
  return ', '.join(fits) if fits else f'none of {GPU_SIZES_GB} GB'


def main(argv):
  del argv
  base = _CONFIG.value
  devices = _DEVICES.value
  print(f'{base.model.name}, {devices} device(s), backend '
        f'{jax.default_backend()}; peak memory per device (GiB) and the GPU '
        'memory sizes it fits (no room kept for the framework):')
  print(f'{"stage":<14}{"batch":>8} {"dtype":<9}{"micro":>6} {"remat":<7}'
        f'{"GiB":>8}  {"compile s":>9}  fits')
  for stage_name in _STAGES.value:
    for dtype, k, remat in settings(base, _GRID.value):
      config = base.copy_and_resolve_references()
      config.unlock()
      stage = config.stages[stage_name]
      config.model.dtype, config.model.remat = dtype, remat
      stage.micro_batches = stage.micro_batches if k is None else k
      problems = train.memory_config_problems(config, devices)
      sizes = '+'.join(str(b['image'].shape[0]) for b in _batch_shapes(
          config, stage_name, devices))
      row = (f'{stage_name:<14}{sizes:>8} {dtype:<9}{stage.micro_batches:>6}'
             f' {remat:<7}')
      if problems:
        print(f'{row}{"-":>8}  skipped: {"; ".join(problems)}')
        continue
      start = time.perf_counter()
      compiled = compile_step(config, stage_name, devices)
      gib = peak_bytes(compiled) / 2**30
      print(f'{row}{gib:>8.3f}  {time.perf_counter() - start:>9.1f}  '
            f'{_fits(gib)}', flush=True)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main, flags_parser=flag_errors.parse_flags)
