r"""Compiled peak memory per device of each training step, by setting: on a
TPU topology (libtpu's compiler) or on this machine's backend.

  python -m benchmarks.memory --config=configs/gta5.py --topology=v5e:2x2
  python -m benchmarks.memory --config=configs/gta5.py --topology=v5e:4x4 \
      --batch_scale=4 --cache_dir=~/.cache/spcl_jax_memory
  python -m benchmarks.memory --config=configs/gta5.py          # XLA:CPU
  python -m benchmarks.memory --config=configs/demo.py --stages=spcl \
      --config.data.source_size=64,128 --config.data.target_size=64,128

Compiles (never runs) the warm-up, SPCL and self-training steps at the
config's image and batch sizes for the config's own setting and the two
most likely to fit a small device (bfloat16 with remat at 2 and 4
micro-batches); `--grid` compiles every float32 / bfloat16 x
`micro_batches` 1 / 2 / 4 x `model.remat` none / blocks combination (12 per
stage); `--settings=float32/1/groups,bfloat16/1/blocks` compiles those
(DTYPE/MICRO_BATCHES/REMAT) instead.

`--topology=NAME` (e.g. `v5e:2x2`, `v5e:4x4`, `v4:2x2x2`; needs
`pip install -r requirements-tpu-compile.txt`) compiles each step with
libtpu for that TPU slice, sharded as a multi-host run of it shards it: the
config's global batch split over all the slice's chips, the state
replicated (`spcl_jax/run/aot_compile.py`). It prints per chip the peak
memory (`compiled.memory_analysis()`: arguments + outputs - donated aliases
+ temporaries), the FLOPs of one step (`cost_analysis()`), the bytes the
collectives return (read from the compiled HLO: the cost analysis gives
none), the compile time and whether the chip's HBM holds it (a step too
large for it is refused by libtpu: its row says `>HBM` and quotes the
compiler). A global batch
that does not split over the chips is refused with the `--batch_scale`
that makes it split (`--batch_scale=K` multiplies every training batch: 4
on `v5e:4x4` keeps the recipe's per-chip batch of `v5e:2x2`).

Without `--topology` the compile is for this machine's backend, as one of
`--devices` data-parallel devices (1/D of every batch, a copy of the
state). On a CPU the numbers are XLA:CPU's buffer assignment. They are not
a GPU estimate: under spcl_jax's default XLA:CPU flag the peak doubles
(docs/performance.md), and XLA:CPU does not lower it for remat.

A ResNet-101 compile at the recipe's sizes takes minutes on 2 CPU cores
(about 14 on a TPU topology): `--cache_dir` keeps what each compile
measured, and a later run reads a setting it has compiled before back (its
compile time marked `*`; the key is the lowered program with its shardings
and devices, the jax / jaxlib / libtpu versions and XLA_FLAGS /
LIBTPU_INIT_ARGS). JAX's own persistent compilation cache cannot load a
TPU executable without a TPU: TPU compiles are kept out of it.
"""

import itertools
import math
import os
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from spcl_jax.infra import flag_errors
from spcl_jax.models import REMAT_MODES
from spcl_jax.run import aot_compile
from spcl_jax.run import config_checks
from spcl_jax.run import stage_graph

GPU_SIZES_GB = (16, 24, 40, 80)
# HBM per chip (GiB) by libtpu's device kind
TPU_HBM_GIB = {'TPU v4': 32, 'TPU v5 lite': 16, 'TPU v5': 95,
               'TPU v6 lite': 32}
DTYPES = ('float32', 'bfloat16')
MICRO_BATCHES = (1, 2, 4)
REMATS = ('none', 'blocks')  # of --grid ('groups': name it in --settings)
GIB = 2**30


def settings(config, grid: bool, chosen=()) -> list:
  """(dtype, micro_batches, remat) to compile for each stage: `chosen`
  (parsed `--settings`) if any, else the config's own first (micro_batches
  from the stage, filled in by the caller as None)."""
  if chosen:
    return list(chosen)
  if grid:
    return list(itertools.product(DTYPES, MICRO_BATCHES, REMATS))
  return [(config.model.dtype, None, config.model.remat),
          ('bfloat16', 2, 'blocks'), ('bfloat16', 4, 'blocks')]


def parse_settings(values) -> list:
  """`--settings` (DTYPE/MICRO_BATCHES/REMAT each) as (dtype,
  micro_batches, remat) tuples; ValueError naming the one that is not."""
  parsed = []
  for value in values:
    parts = value.split('/')
    if (len(parts) != 3 or parts[0] not in DTYPES or
        not parts[1].isdigit() or int(parts[1]) < 1 or
        parts[2] not in REMAT_MODES):
      raise ValueError(
          f'{value!r} is not DTYPE/MICRO_BATCHES/REMAT with DTYPE one of '
          f'{", ".join(DTYPES)}, MICRO_BATCHES >= 1 and REMAT one of '
          f'{", ".join(REMAT_MODES)} (e.g. bfloat16/2/blocks)')
    parsed.append((parts[0], int(parts[1]), parts[2]))
  return parsed


