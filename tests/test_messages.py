"""Messages (issue 10, defect 7): what a user reads when a run cannot go
on. A workdir `config.json` that is not JSON, a bad `--config` (a misspelt
field, a missing file, an unknown variant), a corrupt pseudo-label shard
and a missing dataset each end in one `error:` line naming the file, field
or dataset and what to do; the closed-event-loop reports of an aborted
TensorStore read go to DIR/log.txt only. Units on the functions that say
it (fast), the command's stderr in subprocesses (before anything is
compiled), and one rerun of the pseudo-label stage as the message tells
(slow: copies the shared smoke run's stages)."""

import asyncio
import io
import logging as py_logging
import os
import re
import shutil
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest

from configs import demo
from spcl_jax.data import pseudo_labels as pseudo_labels_lib
from spcl_jax.data import sources
from spcl_jax.infra import console
from spcl_jax.infra import flag_errors
from spcl_jax.infra import workdir as workdir_lib
from spcl_jax.run import config_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, 'configs', 'demo.py')
# TensorFlow's and XLA's native lines (printed at import, whatever
# TF_CPP_MIN_LOG_LEVEL says in TensorFlow 2.21), not the command's
_NATIVE_LINE = re.compile(r'[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\] |WARNING: All '
                          r'log messages before absl::InitializeLog')


def _main(workdir, *flag_args, config='configs/demo.py:smoke'):
  return subprocess.run(
      [sys.executable, '-m', 'spcl_jax.main', f'--config={config}',
       f'--workdir={workdir}', *flag_args],
      cwd=ROOT, capture_output=True, text=True, check=False,
      env={**os.environ, 'XLA_FLAGS': ''})


def _command_lines(stderr: str) -> list:
  return [line for line in stderr.splitlines()
          if line.strip() and not _NATIVE_LINE.match(line)]


def _expect_one_error_line(result, *texts, lines_before=1) -> str:
  """Exit status 1 and, of the command's own lines, one `error:` line last
  (with its indented continuation, such as a build command; at most
  `lines_before` lines before it: the process line, a stage's start),
  holding `texts`; no traceback."""
  assert result.returncode == 1, (result.returncode, result.stderr[-6000:])
  assert 'Traceback' not in result.stderr, result.stderr[-6000:]
  lines = _command_lines(result.stderr)
  while lines and lines[-1].startswith('  ') and len(lines) > 1:
    lines[-2:] = ['\n'.join(lines[-2:])]
  errors = [line for line in lines if line.startswith('error: ')]
  assert len(errors) == 1 and lines[-1] == errors[0], lines
  assert len(lines) <= 1 + lines_before, lines
  for text in texts:
    assert text in errors[0], (text, errors[0])
  return errors[0]


# ------------------------------------------------ a. config.json not JSON --

@pytest.mark.parametrize('content, problem', [
    ('{"seed": 0,', 'is not JSON (Expecting property name'),
    ('\xff\xfe', 'is not JSON ('),
    ('[1, 2]', 'holds a list, not a JSON object')])
def test_workdir_config_that_is_not_json_names_the_file(tmp_path, content,
                                                        problem):
  path = tmp_path / 'config.json'
  path.write_bytes(content.encode('latin-1'))
  with pytest.raises(config_checks.ConfigMismatchError) as e:
    config_checks.check_workdir_config(demo.get_config('smoke'),
                                       str(tmp_path), False)
  message = str(e.value)
  assert message.startswith(f'{path} {problem}'), message
  assert 'delete it to resume with the current config' in message
  assert '--workdir' in message
  assert path.read_bytes() == content.encode('latin-1')   # left as it was


def test_command_with_a_config_json_that_is_not_json(tmp_path):
  (tmp_path / 'config.json').write_text('{"seed": 0,')
  _expect_one_error_line(
      _main(tmp_path, f'--config.data.data_dir={tmp_path / "data"}'),
      f'error: {tmp_path / "config.json"} is not JSON', 'delete it')
  assert not (tmp_path / 'tensorboard').exists()


