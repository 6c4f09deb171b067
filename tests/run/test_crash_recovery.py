"""Crash-proof runs (issue 10): every interruption point resumes to the
uninterrupted result. Unit tests of the checkpoint layer and the workdir
hygiene (fast), and `configs/demo.py:smoke` runs stopped at chosen writes by
the deterministic hooks `testing.sigterm_*` / `testing.crash_after_write`
(slow: one reference run shared by the crash chains)."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spcl_jax.core import mesh as mesh_lib
from spcl_jax.infra import checkpoint
from spcl_jax.infra import workdir as workdir_lib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
KILLED = -9   # subprocess returncode of a SIGKILLed child


# ------------------------------------------------------------------ units --

@struct.dataclass
class _State:
  """A train-state-like pytree (a dataclass, as train_state.TrainState)."""
  w: jax.Array
  b: jax.Array


def _tree(value):
  return _State(w=jnp.full((3, 2), value, jnp.float32),
                b=jnp.arange(4, dtype=jnp.int32) + int(value))


def _abstract(tree):
  return checkpoint.abstract_like(tree, mesh_lib.make_mesh())


def test_save_tree_replaces_an_earlier_write_and_a_crashed_one(tmp_path):
  """Defect 2: a stage's output written before a crash (done.json missing)
  is written again by the rerun instead of failing 'Destination ... already
  exists'."""
  target = tmp_path / 'model'
  checkpoint.save_tree(str(target), _tree(1.0))
  checkpoint.save_tree(str(target), _tree(2.0))   # the rerun's write
  np.testing.assert_array_equal(
      checkpoint.load_tree(str(target), _abstract(_tree(0.0))).w, 2.0)
  # a crash in the middle of the write / of the swap left these behind
  (tmp_path / '.model.writing').mkdir()
  (tmp_path / '.model.writing' / 'junk').write_text('x')
  (tmp_path / '.model.replaced').mkdir()
  checkpoint.save_tree(str(target), _tree(3.0))
  np.testing.assert_array_equal(
      checkpoint.load_tree(str(target), _abstract(_tree(0.0))).w, 3.0)
  assert sorted(os.listdir(tmp_path)) == ['model']


def test_best_step_written_before_a_crash_is_evaluated_again(tmp_path):
  """Defect 3: best/4 written, the process killed before checkpoints/4; the
  rerun resumes from step 2 and offers step 4 again."""
  best = checkpoint.BestCheckpoint(str(tmp_path / 'best'))
  best.offer(4, _tree(1.0), miou=10.0)
  best.close()
  rerun = checkpoint.BestCheckpoint(str(tmp_path / 'best'))
  assert rerun.discard_after(2) == [4]
  rerun.offer(4, _tree(2.0), miou=11.0)
  rerun.offer(4, _tree(3.0), miou=12.0)   # offered twice: replaced
  assert rerun.manager.all_steps() == [4]
  assert rerun.manager.best_step() == 4
  rerun.close()
  restored = checkpoint.load_tree(str(tmp_path / 'best' / '4' / 'state'),
                                  _abstract(_tree(0.0)))
  np.testing.assert_array_equal(restored.w, 3.0)


