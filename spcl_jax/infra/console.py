"""What a run prints, and its full log in DIR/log.txt.

By default (`--verbosity=0`) the console shows this project's log lines
(stage starts and results, one line per training log interval, the
progress of long passes) and every warning and error, each line prefixed
with the time only; other libraries' INFO lines (orbax's ~50 per checkpoint,
TFDS, grain, clu's metric writer, jax) and TensorFlow's native INFO lines
(the oneDNN banner of every grain worker) are hidden. `--verbosity=1` (or
more) shows everything in absl's format. Either way every Python log
record, third-party INFO included, is appended to DIR/log.txt
(`log_to_file`), one flushed line at a time, so that a crash keeps what
came before it.

  console.quiet_native_logs(sys.argv)   # in main.py, before TensorFlow loads
  console.setup(verbosity)              # once flags are parsed
  console.log_to_file(path)             # once the process index is known
"""

import asyncio
import logging as py_logging
from logging import handlers as py_handlers
import os
import sys
import tempfile
import time
import traceback as py_traceback
from typing import Callable, Iterable, Iterator, Sequence

from absl import logging

from spcl_jax.infra import storage

# spcl_jax/, the package this module (spcl_jax/infra/console.py) is in
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROOT = os.path.dirname(_PACKAGE_DIR)
# Log records whose source file is under one of these are the project's.
PROJECT_DIRS = tuple(os.path.join(d, '') for d in (
    _PACKAGE_DIR, os.path.join(_ROOT, 'data_prep'),
    os.path.join(_ROOT, 'configs')))

_state = {'verbosity': 0, 'stage': '', 'buffer': None}


# ------------------------------------------------------------ native logs --

def verbosity_from_argv(argv: Sequence[str]) -> int:
  """absl's --verbosity (-v) as given on the command line, 0 if absent or
  unreadable (flags are not parsed yet when TensorFlow must be told)."""
  value = '0'
  args = list(argv[1:])
  for i, arg in enumerate(args):
    for name in ('--verbosity', '-verbosity', '--v', '-v'):
      if arg == name and i + 1 < len(args):
        value = args[i + 1]
      elif arg.startswith(name + '='):
        value = arg[len(name) + 1:]
  try:
    return int(value)
  except ValueError:
    return 0


def quiet_native_logs(argv: Sequence[str], environ=None) -> None:
  """Hides TensorFlow's and XLA's native INFO lines (warnings and errors
  stay) unless --verbosity >= 1 or the variables are set already: TF's log
  level, and TF's oneDNN ops off (TensorFlow 2.21 prints its oneDNN banner
  whatever the level; here TF only writes summaries, no numbers change).
  Call it before TensorFlow is imported: grain's worker processes inherit
  the environment, and each would print the banner."""
  environ = os.environ if environ is None else environ
  if verbosity_from_argv(argv) < 1:
    environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
    environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')


# ---------------------------------------------------------------- console --

def is_project_record(record: py_logging.LogRecord) -> bool:
  path = os.path.abspath(record.pathname or '')
  return path.startswith(PROJECT_DIRS)


# A record logged with `extra={FILE_ONLY: True}` goes to the log file only
# (what the console shows another way, e.g. `report_error`'s line).
FILE_ONLY = 'spcl_file_only'


class ConsoleFilter(py_logging.Filter):
  """Passes warnings, errors and the project's INFO records; other
  libraries' INFO and every DEBUG record (the project's are the reports it
  lowers, `OrbaxUnraisableAsDebug`) only at verbosity >= 1."""

  def __init__(self, verbosity: int):
    super().__init__()
    self.verbosity = verbosity

  def filter(self, record: py_logging.LogRecord) -> bool:
    if getattr(record, FILE_ONLY, False):
      return False
    if self.verbosity >= 1:
      return True
    return record.levelno >= py_logging.WARNING or (
        record.levelno >= py_logging.INFO and is_project_record(record))


