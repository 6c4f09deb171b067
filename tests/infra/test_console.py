"""The calm console: the filter, format, log file and progress lines on
synthetic log records, and the console of the shared smoke run."""

import asyncio
import gc
import io
import logging as py_logging
import os
import re
import subprocess
import sys

from absl import logging
import pytest

from spcl_jax.infra import console

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
PROJECT_FILE = os.path.join(ROOT, 'spcl_jax', 'pipeline.py')
ORBAX_FILE = '/venv/site-packages/orbax/checkpoint/checkpoint_manager.py'


def _record(level, pathname, message, name='absl'):
  return py_logging.LogRecord(name, level, pathname, 7, message, None, None)


@pytest.fixture
def fresh_state():
  saved = dict(console._state)  # pylint: disable=protected-access
  yield
  console._state.clear()  # pylint: disable=protected-access
  console._state.update(saved)  # pylint: disable=protected-access


@pytest.mark.parametrize('verbosity', [0, 1])
def test_filter_drops_third_party_info_unless_verbose(verbosity):
  keep = console.ConsoleFilter(verbosity).filter
  assert keep(_record(py_logging.INFO, PROJECT_FILE, 'warmup: starting'))
  assert keep(_record(py_logging.INFO,
                      os.path.join(ROOT, 'data_prep', 'builders.py'), 'x'))
  assert keep(_record(py_logging.WARNING, ORBAX_FILE, 'disk nearly full'))
  assert keep(_record(py_logging.ERROR, ORBAX_FILE, 'save failed'))
  assert keep(_record(py_logging.INFO, ORBAX_FILE, 'Saving')) == bool(
      verbosity)
  assert keep(_record(py_logging.DEBUG, ORBAX_FILE, 'detail')) == bool(
      verbosity)
  # a file outside the project whose path merely starts like it
  assert keep(_record(py_logging.INFO, os.path.join(
      ROOT, 'spcl_jax_old', 'pipeline.py'), 'x')) == bool(verbosity)


def _asyncio_record(fail):
  """The one record asyncio logs after `fail(loop)` on a fresh event loop
  (the loop closed and garbage collected)."""
  records = []
  asyncio_logger = py_logging.getLogger('asyncio')
  collect = py_logging.Handler()
  collect.emit = records.append
  asyncio_logger.addHandler(collect)
  loop = asyncio.new_event_loop()
  try:
    fail(loop)
  finally:
    loop.close()
    gc.collect()
    asyncio_logger.removeHandler(collect)
  (record,) = records
  return record


def _unretrieved_task_failure_record(filename):
  """The record asyncio logs for a task whose exception no one awaited, the
  failing coroutine compiled as if it lived in `filename`."""
  code = compile('async def read_shard():\n'
                 '  raise ValueError("OUT_OF_RANGE reading shard 0.0.0.0")\n',
                 filename, 'exec')
  namespace = {}
  exec(code, namespace)  # pylint: disable=exec-used

  def fail(loop):
    loop.create_task(namespace['read_shard']())
    loop.run_until_complete(asyncio.sleep(0.01))
  return _asyncio_record(fail)


def _unretrieved_future_failure_record(message):
  """The record asyncio logs for a future whose exception no one retrieved,
  the exception set from outside Python (as TensorStore's reads do)."""
  return _asyncio_record(
      lambda loop: loop.create_future().set_exception(ValueError(message)))


def _lowered(*makers):
  """The records of `makers` with OrbaxTaskFailuresAsDebug on asyncio's
  logger."""
  asyncio_logger = py_logging.getLogger('asyncio')
  lower = console.OrbaxTaskFailuresAsDebug()
  asyncio_logger.addFilter(lower)
  try:
    return [make() for make in makers]
  finally:
    asyncio_logger.removeFilter(lower)


