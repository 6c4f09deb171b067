r"""Steps/s of the training loop (`train_stage._train_stage`) with the loop
before issue 14 (the metrics read on the host after every step, each batch
made when the step asks for it) and the loop now (the metrics read only at
check points, the next batches prefetched onto the devices), side by side
in one run:

  python -m benchmarks.step_loop                  # smoke sizes, ~2 min
  python -m benchmarks.step_loop --size=64,128 --steps=15 --rounds=2

Runs the warm-up stage of `configs/demo.py:smoke` (the `tiny` demo data,
built into a temporary directory unless --data_dir holds it) for 1 +
--steps steps, logging once at the end: the rate is TrainProgress's
steady-state one (the first step, which compiles, is left out). Both
variants run in this process, alternately --rounds times; the second and
later compile from a temporary persistent compilation cache. On the CPU
backend XLA computes on one core by default (--device_cores=1), so that the
host has a core of its own as it has beside an accelerator: with XLA
threading over every core, input and compute share the same cores and
nothing can overlap.

"Before" is the loop today with `testing.sync_every_step=True` and
`data.device_prefetch=0`; its metrics are merged by the same jitted call
(the old loop merged them eagerly, a little slower still).
"""

import os
import shutil
import tempfile

from absl import app
from absl import flags
from absl import logging

_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'TFDS data directory holding sim2real_demo/tiny '
    '(default: built into a temporary directory)')
_STEPS = flags.DEFINE_integer('steps', 20, 'timed steps (after the first)')
_SIZE = flags.DEFINE_list('size', ['32', '64'], 'source / target height,'
                          'width')
_BATCH = flags.DEFINE_integer('batch', 8, 'source and target batch size')
_WORKERS = flags.DEFINE_integer('workers', 0, 'grain worker processes')
_ROUNDS = flags.DEFINE_integer('rounds', 1, 'runs of each variant')
_DEVICE_CORES = flags.DEFINE_enum(
    'device_cores', '1', ['1', 'all'], 'on the CPU backend: XLA computes on '
    'one core and the host (input, dispatch) has the others, as beside an '
    'accelerator; all: XLA threads over every core (no overlap is possible '
    'on a saturated machine)')

VARIANTS = (
    ('before (read every step, no prefetch)',
     {'testing.sync_every_step': True, 'data.device_prefetch': 0}),
    ('now (read at check points, prefetch 2)',
     {'testing.sync_every_step': False, 'data.device_prefetch': 2}),
)


def _config(data_dir, overrides):
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config('smoke')
  config.data.data_dir = data_dir
  config.stages_to_run = ('warmup',)
  size = tuple(int(v) for v in _SIZE.value)
  config.data.source_size = config.data.target_size = size
  config.data.eval_size = size
  config.data.worker_count = _WORKERS.value
  warmup = config.stages.warmup
  warmup.source_batch_size = warmup.target_batch_size = _BATCH.value
  warmup.steps = warmup.schedule_steps = 1 + _STEPS.value
  warmup.eval_every_steps = warmup.steps
  config.log_every_steps = config.checkpoint.every_steps = warmup.steps
  config.evaluation.dashboard_images = 0
  for dotted, value in overrides.items():
    parent, key = dotted.split('.')
    config[parent][key] = value
  return config


def _timed_run(config, workdir):
  """steps/s over the steps after the first (TrainProgress's window)."""
  from spcl_jax.infra import console  # pylint: disable=g-import-not-at-top
  from spcl_jax.run import pipeline  # pylint: disable=g-import-not-at-top
  rates = []
  log = console.TrainProgress.log

  def recording(self, step, metrics):
    scalars = log(self, step, metrics)
    rate = scalars.get(f'{self.stage}/images_per_sec')
    if rate is not None:
      rates.append(rate / self.images_per_step)
    return scalars

  console.TrainProgress.log = recording
  try:
    pipeline.run(config, workdir)
  finally:
    console.TrainProgress.log = log
  return rates[-1]


def main(argv):
  del argv
  if _DEVICE_CORES.value == '1':   # before JAX starts its CPU backend
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' '
                               '--xla_cpu_multi_thread_eigen=false '
                               'intra_op_parallelism_threads=1').strip()
  scratch = tempfile.mkdtemp(prefix='step_loop_benchmark_')
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                        os.path.join(scratch, 'xla_cache'))
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir',
                    os.environ['JAX_COMPILATION_CACHE_DIR'])
  logging.set_verbosity(logging.WARNING)
  try:
    data_dir = _DATA_DIR.value
    if not data_dir:
      from data_prep import builders  # pylint: disable=g-import-not-at-top
      data_dir = os.path.join(scratch, 'tfds')
      builders.build('sim2real_demo', data_dir, 'tiny')
    results = {name: [] for name, _ in VARIANTS}
    for round_ in range(_ROUNDS.value):
      for index, (name, overrides) in enumerate(VARIANTS):
        workdir = os.path.join(scratch, f'run_{round_}_{index}')
        results[name].append(_timed_run(_config(data_dir, overrides),
                                        workdir))
        shutil.rmtree(workdir, ignore_errors=True)
    print(f'warm-up step loop, {_STEPS.value} steps after the first, '
          f'{"x".join(_SIZE.value)}, batch {_BATCH.value} + {_BATCH.value}, '
          f'{_WORKERS.value} grain workers, {jax.device_count()} '
          f'{jax.devices()[0].platform} device(s), {os.cpu_count()} CPUs'
          + (', XLA on one core' if jax.devices()[0].platform == 'cpu'
             and _DEVICE_CORES.value == '1' else ''))
    base = max(results[VARIANTS[0][0]])
    for name, rates in results.items():
      best = max(rates)
      print(f'  {name:42s} {best:7.2f} steps/s   x{best / base:.2f}'
            + (f'   (rounds: {", ".join(f"{r:.2f}" for r in rates)})'
               if len(rates) > 1 else ''))
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)