def _truncate_largest_file(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.truncate(os.path.getsize(largest) // 2)
  return largest


def _delete_metadata(step_dir):
  path = os.path.join(step_dir, 'state', '_METADATA')
  os.remove(path)
  return path


@pytest.mark.parametrize('corrupt', [_truncate_largest_file,
                                     _delete_metadata])
def test_unreadable_newest_checkpoint_falls_back_with_a_warning(
    tmp_path, caplog, corrupt):
  """Defect 6: the newest checkpoint unreadable -> the newest readable one,
  a warning naming the bad step and its path, the bad one moved aside (so
  the resumed run can save that step again)."""
  directory = tmp_path / 'checkpoints'
  saver = checkpoint.StageCheckpoints(str(directory), keep=3)
  for step in (2, 4, 6):
    saver.save(step, _tree(float(step)), {})
  saver.wait()
  saver.close()
  corrupt(str(directory / '6'))
  corrupt(str(directory / '4'))
  aside = tmp_path / 'unreadable_checkpoints'
  rerun = checkpoint.StageCheckpoints(str(directory), keep=3)
  with caplog.at_level(logging.WARNING):
    step, state = rerun.restore_newest_readable(_abstract(_tree(0.0)), {},
                                                str(aside))
  assert step == 2
  np.testing.assert_array_equal(state.w, 2.0)
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
  for bad in (6, 4):
    assert any(f'checkpoint of step {bad} at {directory / str(bad)} is '
               'unreadable' in w and 'resuming from step 2' in w
               for w in warnings), warnings
  assert sorted(os.listdir(aside)) == ['4', '6']
  assert rerun.latest_step() == 2
  rerun.save(4, _tree(4.5), {})   # the resumed run writes step 4 again
  rerun.wait()
  assert rerun.manager.all_steps() == [2, 4]
  rerun.close()


def test_no_readable_checkpoint_is_an_error_naming_each(tmp_path):
  directory = tmp_path / 'checkpoints'
  saver = checkpoint.StageCheckpoints(str(directory), keep=3)
  for step in (2, 4):
    saver.save(step, _tree(float(step)), {})
  saver.wait()
  saver.close()
  _delete_metadata(str(directory / '2'))
  _truncate_largest_file(str(directory / '4'))
  rerun = checkpoint.StageCheckpoints(str(directory), keep=3)
  with pytest.raises(checkpoint.UnreadableCheckpointError) as error:
    rerun.restore_newest_readable(_abstract(_tree(0.0)), {},
                                  str(tmp_path / 'aside'))
  message = str(error.value)
  assert f'no checkpoint in {directory} can be read' in message
  assert f'step 4 at {directory / "4"}:' in message
  assert f'step 2 at {directory / "2"}:' in message
  assert sorted(os.listdir(directory)) == ['2', '4']   # nothing moved
  rerun.close()


def _plant_litter(workdir):
  """Names our writers use while writing, and user files that look alike."""
  ours = ['.tmp-a1b2c3d_', '.report.json.tmp-x9y8z7w6',
          'spcl/.done.json.tmp-qwertyui', 'spcl/.model.writing',
          'spcl/.prototypes.replaced', 'spcl/.table.md.tmp-0a1b2c3d',
          'spcl/.table.csv.tmp-zz99yy88',
          'spcl/model.orbax-checkpoint-tmp-1732900000123456',
          'pseudo_labels/labels/.pseudo_labels-00000-of-00001.tmp-ab_12cd3']
  users = ['notes.tmp-a1b2c3d4', '.tmp-short', 'spcl/my.model.writing',
           'spcl/.notes.md.tmp-0a1b2c3d',
           'pseudo_labels/labels/pseudo_labels-00000-of-00001.tmp-keep',
           'pseudo_labels/.pseudo_labels-00000-of-00001.tmp-abcdefgh']
  for name in ours + users:
    path = workdir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(('.writing', '.replaced')) or 'orbax' in name or (
        'pseudo_labels-' in name):
      path.mkdir()
      (path / 'records').write_text('partial')
    else:
      path.write_text('partial')
  return ours, users


def test_remove_litter_removes_only_our_temporary_names(tmp_path):
  """Defect 9 (workdir): temporaries of a killed run are removed, files of
  the user that merely look alike are kept."""
  ours, users = _plant_litter(tmp_path)
  stages = ['spcl', 'pseudo_labels']
  assert workdir_lib.litter_paths(str(tmp_path), stages) == sorted(
      str(tmp_path / n) for n in ours)
  workdir_lib.remove_litter(str(tmp_path), stages)
  for name in ours:
    assert not (tmp_path / name).exists(), name
  for name in users:
    assert (tmp_path / name).exists(), name


def test_incomplete_tfds_builds_removed_only_once_their_version_is_built(
    tmp_path):
  """Defect 9 (data): TFDS's `incomplete.*` folder of a killed build."""
  (tmp_path / '2.0.0').mkdir()
  (tmp_path / '2.0.0' / 'dataset_info.json').write_text('{}')
  for name in ('incomplete.AB12CD_2.0.0', 'incomplete.ZZ99ZZ_3.0.0',
               'incomplete_notes', 'incomplete.ab12cd_2.0.0'):
    (tmp_path / name).mkdir()
  assert workdir_lib.remove_incomplete_tfds_builds(str(tmp_path)) == [
      str(tmp_path / 'incomplete.AB12CD_2.0.0')]
  assert sorted(os.listdir(tmp_path)) == [
      '2.0.0', 'incomplete.ZZ99ZZ_3.0.0',   # a build of 3.0.0 may be running
      'incomplete.ab12cd_2.0.0', 'incomplete_notes']


# ---------------------------------------------------- end-to-end crashes --

def _main(workdir, data_dir, *flags, config='configs/demo.py:smoke'):
  return subprocess.run(
      [sys.executable, '-m', 'spcl_jax.main', f'--config={config}',
       f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *flags],
      cwd=ROOT, capture_output=True, text=True, check=False,
      env={**os.environ, 'XLA_FLAGS': ''})


# Where a restore of a corrupt checkpoint fails, tensorstore reads of its
# other arrays may finish after orbax closed the event loop that awaited
# them; their callbacks print 'RuntimeError: Event loop is closed' with
# frames in asyncio alone (timing-dependent noise of the aborted read).
_ASYNCIO_FRAME = os.path.join('asyncio', 'base_events.py')


def _tracebacks_of_ours(stderr: str) -> list:
  """The files of traceback frames, other than the closed-event-loop noise
  above (empty when there is no other traceback)."""
  if 'Traceback' not in stderr:
    return []
  frames = re.findall(r'File "([^"]+)", line \d+', stderr)
  others = [f for f in frames if not f.endswith(_ASYNCIO_FRAME)]
  if not frames or 'Event loop is closed' not in stderr:
    return others or ['(a traceback without frames)']
  return others


def _expect(result, status, *texts):
  assert result.returncode == status, (
      f'exit {result.returncode}, expected {status}\n{result.stderr[-6000:]}')
  for text in texts:
    assert text in result.stderr, (text, result.stderr[-6000:])
  assert 'already exists' not in result.stderr, result.stderr[-6000:]
  assert not _tracebacks_of_ours(result.stderr), result.stderr[-6000:]


def test_only_the_closed_event_loop_noise_is_not_a_traceback():
  noise = ('Traceback (most recent call last):\n  File "/usr/lib/python3.11/'
           'asyncio/base_events.py", line 806, in call_soon_threadsafe\n'
           "    self._check_closed()\nRuntimeError: Event loop is closed\n")
  assert _tracebacks_of_ours('all fine\n') == []
  assert _tracebacks_of_ours(noise * 3) == []
  ours = ('Traceback (most recent call last):\n  File "/x/spcl_jax/'
          'pipeline.py", line 9, in run\nValueError: boom\n')
  assert _tracebacks_of_ours(noise + ours) == ['/x/spcl_jax/pipeline.py']
  assert _tracebacks_of_ours('Traceback (most recent call last):\n'
                             'garbled') == ['(a traceback without frames)']


def _copy(reference, workdir, stages):
  for name in stages:
    shutil.copytree(reference / name, workdir / name)
  shutil.copy(reference / 'config.json', workdir / 'config.json')


def _flat_tree(path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_leaves_with_path(
      ocp.StandardCheckpointer().restore(os.path.abspath(path)))
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def _assert_same_outputs(workdir, reference, stage, parts):
  ours = json.loads((workdir / 'report.json').read_text())['stages'][stage]
  theirs = json.loads((reference / 'report.json').read_text())['stages'][
      stage]
  assert ours['steps'] == theirs['steps']
  assert ours['best_step'] == theirs['best_step']
  assert [h['step'] for h in ours['eval_history']] == [
      h['step'] for h in theirs['eval_history']]
  assert ours['miou'] == pytest.approx(theirs['miou'], abs=1e-4)
  for part in parts:
    _assert_trees_close(workdir / stage / part, reference / stage / part)


def _assert_trees_close(path, reference_path):
  ours, theirs = _flat_tree(path), _flat_tree(reference_path)
  assert ours.keys() == theirs.keys()
  for key in ours:
    np.testing.assert_allclose(ours[key], theirs[key], rtol=0, atol=1e-6,
                               err_msg=f'{path}{key}')


@pytest.fixture
def reference(smoke_reference):
  workdir, result = smoke_reference
  _expect(result, 0)
  return workdir


@pytest.mark.slow
def test_preemption_at_the_last_step_resumes(tiny_demo, reference,
                                             tmp_path):
  """Defects 1, 8: SIGTERM at spcl's last step exits 75 (its evaluation
  stops before the first batch, the step is checkpointed); the rerun
  evaluates the step first and is killed after writing its evaluation
  history (best/ is written before it, so the next rerun, which finds the
  step evaluated, still has it); the last exits 0 with the uninterrupted
  outputs. (The crashes at the stage's end, defect 2, are in the
  crash-point sweep below.)"""
  _copy(reference, tmp_path, ['warmup', 'prototypes', 'pseudo_labels'])
  config = 'configs/demo.py:smoke,spcl'
  _expect(_main(tmp_path, tiny_demo, '--config.testing.sigterm_stage=spcl',
                '--config.testing.sigterm_at_step=3', config=config),
          75, 'preempted at step 4 during its evaluation',
          'rerun the same command to resume')
  assert sorted(os.listdir(tmp_path / 'spcl' / 'checkpoints'))[-1] == '4'
  assert not (tmp_path / 'spcl' / 'best' / '4').exists()
  assert not (tmp_path / 'spcl' / 'done.json').exists()
  _expect(_main(tmp_path, tiny_demo,
                '--config.testing.crash_after_write=spcl/eval_history.json',
                config=config),
          KILLED, 'spcl: resuming from step 4')
  _expect(_main(tmp_path, tiny_demo, config=config), 0,
          'spcl: resuming from step 4')
  _assert_same_outputs(tmp_path, reference, 'spcl', ('model', 'prototypes'))
  assert workdir_lib.litter_paths(str(tmp_path), ['spcl']) == []


@pytest.mark.slow
def test_sigterm_during_a_pass_stops_it_between_batches(tiny_demo, reference,
                                                        tmp_path):
  """Defect 5: SIGTERM during the pseudo-label stage's second pass (its
  label shards half open) stops before the next batch with exit 75 and
  nothing of the pass kept; the rerun does the stage again, to the
  uninterrupted result."""
  _copy(reference, tmp_path, ['warmup', 'prototypes'])
  config = 'configs/demo.py:smoke,pseudo_labels'
  # batch 0: the confidence pass's only batch; batch 1: the label pass's
  _expect(_main(tmp_path, tiny_demo,
                '--config.testing.sigterm_stage=pseudo_labels',
                '--config.testing.sigterm_at_step=1', config=config),
          75, 'pseudo_labels preempted during its pass over',
          'rerun the same command to resume')
  stage = tmp_path / 'pseudo_labels'
  assert not (stage / 'done.json').exists()
  assert not any((stage / 'labels').iterdir())   # no shard, no temporary
  assert workdir_lib.litter_paths(str(tmp_path), ['pseudo_labels']) == []
  _expect(_main(tmp_path, tiny_demo, config=config), 0)
  # the same thresholds, coverage and agreement (NaN where a class is absent)
  assert (stage / 'done.json').read_text() == (
      reference / 'pseudo_labels' / 'done.json').read_text()


@pytest.mark.slow
def test_crash_after_best_then_corrupt_newest_checkpoint(tiny_demo, reference,
                                                         tmp_path):
  """Defects 3, 6, 9: killed after best/4 (before checkpoints/4), then after
  checkpoints/4; checkpoints/4 truncated and temporaries planted: the last
  rerun falls back to step 2 with a warning naming step 4, writes best/4
  and checkpoints/4 again, removes the temporaries (not the user's files)
  and ends with the uninterrupted outputs."""
  _copy(reference, tmp_path, ['warmup', 'prototypes', 'pseudo_labels'])
  config = 'configs/demo.py:smoke,spcl'
  _expect(_main(tmp_path, tiny_demo,
                '--config.testing.crash_after_write=spcl/best/4',
                config=config), KILLED)
  assert os.listdir(tmp_path / 'spcl' / 'best') == ['4']
  assert os.listdir(tmp_path / 'spcl' / 'checkpoints') == ['2']
  _expect(_main(tmp_path, tiny_demo,
                '--config.testing.crash_after_write=spcl/checkpoints/4',
                config=config),
          KILLED, 'spcl: resuming from step 2')
  bad = tmp_path / 'spcl' / 'checkpoints' / '4'
  _truncate_largest_file(str(bad))
  ours, users = _plant_litter(tmp_path)
  incomplete = os.path.join(tiny_demo, 'sim2real_demo', 'tiny',
                            'incomplete.QW12ER_2.0.0')
  os.makedirs(incomplete)
  _expect(_main(tmp_path, tiny_demo, config=config), 0,
          f'checkpoint of step 4 at {bad} is unreadable',
          'spcl: resuming from step 2')
  assert os.listdir(tmp_path / 'spcl' / 'unreadable_checkpoints') == ['4']
  _assert_same_outputs(tmp_path, reference, 'spcl', ('model', 'prototypes'))
  for name in ours:
    assert not (tmp_path / name).exists(), name
  for name in users:
    assert (tmp_path / name).exists(), name
  assert not os.path.exists(incomplete)


# The kinds of write a smoke run makes (the crash-point sweep must meet
# each: the names of `testing.crash_after_write`, configs/default.py).
WRITE_KINDS = {'config.json', 'checkpoints', 'best', 'eval_history.json',
               'model', 'prototypes', 'labels', 'table', 'done.json',
               'report.json'}


def _write_kind(point: str) -> str:
  if point.startswith('report.json:'):
    return 'report.json'
  parts = point.split('/')
  return parts[1] if len(parts) > 1 else parts[0]


def _sweep(points):
  """The runs of the crash-point sweep, in order: (flag, value, exit status,
  text the run prints). SIGTERM while the demo data builds and while the
  warm-up model initialises; then for each write point, SIGKILL right after
  it, preceded at a stage's first write by SIGTERM while its step compiles
  (and, in a pseudo-label stage, its label step)."""
  runs = [('sigterm_during', 'build', 75,
           'preempted while building sim2real_demo/tiny'),
          ('sigterm_during', 'warmup/initialise', 75,
           'preempted while initialising the warmup model')]
  started = set()
  for point in points:
    stage = point.split('/')[0] if '/' in point else None
    if stage and stage not in started:
      started.add(stage)
      runs.append(('sigterm_during', f'{stage}/compile', 75,
                   f'preempted while compiling the {stage} '))
      if stage.startswith('pseudo_labels'):
        runs.append(('sigterm_during', f'{stage}/compile_labels', 75,
                     f'preempted while compiling the {stage} label step'))
    runs.append(('crash_after_write', point, KILLED,
                 f'testing.crash_after_write={point!r}: killing this '
                 'process'))
  return runs


@pytest.mark.slow
def test_crash_point_sweep_every_interruption_resumes(reference,
                                                      tmp_path):
  """The crash-point sweep (issue 10): from an empty workdir and data
  directory, each run is stopped at the next interruption point of
  `_sweep` (every write the uninterrupted run made, as its log.txt lists
  them, and the waits that cannot stop between batches) and the next run
  resumes it; the last run ends with every stage's outputs equal to the
  uninterrupted run's and nothing left behind."""
  points = re.findall(r'write point (\S+)',
                      (reference / 'log.txt').read_text())
  assert {_write_kind(p) for p in points} == WRITE_KINDS, points
  assert len(points) == len(set(points)), points   # each write once
  workdir, data_dir = tmp_path / 'run', tmp_path / 'data'
  for flag, value, status, text in _sweep(points):
    _expect(_main(workdir, data_dir, f'--config.testing.{flag}={value}'),
            status, text)
  _expect(_main(workdir, data_dir), 0)
  ours = json.loads((workdir / 'report.json').read_text())['stages']
  theirs = json.loads((reference / 'report.json').read_text())['stages']
  assert list(ours) == list(theirs)
  for stage in ('warmup', 'spcl', 'self_training'):
    _assert_same_outputs(workdir, reference, stage,
                         ('model', 'prototypes') if stage == 'spcl'
                         else ('model',))
  _assert_trees_close(workdir / 'prototypes' / 'prototypes',
                      reference / 'prototypes' / 'prototypes')
  for stage in ('pseudo_labels', 'pseudo_labels_2'):
    assert (workdir / stage / 'done.json').read_text() == (
        reference / stage / 'done.json').read_text()
  assert workdir_lib.litter_paths(str(workdir), list(ours)) == []
  assert workdir_lib.incomplete_tfds_builds(
      str(data_dir / 'sim2real_demo' / 'tiny')) == []