def test_orbax_unretrieved_task_failures_are_lowered_to_debug():
  orbax_failure, other_failure = _lowered(
      lambda: _unretrieved_task_failure_record(
          '/venv/site-packages/orbax/checkpoint/_src/serialization/'
          'serialization.py'),
      lambda: _unretrieved_task_failure_record(
          '/venv/site-packages/somelib/io.py'))
  for record in (orbax_failure, other_failure):
    assert 'never retrieved' in record.getMessage()
  assert orbax_failure.levelno == py_logging.DEBUG
  # below what logging's last-resort handler (no handler left) prints
  assert orbax_failure.levelno < py_logging.lastResort.level
  quiet, verbose = console.ConsoleFilter(0), console.ConsoleFilter(1)
  assert not quiet.filter(orbax_failure)
  assert verbose.filter(orbax_failure)
  # any other library's lost task failure stays an ERROR on the console
  assert other_failure.levelno == py_logging.ERROR
  assert quiet.filter(other_failure)
  # recognised by the task's repr alone (no traceback attached) ...
  assert console.is_orbax_task_failure(_record(
      py_logging.ERROR, '/usr/lib/python3.11/asyncio/base_events.py',
      'Task exception was never retrieved\nfuture: <Task finished '
      'coro=<_read_shard() done, defined at /venv/site-packages/orbax/'
      'checkpoint/serialization.py:394> exception=ValueError()>',
      name='asyncio'))
  # ... and only from asyncio: orbax's own errors stay errors
  assert not console.is_orbax_task_failure(
      _record(py_logging.ERROR, ORBAX_FILE, 'save failed', name='orbax'))


def test_orbax_unretrieved_future_failures_are_lowered_to_debug():
  """The CI failure of stop 19: TensorStore's read futures of a damaged
  checkpoint carry no Python frame and no orbax path; their error names
  the OCDBT database of orbax's checkpoint storage."""
  storage_failure, other_failure = _lowered(
      lambda: _unretrieved_future_failure_record(
          'OUT_OF_RANGE: Error reading "params.conv1.kernel/0.0.0.0" in '
          'OCDBT database at local file "/w/spcl/checkpoints/4/state/": '
          'Requested byte range [3584169, 3721155) is not valid for value '
          'of size 19420'),
      lambda: _unretrieved_future_failure_record(
          'OUT_OF_RANGE: Requested byte range is not valid'))
  for record in (storage_failure, other_failure):
    assert 'Future exception was never retrieved' in record.getMessage()
  assert storage_failure.levelno == py_logging.DEBUG
  assert other_failure.levelno == py_logging.ERROR


def _unraisable_from_abandoned_coroutine(filename):
  """What `sys.unraisablehook` receives when a coroutine compiled as if it
  lived in `filename`, suspended in an await, is garbage collected and
  raises while closing (orbax's read coroutines of a damaged checkpoint)."""
  code = compile(
      'class Pending:\n'
      '  def __await__(self):\n'
      '    yield\n'
      'async def read_array_index():\n'
      '  try:\n'
      '    await Pending()\n'
      '  finally:\n'
      '    raise Exception("Encountered error while reading array index")\n',
      filename, 'exec')
  namespace = {}
  exec(code, namespace)  # pylint: disable=exec-used
  passed_on, debug_records = [], []
  asyncio_logger = py_logging.getLogger('asyncio')
  collect = py_logging.Handler()
  collect.emit = debug_records.append
  asyncio_logger.addHandler(collect)
  level = asyncio_logger.level
  asyncio_logger.setLevel(py_logging.DEBUG)
  saved_hook = sys.unraisablehook
  sys.unraisablehook = console.OrbaxUnraisableAsDebug(
      lambda unraisable: passed_on.append(repr(unraisable.object)))
  try:
    coroutine = namespace['read_array_index']()
    coroutine.send(None)
    del coroutine
    gc.collect()
  finally:
    sys.unraisablehook = saved_hook
    asyncio_logger.setLevel(level)
    asyncio_logger.removeHandler(collect)
  return passed_on, debug_records


def test_orbax_abandoned_coroutines_are_logged_as_debug():
  passed_on, records = _unraisable_from_abandoned_coroutine(
      '/venv/site-packages/orbax/checkpoint/_src/serialization/'
      'serialization.py')
  assert passed_on == []
  (record,) = records
  assert record.levelno == py_logging.DEBUG
  assert 'Exception ignored in: <coroutine object' in record.getMessage()
  assert record.exc_info[1].args == (
      'Encountered error while reading array index',)
  # another library's goes on to the hook that was there before
  passed_on, records = _unraisable_from_abandoned_coroutine(
      '/venv/site-packages/somelib/io.py')
  assert records == [] and len(passed_on) == 1
  assert 'read_array_index' in passed_on[0]