# ---------------------------------------------- b, d. a bad --config flag --

def _parse(argv):
  """flag_errors.parse_flags on `argv` with a config flag of its own:
  (exit status, stderr)."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config file[:args]',
                                  flag_values=flag_values, lock_config=True,
                                  sys_argv=list(argv))
  stderr = io.StringIO()
  saved, sys.stderr = sys.stderr, stderr
  try:
    flag_errors.parse_flags(argv, flag_values=flag_values)
  except SystemExit as e:
    return e.code, stderr.getvalue()
  finally:
    sys.stderr = saved
  return 0, stderr.getvalue()


@pytest.mark.parametrize('args, expected', [
    (['--config.stages.spcl.temprature=1'],
     "error: --config.stages.spcl.temprature=1: config.stages.spcl has no "
     "field 'temprature'; did you mean 'temperature'?"),
    (['--config.stagez.spcl.temperature', '1'],
     "error: --config.stagez.spcl.temperature=1: config has no field "
     "'stagez'; did you mean 'stages'?"),
    (['--config.stages.warmup.steps=many'],
     "error: --config.stages.warmup.steps=many: invalid literal for int() "
     "with base 10: 'many'"),
    (['--nosuchflag=1'], "error: Unknown command line flag 'nosuchflag'")])
def test_misspelt_or_mistyped_field_is_one_line(args, expected):
  status, stderr = _parse(['main', f'--config={DEMO_CONFIG}:smoke', *args])
  assert status == 1
  assert stderr == expected + '\n'


def test_unknown_variant_lists_the_variants():
  status, stderr = _parse(['main', f'--config={DEMO_CONFIG}:nosuchcfg'])
  assert status == 1
  assert stderr.startswith(
      f"error: --config={DEMO_CONFIG}:nosuchcfg: unknown config argument "
      "'nosuchcfg'; expected stage names ['warmup',"), stderr
  assert "variants ['class_balanced', 'mit', 'oracle'," in stderr
  assert stderr.count('\n') == 1


@pytest.mark.parametrize('overrides', [[], ['--config.data.data_dir=x']])
def test_missing_config_file_is_one_line(tmp_path, overrides):
  missing = str(tmp_path / 'nosuch.py')
  status, stderr = _parse(['main', f'--config={missing}:smoke', *overrides])
  assert status == 1
  assert stderr == (f'error: --config={missing}:smoke: no config file '
                    f'{missing} (a relative path starts at {os.getcwd()})\n')


def test_error_in_a_config_file_says_where(tmp_path):
  config = tmp_path / 'broken.py'
  config.write_text('def get_config(arg=None):\n  return 1 + "x"\n')
  status, stderr = _parse(['main', f'--config={config}'])
  assert status == 1
  assert stderr == (f"error: --config={config}: TypeError: unsupported "
                    "operand type(s) for +: 'int' and 'str' "
                    f"({config}, line 2)\n")


def test_verbose_parse_error_prints_the_traceback_too():
  status, stderr = _parse(['main', f'--config={DEMO_CONFIG}:smoke',
                           '--config.stages.spcl.temprature=1',
                           '--verbosity=1'])
  assert status == 1
  assert 'Traceback' in stderr
  assert stderr.splitlines()[-1].startswith(
      'error: --config.stages.spcl.temprature=1: ')


@pytest.mark.parametrize('config, args, texts', [
    ('configs/demo.py:smoke', ['--config.stages.spcl.temprature=1'],
     ["config.stages.spcl has no field 'temprature'",
      "did you mean 'temperature'?"]),
    ('configs/nosuch.py:smoke', [],
     ['error: --config=configs/nosuch.py:smoke: no config file '
      'configs/nosuch.py']),
    ('configs/demo.py:nosuchcfg', [],
     ["unknown config argument 'nosuchcfg'", "'smoke', 'source_only']"])])
def test_command_with_a_bad_config_flag_prints_one_line(tmp_path, config,
                                                        args, texts):
  """Refused while the flags are parsed: no traceback, nothing written or
  built."""
  data_dir = tmp_path / 'data'
  data_dir.mkdir()
  _expect_one_error_line(
      _main(tmp_path / 'w', f'--config.data.data_dir={data_dir}', *args,
            config=config), *texts)
  assert sorted(os.listdir(tmp_path)) == ['data']
  assert not os.listdir(data_dir)


@pytest.mark.parametrize('module, args', [
    ('spcl_jax.pretrain', ['--config=configs/demo_pretrain.py',
                           '--output={tmp}/out']),
    ('benchmarks.memory', ['--config=configs/gta5.py']),
])
def test_other_commands_print_a_misspelt_config_field_in_one_line(
    tmp_path, module, args):
  """The pretraining command and the benchmarks that read a config parse
  it as spcl_jax.main does (flag_errors.parse_flags)."""
  result = subprocess.run(
      [sys.executable, '-m', module,
       *[arg.format(tmp=tmp_path) for arg in args], '--config.seedd=1'],
      cwd=ROOT, capture_output=True, text=True, check=False,
      env={**os.environ, 'XLA_FLAGS': ''})
  _expect_one_error_line(result, "config has no field 'seedd'",
                         "did you mean 'seed'?", lines_before=0)
  assert not os.listdir(tmp_path)


# ------------------------------------------------- c. corrupt shards --

def _write_labels(stage_dir, count=3):
  labels = {f'img_{i}': np.full((4, 6), i, np.uint8) for i in range(count)}
  with pseudo_labels_lib.PseudoLabelWriter(str(stage_dir / 'labels')) as writer:
    for image_id, label in labels.items():
      writer.add(image_id, label)
  return stage_dir / 'labels' / 'pseudo_labels-00000-of-00001'


def _assert_names_shard_and_rerun(message, stage_dir, name):
  assert f'pseudo-label shard {stage_dir / "labels" / name} cannot be read' in (
      message), message
  assert (f'delete {stage_dir / "done.json"} and rerun with stage '
          f"'{stage_dir.name}' among the stages to run") in message, message


@pytest.mark.parametrize('corrupt', ['truncate', 'empty', 'zeros'])
def test_damaged_shard_is_refused_when_the_store_opens(tmp_path, corrupt):
  stage_dir = tmp_path / 'pseudo_labels'
  shard = str(_write_labels(stage_dir)) + '.array_record'
  size = os.path.getsize(shard)
  with open(shard, 'r+b') as f:
    if corrupt == 'truncate':
      f.truncate(size // 2)
    elif corrupt == 'empty':
      f.truncate(0)
    else:
      f.write(b'\0' * size)
  with pytest.raises(pseudo_labels_lib.CorruptPseudoLabelsError) as e:
    pseudo_labels_lib.PseudoLabelStore(str(stage_dir / 'labels'))
  _assert_names_shard_and_rerun(str(e.value), stage_dir,
                                os.path.basename(shard))


def test_shard_index_that_is_not_json_is_named(tmp_path):
  stage_dir = tmp_path / 'pseudo_labels_2'
  index = str(_write_labels(stage_dir)) + '.json'
  with open(index, 'w') as f:
    f.write('{"image_ids": [')
  with pytest.raises(pseudo_labels_lib.CorruptPseudoLabelsError) as e:
    pseudo_labels_lib.PseudoLabelStore(str(stage_dir / 'labels'))
  _assert_names_shard_and_rerun(str(e.value), stage_dir,
                                os.path.basename(index))
  assert 'not a shard index' in str(e.value)


def test_damaged_record_is_named_when_read(tmp_path):
  """A record damaged inside the file (its count still right) fails when it
  is read, naming the shard, the record and the image."""
  stage_dir = tmp_path / 'pseudo_labels'
  shard = str(_write_labels(stage_dir, count=40)) + '.array_record'
  store = pseudo_labels_lib.PseudoLabelStore(str(stage_dir / 'labels'))
  with open(shard, 'r+b') as f:   # the records' chunks lie in its start
    for offset in range(200, 6000, 300):
      f.seek(offset)
      f.write(b'\xff' * 40)
  failures = []
  for image_id in store.image_ids():
    try:
      store[image_id]
    except pseudo_labels_lib.CorruptPseudoLabelsError as e:
      failures.append(str(e))
  assert failures
  _assert_names_shard_and_rerun(failures[0], stage_dir,
                                os.path.basename(shard))
  assert re.search(r'\(record \d+ \(img_\d+\): ', failures[0]), failures[0]


@pytest.fixture
def reference(smoke_reference):
  workdir, result = smoke_reference
  assert result.returncode == 0, result.stderr[-6000:]
  return workdir


@pytest.mark.slow
def test_corrupt_shard_then_rerun_as_the_message_says(tiny_demo, reference,
                                                      tmp_path):
  """The SPCL stage on a truncated shard of the pseudo-label stage: one
  line naming the shard and the done.json to delete; deleting it and
  rerunning with the pseudo-label stage makes the labels again and
  finishes the SPCL stage."""
  for name in ('warmup', 'prototypes', 'pseudo_labels'):
    shutil.copytree(reference / name, tmp_path / name)
  shutil.copy(reference / 'config.json', tmp_path / 'config.json')
  shard = (tmp_path / 'pseudo_labels' / 'labels' /
           'pseudo_labels-00000-of-00001.array_record')
  with open(shard, 'r+b') as f:
    f.truncate(os.path.getsize(shard) // 2)
  data = f'--config.data.data_dir={tiny_demo}'
  line = _expect_one_error_line(
      _main(tmp_path, data, config='configs/demo.py:smoke,spcl'),
      lines_before=2)   # 'process 0 of 1 ...', 'spcl: starting'
  _assert_names_shard_and_rerun(line, tmp_path / 'pseudo_labels', shard.name)
  assert not (tmp_path / 'spcl' / 'done.json').exists()
  os.remove(tmp_path / 'pseudo_labels' / 'done.json')
  rerun = _main(tmp_path, data,
                config='configs/demo.py:smoke,pseudo_labels,spcl')
  assert rerun.returncode == 0, rerun.stderr[-6000:]
  assert (tmp_path / 'spcl' / 'done.json').exists()
  assert pseudo_labels_lib.PseudoLabelStore(str(shard.parent)).image_ids() == (
      pseudo_labels_lib.PseudoLabelStore(str(reference / 'pseudo_labels' /
                                             'labels')).image_ids())


# ------------------------------------------- d, e. datasets, before writes --

def _smoke(data_dir, **data):
  config = demo.get_config('smoke')
  config.data.data_dir = str(data_dir)
  config.data.update(data)
  return config


def test_missing_dataset_is_refused_with_its_build_command(tmp_path):
  config = _smoke(tmp_path, source='gta5')
  with pytest.raises(sources.DatasetNotBuiltError) as e:
    config_checks.check_datasets(config, str(tmp_path / 'w'))
  assert f"dataset 'gta5' is not built in {tmp_path}" in str(e.value)
  assert 'python -m data_prep.build --dataset gta5' in str(e.value)
  assert not os.listdir(tmp_path)   # the demo target is not built first


def test_unknown_demo_config_is_refused_before_a_build(tmp_path):
  config = _smoke(tmp_path, target='sim2real_demo/nosuchcfg')
  with pytest.raises(ValueError) as e:
    config_checks.check_datasets(config, str(tmp_path / 'w'))
  assert str(e.value) == (
      "data.target = 'sim2real_demo/nosuchcfg': dataset 'sim2real_demo' has "
      "no config 'nosuchcfg'; its configs: ['default', 'tiny']")
  assert not os.listdir(tmp_path)


def test_missing_split_is_refused_built_or_not(tiny_demo, tmp_path):
  with pytest.raises(ValueError, match=re.escape(
      "data.val_split = 'nosplit': dataset 'sim2real_demo/tiny' "
      "(data.target, built by this run) has no such split; it has "
      "['source_train', 'source_val', 'target_train', 'target_val']")):
    config_checks.check_datasets(_smoke(tmp_path, val_split='nosplit'),
                                 str(tmp_path / 'w'))
  with pytest.raises(ValueError, match=re.escape(
      f"(data.target, in {tiny_demo}")):
    config_checks.check_datasets(_smoke(tiny_demo, val_split='nosplit'),
                                 str(tmp_path / 'w'))
  config_checks.check_datasets(_smoke(tiny_demo), str(tmp_path / 'w'))


def test_only_the_splits_of_unfinished_stages_to_run_are_needed(tmp_path):
  config = _smoke(tmp_path, source='gta5')
  config.stages_to_run = ('pseudo_labels',)   # reads the target alone
  config_checks.check_datasets(config, str(tmp_path / 'w'))
  config.stages_to_run = ('prototypes', 'pseudo_labels')
  with pytest.raises(sources.DatasetNotBuiltError):
    config_checks.check_datasets(config, str(tmp_path / 'w'))
  (tmp_path / 'w' / 'prototypes').mkdir(parents=True)
  (tmp_path / 'w' / 'prototypes' / 'done.json').write_text('{}')
  config_checks.check_datasets(config, str(tmp_path / 'w'))
  assert config_checks.datasets_read(_smoke(tmp_path)) == [
      ('source', 'source_split'), ('target', 'target_split'),
      ('target', 'val_split')]


def test_command_with_a_missing_dataset_stops_before_writing(tmp_path):
  data_dir = tmp_path / 'data'
  data_dir.mkdir()
  _expect_one_error_line(
      _main(tmp_path / 'w', f'--config.data.data_dir={data_dir}',
            '--config.data.source=gta5'),
      f"error: dataset 'gta5' is not built in {data_dir}")
  # before the demo target's build, the model's set-up and any write but
  # the log
  assert not os.listdir(data_dir)
  assert os.listdir(tmp_path / 'w') == ['log.txt']


# ------------------------------------- f. the closed event loop's reports --

def _closed_loop_report(hook):
  """A real TensorStore read finishing after the event loop awaiting it
  was closed, with `hook` as sys.unraisablehook."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  promise, future = ts.Promise.new()
  loop = asyncio.new_event_loop()
  saved_hook, sys.unraisablehook = sys.unraisablehook, hook
  try:
    asyncio.set_event_loop(loop)
    future.__await__()   # TensorStore's callback will call the loop
    loop.close()
    promise.set_result(1)   # the callback runs: "Event loop is closed"
  finally:
    sys.unraisablehook = saved_hook
    asyncio.set_event_loop(None)