_ORBAX_DIR = os.path.join(os.sep, 'orbax', '')
# TensorStore's wording when it fails to read orbax's checkpoint storage.
_CHECKPOINT_STORAGE = 'OCDBT database'


def _traceback_under_orbax(traceback) -> bool:
  while traceback is not None:
    if _ORBAX_DIR in traceback.tb_frame.f_code.co_filename:
      return True
    traceback = traceback.tb_next
  return False


def is_orbax_read_failure(exception: BaseException | None) -> bool:
  """An exception raised inside orbax's code, or TensorStore's error for a
  damaged file of orbax's checkpoint storage (set on a future by native
  code: no Python frame to look at)."""
  return exception is not None and (
      _traceback_under_orbax(exception.__traceback__)
      or _CHECKPOINT_STORAGE in str(exception))


def is_orbax_task_failure(record: py_logging.LogRecord) -> bool:
  """asyncio's report of an orbax read or write whose exception no one
  awaited ("Task exception was never retrieved", "Future exception was
  never retrieved", "unhandled exception during asyncio.run() shutdown",
  ...): the task's repr in the message lies under an `orbax` folder, or the
  exception is an orbax read failure (`is_orbax_read_failure`)."""
  if record.name != 'asyncio':
    return False
  if _ORBAX_DIR in str(record.msg):
    return True
  exception = record.exc_info[1] if record.exc_info else None
  return is_orbax_read_failure(exception) or _traceback_under_orbax(
      record.exc_info[2] if record.exc_info else None)


class OrbaxTaskFailuresAsDebug(py_logging.Filter):
  """On the `asyncio` logger: lowers orbax's unawaited task failures to
  DEBUG. Orbax reads a checkpoint's arrays in concurrent tasks; when a file
  is damaged several fail, the first failure propagates (the pipeline names
  the checkpoint in one warning, or stops with it) and, depending on
  timing, the others reach asyncio's handler as ERRORs with a TensorStore
  spec of a hundred lines each — repeats of an error already reported. As
  DEBUG records they stay in DIR/log.txt and off the console at verbosity
  0, whichever handler would print them (at interpreter exit, logging's
  last-resort handler prints WARNING and above)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno > py_logging.DEBUG and is_orbax_task_failure(record):
      record.levelno, record.levelname = py_logging.DEBUG, 'DEBUG'
    return True


_ASYNCIO_DIR = os.path.join(os.path.dirname(asyncio.__file__), '')


def is_closed_loop_callback(unraisable) -> bool:
  """TensorStore's report of a read that finished after the event loop
  awaiting it was closed (orbax abandons the other reads of a damaged
  checkpoint and closes its loop): the read's done callback calls
  `loop.call_soon_threadsafe`, which raises "Event loop is closed", and
  TensorStore hands that to `sys.unraisablehook` with no object; every
  frame of its traceback is asyncio's."""
  frames = py_traceback.extract_tb(unraisable.exc_traceback)
  return (unraisable.object is None
          and unraisable.exc_type is RuntimeError
          and str(unraisable.exc_value) == 'Event loop is closed'
          and bool(frames)
          and all(f.filename.startswith(_ASYNCIO_DIR) for f in frames))