def scaled(config, factor: int):
  """`config` with every training stage's batch sizes times `factor`."""
  config = config.copy_and_resolve_references()
  if factor == 1:
    return config
  config.unlock()
  for name in stage_graph.TRAINING_STAGES:
    stage = config.stages[name]
    for field in ('source_batch_size', 'target_batch_size'):
      stage[field] *= factor
  return config


def scale_that_splits(config, stage_names, devices: int) -> int:
  """The smallest `--batch_scale` factor (of the config as it is) with
  which every batch of the stages' steps splits over `devices`."""
  factor = 1
  for name in stage_names:
    for field, _ in aot_compile.batch_fields(config, name):
      size = config.stages[name][field]
      if size > 0:
        factor = math.lcm(factor, devices // math.gcd(size, devices))
  return factor


# benchmarks.step_vs_pytorch compiles and sizes its step with these
peak_bytes = aot_compile.peak_bytes


def compile_step(config, stage_name: str, devices: int):
  """The stage's step compiled for one of `devices` devices of this
  machine's backend (abstract state and batches: nothing is initialised
  or run)."""
  return aot_compile.compile_one_device(config, stage_name, devices)


def _batch_shapes(config, stage_name: str, per_device: int) -> list:
  """The step's batch arguments (after the state) of one of `per_device`
  devices as ShapeDtypeStructs."""
  return aot_compile.batch_shapes(config, stage_name, per_device)


def _fits(gib: float) -> str:
  fits = [f'{gb} GB' for gb in GPU_SIZES_GB if gib * GIB <= gb * 1e9]
  return ', '.join(fits) if fits else f'none of {GPU_SIZES_GB} GB'


def _sizes(config, stage_name: str, divide_by: int) -> str:
  return '+'.join(str(config.stages[stage_name][field] // divide_by)
                  for field, _ in aot_compile.batch_fields(config, stage_name))


def _collectives(cost: aot_compile.CompiledCost) -> str:
  return ', '.join(f'{op} {b / 2**20:.1f}' for op, b in sorted(
      cost.collective_bytes.items())) or 'none'


def _seconds(cost: aot_compile.CompiledCost) -> str:
  return f'{cost.compile_seconds:.1f}' + ('*' if cost.cached else '')


def _cache():
  return flags.FLAGS.cache_dir and os.path.expanduser(flags.FLAGS.cache_dir)


def _fail(flag: str, message: str) -> None:
  print(f'error: {flag}: {message}', file=sys.stderr, flush=True)
  sys.exit(flag_errors.ERROR_EXIT_STATUS)


def _configs(base, stage_name: str, devices: int):
  """(config, dtype, micro_batches, remat, config problems) of each
  setting of stage `stage_name` to compile on `devices` devices."""
  chosen = parse_settings(flags.FLAGS.settings)
  for dtype, k, remat in settings(base, flags.FLAGS.grid, chosen):
    config = base.copy_and_resolve_references()
    config.unlock()
    stage = config.stages[stage_name]
    config.model.dtype, config.model.remat = dtype, remat
    stage.micro_batches = stage.micro_batches if k is None else k
    problems = config_checks.memory_config_problems(config, devices)
    yield config, dtype, stage.micro_batches, remat, problems


def run_topology(base, topology: str) -> None:
  """Prints the table of `--topology` (see the module docstring)."""
  flag = f'--topology={topology}'
  try:
    mesh = aot_compile.topology_mesh(topology)
  except aot_compile.TopologyError as e:
    _fail(flag, str(e))
  devices = mesh.size
  unsplit = aot_compile.unsplit_batches(base, flags.FLAGS.stages, devices)
  if unsplit:
    factor = flags.FLAGS.batch_scale * scale_that_splits(
        base, flags.FLAGS.stages, devices)
    others = (f' (nor do {len(unsplit) - 1} other batch sizes)'
              if len(unsplit) > 1 else '')
    _fail(flag, f'the global batch {unsplit[0]} does not split over its '
          f'{devices} chips{others}; use multiples of {devices}, e.g. '
          f'--batch_scale={factor}')
  kind = mesh.devices.flat[0].device_kind
  hbm = TPU_HBM_GIB.get(kind)
  print(f'{base.model.name} on {topology} ({devices} chips of {kind}, '
        f'{hbm or "?"} GiB HBM each), the global batch split over the '
        'chips as a multi-host run splits it. Per chip: peak memory '
        '(libtpu\'s buffer assignment), TFLOP per step, MiB the collectives '
        'return (compile s: * read from --cache_dir):')
  print(f'{"stage":<14}{"global":>8}{"per chip":>9} {"dtype":<9}'
        f'{"micro":>6} {"remat":<7}{"GiB":>8} {"TFLOP":>9}  {"compile s":>9}'
        '  fits  collectives (MiB)')
  for stage_name in flags.FLAGS.stages:
    for config, dtype, k, remat, problems in _configs(base, stage_name,
                                                      devices):
      row = (f'{stage_name:<14}{_sizes(config, stage_name, 1):>8}'
             f'{_sizes(config, stage_name, devices):>9} {dtype:<9}{k:>6}'
             f' {remat:<7}')
      if problems:
        print(f'{row}{"-":>8}  skipped: {"; ".join(problems)}')
        continue
      cost = aot_compile.measure(
          aot_compile.lower_for_mesh(config, stage_name, mesh), _cache())
      if cost.out_of_memory:
        print(f'{row}{">HBM":>8} {"-":>9}  {_seconds(cost):>9}  no    '
              f'libtpu: {cost.out_of_memory}', flush=True)
        continue
      gib = cost.peak_bytes / GIB
      fits = '?' if hbm is None else ('yes' if gib <= hbm else 'no')
      print(f'{row}{gib:>8.3f} {cost.flops / 1e12:>9.3g}  '
            f'{_seconds(cost):>9}  {fits:<4}  {_collectives(cost)}',
            flush=True)


def run_backend(base, devices: int) -> None:
  """Prints the table of this machine's backend, one of `devices`
  devices."""
  backend = jax.default_backend()
  note = (' This is XLA:CPU\'s buffer assignment, not a GPU estimate (its '
          'default flag doubles the peak; remat does not lower it).'
          if backend == 'cpu' else '')
  print(f'{base.model.name}, {devices} device(s), backend {backend}; peak '
        'memory per device (GiB) and the GPU memory sizes it fits (no room '
        f'kept for the framework; compile s: * read from --cache_dir).{note}')
  print(f'{"stage":<14}{"batch":>8} {"dtype":<9}{"micro":>6} {"remat":<7}'
        f'{"GiB":>8}  {"compile s":>9}  fits')
  for stage_name in flags.FLAGS.stages:
    for config, dtype, k, remat, problems in _configs(base, stage_name,
                                                      devices):
      row = (f'{stage_name:<14}{_sizes(config, stage_name, devices):>8} '
             f'{dtype:<9}{k:>6} {remat:<7}')
      if problems:
        print(f'{row}{"-":>8}  skipped: {"; ".join(problems)}')
        continue
      cost = aot_compile.measure(
          aot_compile.lower_one_device(config, stage_name, devices),
          _cache())
      gib = cost.peak_bytes / GIB
      print(f'{row}{gib:>8.3f}  {_seconds(cost):>9}  {_fits(gib)}',
            flush=True)


def define_flags() -> None:
  """The command's flags (defined when it runs, not on import: the tests
  import this module beside other benchmarks that define --config)."""
  config_flags.DEFINE_config_file('config', None, 'config file[:args]',
                                  lock_config=True)
  flags.DEFINE_bool('grid', False, 'every dtype x micro_batches x '
                    'remat combination (default: the config\'s and '
                    'two settings for small devices)')
  flags.DEFINE_list(
      'settings', [], 'DTYPE/MICRO_BATCHES/REMAT settings to compile instead '
      'of the default ones, e.g. float32/1/groups,bfloat16/2/blocks')
  flags.DEFINE_list('stages', list(stage_graph.TRAINING_STAGES),
                    'training stages to compile')
  flags.DEFINE_integer('devices', 1, 'without --topology: '
                       'data-parallel devices the global batch is '
                       'split over')
  flags.DEFINE_string(
      'topology', None, 'TPU topology to compile for with libtpu, e.g. '
      'v5e:2x2, v5e:4x4, v4:2x2x2 (default: this machine\'s backend)')
  flags.DEFINE_integer(
      'batch_scale', 1, 'multiplies every training stage\'s batch sizes (the '
      'global batch)')
  flags.DEFINE_string(
      'cache_dir', None, 'keeps what each compile measured: a setting '
      'compiled before (same program, devices, compiler and flags) is read '
      'back, not compiled again')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  unknown = sorted(set(flags.FLAGS.stages) - set(stage_graph.TRAINING_STAGES))
  if unknown:
    _fail(f'--stages={",".join(flags.FLAGS.stages)}',
          f'{", ".join(unknown)} not a training stage; use any of '
          f'{", ".join(stage_graph.TRAINING_STAGES)}')
  try:
    parse_settings(flags.FLAGS.settings)
  except ValueError as e:
    _fail(f'--settings={",".join(flags.FLAGS.settings)}', str(e))
  if flags.FLAGS.batch_scale < 1:
    _fail(f'--batch_scale={flags.FLAGS.batch_scale}', 'must be >= 1')
  base = scaled(flags.FLAGS.config, flags.FLAGS.batch_scale)
  if flags.FLAGS.topology:
    run_topology(base, flags.FLAGS.topology)
  else:
    run_backend(base, flags.FLAGS.devices)


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('config')
  app.run(main, flags_parser=flag_errors.parse_flags)