def _debug_records():
  records = []
  handler = py_logging.Handler()
  handler.emit = records.append
  return records, handler


def test_closed_event_loop_report_goes_to_the_log_only():
  records, handler = _debug_records()
  asyncio_logger = py_logging.getLogger('asyncio')
  level = asyncio_logger.level
  asyncio_logger.addHandler(handler)
  asyncio_logger.setLevel(py_logging.DEBUG)
  passed_on, raw = [], []
  try:
    _closed_loop_report(raw.append)   # what Python would print
    _closed_loop_report(console.OrbaxUnraisableAsDebug(passed_on.append))
  finally:
    asyncio_logger.setLevel(level)
    asyncio_logger.removeHandler(handler)
  (unraisable,) = raw
  assert unraisable.object is None
  assert str(unraisable.exc_value) == 'Event loop is closed'
  assert console.is_closed_loop_callback(unraisable)
  assert passed_on == []
  assert all(r.levelno == py_logging.DEBUG for r in records)
  (record,) = [r for r in records if r.exc_info]   # not 'Using selector'
  assert 'TensorStore read finished after its event loop was closed' in (
      record.getMessage())
  assert str(record.exc_info[1]) == 'Event loop is closed'
  assert not console.ConsoleFilter(0).filter(record)


_CLOSED_LOOP_COMMAND = """
import asyncio, sys
from absl import app
import tensorstore as ts
from spcl_jax.infra import console

def main(_):
  console.setup(0, quiet_dataset_builds=False)
  console.log_to_file(sys.argv[1])
  promise, future = ts.Promise.new()
  loop = asyncio.new_event_loop()
  asyncio.set_event_loop(loop)
  future.__await__()
  loop.close()
  promise.set_result(1)
  print('finished', file=sys.stderr)

app.run(main)
"""