class OrbaxUnraisableAsDebug:
  """A `sys.unraisablehook` for the other paths of the same repeats, which
  Python prints straight to stderr: an orbax read coroutine abandoned while
  it awaited a failing read raises again when it is garbage collected
  ("Exception ignored in: <coroutine ...>"), and a TensorStore read that
  finishes after orbax closed its event loop reports "RuntimeError: Event
  loop is closed" (`is_closed_loop_callback`). When the coroutine's code,
  or the exception, is orbax's, or the report is that closed-loop one, it
  becomes a DEBUG record on the `asyncio` logger (DIR/log.txt); anything
  else goes to the hook that was installed before."""

  def __init__(self, previous: Callable):
    self.previous = previous

  def __call__(self, unraisable) -> None:
    code = getattr(unraisable.object, 'cr_code', None)
    if is_closed_loop_callback(unraisable):
      message = ('a TensorStore read finished after its event loop was '
                 'closed (a read orbax abandoned)')
    elif ((code is not None and _ORBAX_DIR in code.co_filename)
          or is_orbax_read_failure(unraisable.exc_value)):
      message = f'Exception ignored in: {unraisable.object!r}'
    else:
      self.previous(unraisable)
      return
    # handled whatever the loggers' levels (INFO at verbosity 0), so that
    # the log file keeps it; the console filter drops DEBUG records
    logger = py_logging.getLogger('asyncio')
    logger.handle(logger.makeRecord(
        logger.name, py_logging.DEBUG, __file__, 0, '%s', (message,),
        (unraisable.exc_type, unraisable.exc_value,
         unraisable.exc_traceback)))


class ConsoleFormatter(py_logging.Formatter):
  """`HH:MM:SS message`; warnings and errors also name their level and
  source line."""

  def __init__(self):
    super().__init__('%(asctime)s %(message)s', '%H:%M:%S')

  def formatMessage(self, record: py_logging.LogRecord) -> str:
    line = super().formatMessage(record)
    if record.levelno >= py_logging.WARNING:
      stamp, _, message = line.partition(' ')
      line = (f'{stamp} {record.levelname} {record.filename}:'
              f'{record.lineno}] {message}')
    return line


def setup(verbosity: int, handler: py_logging.Handler | None = None,
          logger: py_logging.Logger | None = None,
          quiet_dataset_builds: bool | None = None) -> None:
  """The console filter and format on `handler` (absl's stderr handler),
  orbax's repeated read failures lowered to DEBUG (OrbaxTaskFailuresAsDebug,
  OrbaxUnraisableAsDebug),
  and a buffer on `logger` (the root logger) that keeps every record until
  `log_to_file` names the file. TFDS progress bars are turned off when
  stderr is not a terminal (`quiet_dataset_builds`; they would print their
  escape codes as lines)."""
  _state['verbosity'] = verbosity
  asyncio_logger = py_logging.getLogger('asyncio')
  if not any(isinstance(f, OrbaxTaskFailuresAsDebug)
             for f in asyncio_logger.filters):
    asyncio_logger.addFilter(OrbaxTaskFailuresAsDebug())
  if not isinstance(sys.unraisablehook, OrbaxUnraisableAsDebug):
    sys.unraisablehook = OrbaxUnraisableAsDebug(sys.unraisablehook)
  handler = handler or logging.get_absl_handler()
  handler.addFilter(ConsoleFilter(verbosity))
  if verbosity < 1:
    handler.setFormatter(ConsoleFormatter())
  logger = logger or py_logging.getLogger()
  buffer = py_handlers.MemoryHandler(capacity=100_000,
                                     flushLevel=py_logging.CRITICAL + 1)
  logger.addHandler(buffer)
  _state['buffer'] = (buffer, logger)
  if quiet_dataset_builds is None:
    quiet_dataset_builds = not _isatty(sys.stderr)
  if quiet_dataset_builds:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()


def report_error(message: str, stream=None) -> None:
  """An error that ends a command: one `error: <message>` line on stderr
  (the form every command uses), and the message, as an ERROR record, in
  the log file only (not a second time on the console)."""
  logging.error('%s', message, extra={FILE_ONLY: True})
  print(f'error: {message}', file=stream or sys.stderr, flush=True)


def log_file_name(process_index: int) -> str:
  return 'log.txt' if process_index == 0 else (
      f'log.process_{process_index}.txt')


