r"""Runs the SPCL pipeline (or one stage of it).

  python -m spcl_jax.main --config=configs/demo.py --workdir=/tmp/spcl_demo
  python -m spcl_jax.main --config=configs/gta5.py:spcl --workdir=DIR

Rerunning skips finished stages and resumes an unfinished one. Exit status:
0 when every asked stage is finished, 75 when preempted (SIGTERM; the state
is checkpointed: rerun the same command to resume), 1 on an error reported
in one line (a bad config, missing inputs, a non-finite loss, no readable
checkpoint). Several
processes (TPU pods, multi-node GPU) are detected by `jax.distributed`; a
local multi-process CPU run passes --coordinator_address, --num_processes
and --process_id.

The console shows the project's lines, warnings and errors; --verbosity=1
adds every library's INFO lines. DIR/log.txt gets the full log
(spcl_jax/console.py).
"""

import logging as py_logging
import os
import sys

# First: TensorFlow's native log level must be set before it is imported.
from spcl_jax.infra import console  # pylint: disable=g-bad-import-order
console.quiet_native_logs(sys.argv)

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
from ml_collections import config_flags

from spcl_jax.infra import flag_errors
from spcl_jax.infra import storage

# The run's modules (jax, TensorFlow, flax, orbax, ...) are imported by the
# functions that use them, not here: grain starts its worker processes with
# multiprocessing's `spawn`, which imports this module (`__mp_main__`) in
# every worker; with them here each worker held ~0.9 GB of imports.

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file[:args]',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False, 'resume a workdir whose config differs')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (multi-process)')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'processes')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'this process')


def _initialize_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if _NUM_PROCESSES.value and _NUM_PROCESSES.value > 1:
    if jax.config.jax_platforms in (None, '', 'cpu') and not os.environ.get(
        'CUDA_VISIBLE_DEVICES'):
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  elif any(v in os.environ for v in ('TPU_WORKER_HOSTNAMES', 'SLURM_NTASKS',
                                     'OMPI_COMM_WORLD_SIZE')):
    jax.distributed.initialize()


def _exit(status: int) -> None:
  """sys.exit(status); where a SIGTERM abandoned a compile or a dataset
  build (`processes.interruptible`), os._exit without waiting for it:
  the interpreter's teardown would run under the still-working thread."""
  import jax  # pylint: disable=g-import-not-at-top
  from spcl_jax.run import processes  # pylint: disable=g-import-not-at-top
  abandoned = processes.abandoned_work()
  if not abandoned:
    sys.exit(status)
  logging.info('not waiting for: %s', ', '.join(abandoned),
               extra={console.FILE_ONLY: True})
  logging.flush()
  py_logging.shutdown()   # closes log.txt (a gs:// workdir's: uploads it)
  sys.stderr.flush()
  if jax.process_count() > 1:
    jax.distributed.shutdown()   # with the other processes, as at exit
  os._exit(status)  # pylint: disable=protected-access


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # pylint: disable=g-import-not-at-top
  import jax
  from spcl_jax.infra import checkpoint
  from spcl_jax.run import config_checks
  from spcl_jax.run import pipeline
  from spcl_jax.run import processes
  from spcl_jax.run import train_stage
  # pylint: enable=g-import-not-at-top
  console.setup(flags.FLAGS.verbosity)
  try:
    storage.check_supported('--workdir', _WORKDIR.value)
    storage.check_bucket('--workdir', _WORKDIR.value)
    storage.check_supported('--config.data.data_dir',
                            _CONFIG.value.data.data_dir)
  except ValueError as e:
    console.report_error(str(e))
    sys.exit(1)
  # clu's writers import TensorFlow: keep it off the accelerators.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  _initialize_distributed()
  console.log_to_file(os.path.join(
      storage.resolve(_WORKDIR.value),
      console.log_file_name(jax.process_index())))
  logging.info('process %d of %d, %d devices (%s)', jax.process_index(),
               jax.process_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    pipeline.run(_CONFIG.value, _WORKDIR.value, _ALLOW_CONFIG_CHANGE.value)
  except processes.Preempted as e:
    logging.info('%s; rerun the same command to resume (exit status %d)', e,
                 pipeline.PREEMPTED_EXIT_STATUS)
    _exit(pipeline.PREEMPTED_EXIT_STATUS)
  except (config_checks.ConfigMismatchError, train_stage.NonFiniteLossError,
          checkpoint.UnreadableCheckpointError, FileNotFoundError,
          ValueError) as e:
    console.report_error(str(e))   # once on the console, and in log.txt
    sys.exit(1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  # a bad --config: one error line, not absl's and ml_collections' tracebacks
  app.run(main, flags_parser=flag_errors.parse_flags)