def test_closed_event_loop_report_under_the_console_of_a_run(tmp_path):
  """As in a run at verbosity 0 (main.py's console and log file): the
  report is off stderr and in the log file."""
  log = tmp_path / 'log.txt'
  result = subprocess.run(
      [sys.executable, '-c', _CLOSED_LOOP_COMMAND, str(log)], cwd=ROOT,
      capture_output=True, text=True, check=False, timeout=120)
  assert result.returncode == 0, result.stderr
  assert _command_lines(result.stderr) == ['finished'], result.stderr
  logged = log.read_text()
  assert 'TensorStore read finished after its event loop was closed' in (
      logged)
  assert 'RuntimeError: Event loop is closed' in logged


class _Unraisable:   # the fields of sys.UnraisableHookArgs
  def __init__(self, exc_value, obj=None):
    self.exc_type, self.exc_value = type(exc_value), exc_value
    self.exc_traceback, self.object = exc_value.__traceback__, obj
    self.err_msg = None


def _raised_in_asyncio(function):
  """What `function` raises, its traceback cut to the frames in asyncio
  (as TensorStore's callback, called from native code, has)."""
  try:
    function()
  except Exception as e:  # pylint: disable=broad-except
    traceback = e.__traceback__
    while traceback is not None and os.path.join('asyncio', '') not in (
        traceback.tb_frame.f_code.co_filename):
      traceback = traceback.tb_next
    return e.with_traceback(traceback)
  raise AssertionError('nothing raised')