class UploadedLogHandler(py_logging.FileHandler):
  """The log file of a `gs://` workdir. A bucket cannot append to an
  object, so the records are appended to a local copy (of what the bucket
  held before, if anything), which is uploaded whole: after a warning or
  an error, at most `upload_every_s` seconds after a record, and when the
  handler closes (at exit). A process killed outright (SIGKILL) loses
  the records since the last upload."""

  def __init__(self, url: str, upload_every_s: float = 30.0):
    self.url = url
    self.upload_every_s = upload_every_s
    fd, local = tempfile.mkstemp(prefix='spcl_jax-log-', suffix='.txt')
    with os.fdopen(fd, 'wb') as f:
      if storage.exists(url):
        f.write(storage.read_bytes(url))
    super().__init__(local, mode='a', encoding='utf-8')
    self._uploaded_at = time.monotonic()
    self._uploading = False

  def emit(self, record: py_logging.LogRecord) -> None:
    super().emit(record)
    if not self._uploading and (
        record.levelno >= py_logging.WARNING or
        time.monotonic() - self._uploaded_at >= self.upload_every_s):
      self.upload()

  def upload(self) -> None:
    """Uploads the local copy now (a failure is reported on stderr; the
    next upload sends everything again)."""
    self._uploading = True   # the storage layer may log
    try:
      self.flush()
      storage.copy_file(self.baseFilename, self.url)
    except Exception as e:  # pylint: disable=broad-exception-caught
      print(f'warning: cannot upload the log to {self.url}: {e}',
            file=sys.stderr, flush=True)
    finally:
      self._uploaded_at = time.monotonic()
      self._uploading = False

  def close(self) -> None:
    local = self.baseFilename
    try:
      if self.stream is not None:
        self.upload()
    finally:
      super().close()
      if os.path.exists(local):
        os.remove(local)


def log_to_file(path: str, logger: py_logging.Logger | None = None
                ) -> py_logging.Handler:
  """Appends every record of `logger` (default: the root logger, which
  every library's records reach) to `path` in absl's format, flushed
  record by record; the records buffered since `setup` go first. A `gs://`
  path: `UploadedLogHandler`."""
  logger = logger or py_logging.getLogger()
  if storage.is_remote(path):
    handler = UploadedLogHandler(path)
  else:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = py_logging.FileHandler(path, mode='a', encoding='utf-8')
  handler.setFormatter(logging.PythonFormatter())
  buffered = _state['buffer']
  if buffered is not None:
    buffer, buffer_logger = buffered
    buffer_logger.removeHandler(buffer)
    for record in buffer.buffer:
      handler.handle(record)
    buffer.buffer.clear()
    buffer.close()
    _state['buffer'] = None
  logger.addHandler(handler)
  return handler


# --------------------------------------------------------------- progress --

def set_stage(name: str) -> None:
  """The stage that progress lines name."""
  _state['stage'] = name