def test_setup_lowers_orbax_task_failures_once(fresh_state):
  logger = py_logging.getLogger('test_console.once')
  logger.propagate = False
  handler = py_logging.StreamHandler(io.StringIO())
  asyncio_logger = py_logging.getLogger('asyncio')
  before = list(asyncio_logger.filters)
  saved_hook = sys.unraisablehook
  try:
    for _ in range(2):
      console.setup(0, handler=handler, logger=logger,
                    quiet_dataset_builds=False)
    added = [f for f in asyncio_logger.filters if f not in before]
    assert len([f for f in asyncio_logger.filters if isinstance(
        f, console.OrbaxTaskFailuresAsDebug)]) == 1
    assert isinstance(sys.unraisablehook, console.OrbaxUnraisableAsDebug)
    assert not isinstance(sys.unraisablehook.previous,
                          console.OrbaxUnraisableAsDebug)
  finally:
    sys.unraisablehook = saved_hook
    for f in added:
      asyncio_logger.removeFilter(f)
    for h in list(logger.handlers):
      logger.removeHandler(h)
      h.close()


def test_setup_console_and_log_file(tmp_path, fresh_state):
  logger = py_logging.getLogger('test_console.setup')
  logger.propagate, logger.level = False, py_logging.DEBUG
  stream = io.StringIO()
  handler = py_logging.StreamHandler(stream)
  logger.addHandler(handler)
  console.setup(0, handler=handler, logger=logger,
                quiet_dataset_builds=False)
  try:
    logger.handle(_record(py_logging.INFO, ORBAX_FILE, 'early orbax line'))
    logger.handle(_record(py_logging.INFO, PROJECT_FILE, 'early project'))
    path = str(tmp_path / 'log.txt')
    file_handler = console.log_to_file(path, logger)
    logger.handle(_record(py_logging.INFO, ORBAX_FILE, 'orbax saving'))
    logger.handle(_record(py_logging.WARNING, ORBAX_FILE, 'orbax warning'))
    logger.handle(_record(py_logging.INFO, PROJECT_FILE,
                          'warmup: step 2/4'))
    # flushed record by record: readable before the handler is closed
    lines = open(path).read().splitlines()
    assert [line.split('] ', 1)[1] for line in lines] == [
        'early orbax line', 'early project', 'orbax saving', 'orbax warning',
        'warmup: step 2/4']
    assert re.match(r'I\d{4} [\d:.]+ +\d+ checkpoint_manager\.py:7\] ',
                    lines[0])
    shown = stream.getvalue().splitlines()
    assert len(shown) == 3
    assert re.fullmatch(r'\d\d:\d\d:\d\d early project', shown[0])
    assert re.fullmatch(r'\d\d:\d\d:\d\d WARNING checkpoint_manager\.py:7\] '
                        r'orbax warning', shown[1])
    assert shown[2].endswith(' warmup: step 2/4')
    logger.removeHandler(file_handler)
    file_handler.close()
    # a rerun appends
    file_handler = console.log_to_file(path, logger)
    logger.handle(_record(py_logging.INFO, ORBAX_FILE, 'second run'))
    assert open(path).read().splitlines()[5].endswith('] second run')
  finally:
    for h in list(logger.handlers):
      logger.removeHandler(h)
      h.close()


def test_verbose_console_keeps_everything_and_absl_format(fresh_state):
  logger = py_logging.getLogger('test_console.verbose')
  logger.propagate, logger.level = False, py_logging.DEBUG
  stream = io.StringIO()
  handler = py_logging.StreamHandler(stream)
  handler.setFormatter(logging.PythonFormatter())
  logger.addHandler(handler)
  console.setup(1, handler=handler, logger=logger, quiet_dataset_builds=False)
  try:
    logger.handle(_record(py_logging.INFO, ORBAX_FILE, 'orbax saving'))
    assert re.match(r'I\d{4} .* checkpoint_manager\.py:7\] orbax saving',
                    stream.getvalue())
  finally:
    for h in list(logger.handlers):
      logger.removeHandler(h)
      h.close()


def test_native_log_level_before_tensorflow():
  env = {}
  console.quiet_native_logs(['main', '--workdir=w'], env)
  assert env == {'TF_CPP_MIN_LOG_LEVEL': '1', 'TF_ENABLE_ONEDNN_OPTS': '0'}
  env = {'TF_CPP_MIN_LOG_LEVEL': '0'}           # the user's own setting
  console.quiet_native_logs(['main'], env)
  assert env == {'TF_CPP_MIN_LOG_LEVEL': '0', 'TF_ENABLE_ONEDNN_OPTS': '0'}
  for argv in (['m', '--verbosity=1'], ['m', '-v', '2'], ['m', '--v=1'],
               ['m', '--verbosity', '1']):
    env = {}
    console.quiet_native_logs(argv, env)
    assert env == {}, argv
  assert console.verbosity_from_argv(['m', '--verbosity=x']) == 0