def test_other_unraisable_reports_still_reach_the_console():
  """Only the exact closed-loop report is lowered: the same error raised
  outside asyncio or without frames, another asyncio error, or one with an
  object goes on to the hook that was there before."""
  closed, other = asyncio.new_event_loop(), asyncio.new_event_loop()
  closed.close()
  noise = _raised_in_asyncio(lambda: closed.call_soon_threadsafe(print))
  assert console.is_closed_loop_callback(_Unraisable(noise))

  def ours():
    raise RuntimeError('Event loop is closed')

  try:
    not_awaitable = _raised_in_asyncio(lambda: other.run_until_complete(1))
  finally:
    other.close()
  try:
    ours()
  except RuntimeError as e:
    outside = e
  others = [_Unraisable(outside),
            _Unraisable(not_awaitable),
            _Unraisable(noise, obj=print),
            _Unraisable(RuntimeError('Event loop is closed'))]   # no frames
  passed_on = []
  hook = console.OrbaxUnraisableAsDebug(passed_on.append)
  for unraisable in others:
    assert not console.is_closed_loop_callback(unraisable)
    hook(unraisable)
  assert passed_on == others


def test_a_damaged_json_file_of_the_workdir_is_named(tmp_path):
  path = tmp_path / 'done.json'
  path.write_text('{"miou": 1.0')
  with pytest.raises(ValueError, match=f'{path} is not JSON'):
    workdir_lib.read_json(str(path))