def _isatty(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


def rate_text(images_per_sec: float, seconds_per_step: float) -> str:
  """'8.0 images/s'; under one image a second, two significant digits and
  the time a step takes ('0.02 images/s (1m39s a step)'), not '0.0'."""
  if images_per_sec >= 1:
    return f'{images_per_sec:.1f} images/s'
  return (f'{images_per_sec:.2g} images/s '
          f'({duration(seconds_per_step)} a step)')


def duration(seconds: float) -> str:
  """'<1s', '42s', '3m05s', '1h02m' (0 only for no time at all: an ETA
  of a fraction of a second is not 'done')."""
  if 0 < seconds < 1:
    return '<1s'
  seconds = int(round(max(seconds, 0)))
  if seconds < 60:
    return f'{seconds}s'
  if seconds < 3600:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


def _prefix() -> str:
  return f'{_state["stage"]}: ' if _state['stage'] else ''


def progress(iterable: Iterable, what: str, total: int,
             count: Callable[[object], int] = lambda _: 1,
             unit: str = 'images', every_s: float = 30.0,
             stream=None, clock: Callable[[], float] = time.monotonic,
             items: str = 'batches') -> Iterator:
  """Yields `iterable`'s `total` items (`items`: what they are, in the plain
  lines). On a terminal (at verbosity 0) a bar redrawn in place; otherwise a
  plain line every `every_s` seconds. When the pass ends, one logged line:
  how many `unit` (the sum of `count(item)`) in how long. An item's work
  (what the loop does with it) is timed with it."""
  stream = stream or sys.stderr
  bar = _isatty(stream) and _state['verbosity'] < 1
  start = last_line = last_draw = clock()
  done = units = 0
  label = f'{_prefix()}{what}'
  for item in iterable:
    yield item
    done += 1
    units += count(item)
    now = clock()
    elapsed = now - start
    eta = elapsed / done * max(total - done, 0)
    rate = f'{units / max(elapsed, 1e-9):.1f} {unit}/s'
    if bar and (now - last_draw >= 0.2 or done == total):
      filled = int(20 * done / max(total, 1))
      stream.write(f'\r{label} [{"#" * filled}{"." * (20 - filled)}] '
                   f'{done}/{total}  {rate}  ETA {duration(eta)}\033[K')
      stream.flush()
      last_draw = now
    elif not bar and now - last_line >= every_s and done < total:
      logging.info('%s %d/%d %s, %s, ETA %s', label, done, total, items,
                   rate, duration(eta))
      last_line = now
  if bar:
    stream.write('\r\033[K')
    stream.flush()
  elapsed = clock() - start
  logging.info('%s %d %s in %s (%.1f %s/s)', label, units, unit,
               duration(elapsed), units / max(elapsed, 1e-9), unit)


class TrainProgress:
  """One console line per log interval of a training stage: step/total,
  the main losses, images/s and the stage's ETA, from the interval's
  averaged metrics.

  images/s and the ETA are steady-state: the first step a run makes
  (compiling the step function, and on a resume restoring the state) is left
  out of the first interval's window (`step_done` marks its end). An interval
  of that first step alone has no rate: its line and scalars have no
  images/s and its line no ETA; the stage's last line has no ETA."""

  def __init__(self, stage: str, step: int, total: int,
               images_per_step: int, clock: Callable[[], float] = time.time):
    self.stage, self.total = stage, total
    self.images_per_step = images_per_step
    self.clock = clock
    self.window_start, self.window_first = None, step

  def step_done(self, step: int) -> None:
    """Called once the run's first step has finished (compiled, and on a
    resume restored): starts the timing window. Later calls do nothing."""
    if self.window_start is None:
      self.window_start, self.window_first = self.clock(), step

  def log(self, step: int, metrics: dict) -> dict:
    """Logs the interval ending at `step`; returns its scalars for the
    metric writer (`<stage>/<name>`, with `<stage>/images_per_sec` when the
    interval has a steady-state rate)."""
    now = self.clock()
    scalars = {f'{self.stage}/{k}': float(v) for k, v in metrics.items()}
    losses = sorted((k for k in metrics if k != 'loss' and (
        'loss' in k or k.startswith('contrastive'))))
    parts = [f'{k} {float(metrics[k]):.4g}' for k in ['loss'] * (
        'loss' in metrics) + losses]
    if 'lr' in metrics:
      parts.append(f'lr {float(metrics["lr"]):.3g}')
    if self.window_start is not None and step > self.window_first:
      seconds = max(now - self.window_start, 1e-9)
      steps = step - self.window_first
      images_per_sec = steps * self.images_per_step / seconds
      scalars[f'{self.stage}/images_per_sec'] = images_per_sec
      rate = rate_text(images_per_sec, seconds / steps)
      if step < self.total:   # the last line: nothing left to wait for
        rate += f'  ETA {duration(seconds / steps * (self.total - step))}'
      parts.append(rate)
    else:
      parts.append('(first step: compiling)')
    logging.info('%s: step %d/%d  %s', self.stage, step, self.total,
                 '  '.join(parts))
    self.window_start, self.window_first = now, step
    return scalars