def test_tensorflow_import_is_silent_after_quiet_native_logs():
  """What every process of a run (and each grain worker) does first."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('TF_CPP_MIN_LOG_LEVEL', 'TF_ENABLE_ONEDNN_OPTS')}
  result = subprocess.run(
      [sys.executable, '-c', 'import sys; from spcl_jax.infra import console; '
       'console.quiet_native_logs(sys.argv); import tensorflow'],
      cwd=ROOT, capture_output=True, text=True, check=True, env=env)
  assert result.stderr == ''


class _Clock:

  def __init__(self, step):
    self.now, self.step = 0.0, step

  def __call__(self):
    self.now += self.step
    return self.now


def test_progress_plain_lines(caplog, fresh_state):
  console.set_stage('pseudo_labels')
  with caplog.at_level(py_logging.INFO):
    out = list(console.progress(range(10), 'target_train', 10,
                                count=lambda _: 4, every_s=3.0,
                                stream=io.StringIO(), clock=_Clock(1.0)))
  assert out == list(range(10))
  lines = [r.getMessage() for r in caplog.records]
  assert lines[0] == 'pseudo_labels: target_train 3/10 batches, 4.0 ' \
                     'images/s, ETA 7s'
  assert len(lines) == 4     # 3/10, 6/10, 9/10 and the end
  assert lines[-1] == 'pseudo_labels: target_train 40 images in 11s ' \
                      '(3.6 images/s)'


def test_progress_names_its_items(caplog, fresh_state):
  console.set_stage('self_training')
  with caplog.at_level(py_logging.INFO):
    list(console.progress(['a.png', 'b.png', 'c.png'], 'predict', 3,
                          unit='files', items='files', every_s=1.5,
                          stream=io.StringIO(), clock=_Clock(1.0)))
  assert [r.getMessage() for r in caplog.records] == [
      'self_training: predict 2/3 files, 1.0 files/s, ETA 1s',
      'self_training: predict 3 files in 4s (0.8 files/s)']


def test_progress_bar_on_a_terminal(caplog, fresh_state):

  class Terminal(io.StringIO):

    def isatty(self):
      return True

  console.set_stage('')
  terminal = Terminal()
  with caplog.at_level(py_logging.INFO):
    list(console.progress(range(5), 'target_val', 5, stream=terminal,
                          clock=_Clock(1.0)))
  drawn = terminal.getvalue()
  assert '\rtarget_val [####################] 5/5' in drawn
  assert drawn.endswith('\r\x1b[K')
  assert [r.getMessage() for r in caplog.records] == [
      'target_val 5 images in 6s (0.8 images/s)']


def test_train_progress_line(caplog):
  progress = console.TrainProgress('spcl', 4, 304, 16, clock=_Clock(2.0))
  progress.step_done(5)   # the window starts once the first step is done
  for step in (6, 7, 8):
    progress.step_done(step)
  with caplog.at_level(py_logging.INFO):
    scalars = progress.log(8, {'loss': 7.5, 'seg_loss': 1.5, 'lr': 0.01,
                               'contrastive_source': 2.9, 'grad_norm': 3.0})
  assert scalars['spcl/images_per_sec'] == pytest.approx(3 * 16 / 2.0)
  assert scalars['spcl/grad_norm'] == 3.0
  assert caplog.records[-1].getMessage() == (
      'spcl: step 8/304  loss 7.5  contrastive_source 2.9  seg_loss 1.5  '
      'lr 0.01  24.0 images/s  ETA 3m17s')
  assert console.duration(3725) == '1h02m'


def test_durations_round_to_whole_units_and_a_fraction_is_not_zero():
  assert console.duration(0) == '0s'
  assert console.duration(0.2) == '<1s'   # an ETA of 0.2 s is not 'done'
  assert console.duration(0.99) == '<1s'
  assert console.duration(1.4) == '1s'
  assert console.duration(59.4) == '59s'
  assert console.duration(59.6) == '1m00s'
  assert console.duration(3599.6) == '1h00m'
  assert console.duration(-3) == '0s'


class _Times:
  """A clock that returns the given times in turn."""

  def __init__(self, *times):
    self.times = list(times)

  def __call__(self):
    return self.times.pop(0)


def test_train_progress_leaves_compile_time_out_of_images_per_sec(caplog):
  # step 1 takes 100 s (compiling), steps 2-4 one second each
  progress = console.TrainProgress('warmup', 0, 10, 8,
                                   clock=_Times(100.0, 103.0, 105.0))
  progress.step_done(1)                       # t = 100
  for step in (2, 3, 4):
    progress.step_done(step)
  with caplog.at_level(py_logging.INFO):
    first = progress.log(4, {'loss': 1.0})    # t = 103
    second = progress.log(6, {'loss': 1.0})   # t = 105
  assert first['warmup/images_per_sec'] == pytest.approx(3 * 8 / 3.0)
  assert second['warmup/images_per_sec'] == pytest.approx(2 * 8 / 2.0)
  lines = [r.getMessage() for r in caplog.records]
  assert lines[0] == 'warmup: step 4/10  loss 1  8.0 images/s  ETA 6s'
  assert lines[1] == 'warmup: step 6/10  loss 1  8.0 images/s  ETA 4s'


def test_train_progress_slow_steps_show_their_rate_and_time(caplog):
  # a full-size step on a CPU: 2 images in 99 s
  progress = console.TrainProgress('warmup', 0, 10, 2,
                                   clock=_Times(100.0, 298.0))
  progress.step_done(1)
  with caplog.at_level(py_logging.INFO):
    scalars = progress.log(3, {'loss': 1.0})
  assert scalars['warmup/images_per_sec'] == pytest.approx(4 / 198)
  assert [r.getMessage() for r in caplog.records] == [
      'warmup: step 3/10  loss 1  0.02 images/s (1m39s a step)  ETA 11m33s']


def test_train_progress_last_line_has_no_eta(caplog):
  progress = console.TrainProgress('spcl', 0, 4, 2,
                                   clock=_Times(10.0, 12.0, 13.0))
  progress.step_done(1)
  with caplog.at_level(py_logging.INFO):
    progress.log(2, {'loss': 1.0})
    progress.log(4, {'loss': 0.5})
  assert [r.getMessage() for r in caplog.records] == [
      'spcl: step 2/4  loss 1  1.0 images/s  ETA 4s',
      'spcl: step 4/4  loss 0.5  4.0 images/s']


def test_train_progress_first_step_alone_has_no_rate(caplog):
  progress = console.TrainProgress('warmup', 0, 10, 8,
                                   clock=_Times(100.0, 100.5, 101.5))
  progress.step_done(1)
  with caplog.at_level(py_logging.INFO):
    first = progress.log(1, {'loss': 2.0})     # only the compiling step
    progress.step_done(2)
    second = progress.log(2, {'loss': 1.0})
  assert 'warmup/images_per_sec' not in first
  assert second['warmup/images_per_sec'] == pytest.approx(8 / 1.0)
  assert [r.getMessage() for r in caplog.records] == [
      'warmup: step 1/10  loss 2  (first step: compiling)',
      'warmup: step 2/10  loss 1  8.0 images/s  ETA 8s']


_LOG_LINE = re.compile(r'[IWEF]\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\] (.*)')


@pytest.mark.slow
def test_smoke_run_console_is_calm(smoke_reference):
  """The shared smoke run's console: under 200 lines, every INFO line the
  project's; its log.txt has the third-party lines."""
  workdir, result = smoke_reference
  assert result.returncode == 0, result.stderr[-4000:]
  shown = result.stderr.splitlines()
  assert len(shown) < 200, len(shown)
  for marker in ('orbax', 'Load dataset info', 'Setting work unit notes',
                 '[Hyperparameters]', 'logging_writer.py'):
    assert marker not in result.stderr, marker
  project_files = {name for d in ('spcl_jax', 'data_prep', 'configs')
                   for _, _, names in os.walk(os.path.join(ROOT, d))
                   for name in names if name.endswith('.py')}
  logged = {}
  with open(os.path.join(workdir, 'log.txt')) as f:
    for line in f:
      match = _LOG_LINE.match(line.rstrip('\n'))
      if match:
        logged.setdefault(match.group(2), set()).add(match.group(1))
  assert any('Saving checkpoint at step' in m for m in logged)   # orbax
  info = [m.group(1) for m in map(
      re.compile(r'\d\d:\d\d:\d\d (?!WARNING |ERROR )(.*)').fullmatch, shown)
          if m]
  assert any('warmup: step 4/4' in line for line in info)
  # the pseudo-label stage's two passes over target_train say which is which
  for stage in ('pseudo_labels', 'pseudo_labels_2'):
    for purpose in ('confidences', 'labels'):
      assert any(line.startswith(f'{stage}: target_train {purpose} ')
                 for line in info), (stage, purpose)
  for message in info:
    assert logged.get(message, set()) & project_files, message
