"""A `gs://` workdir (issue 10): every write of a run goes to the bucket
through spcl_jax.infra.storage, and a run there resumes like a local one.

Against the session's fake GCS (tests/fake_gcs.py). The units run each
file operation on a local folder and on a bucket alike; the slow test runs
the smoke pipeline in a bucket, killed after a stage's model and preempted
in the last stage, and ends with the local run's numbers."""

import json
import os
import re
import subprocess
import sys
import uuid

import jax
import numpy as np
import pytest

from spcl_jax.core import mesh as mesh_lib
from spcl_jax.data import pseudo_labels
from spcl_jax.infra import checkpoint
from spcl_jax.infra import console
from spcl_jax.infra import storage
from spcl_jax.infra import workdir as workdir_lib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
BUCKET = 'spcl-workdirs'


@pytest.fixture(scope='module')
def gcs_env(fake_gcs_server):
  """The environment of the session's fake GCS, set in this process while
  the module's tests run (pass it to subprocesses), with the bucket."""
  with fake_gcs_server.environment_with_bucket(BUCKET) as env:
    yield env


@pytest.fixture(params=['local', 'gs'])
def root(request, tmp_path):
  """An empty folder: a local one, or a fresh prefix of the bucket."""
  if request.param == 'local':
    return str(tmp_path)
  request.getfixturevalue('gcs_env')
  return f'gs://{BUCKET}/{uuid.uuid4().hex[:12]}'


def _bucket_files(url: str) -> list[str]:
  """Every object under `url`, relative to it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return sorted(os.path.relpath(os.path.join(folder, name), url)
                for folder, _, names in tf.io.gfile.walk(url)
                for name in names)


# ------------------------------------------------------------------ units --

def test_a_url_is_kept_and_a_local_path_made_absolute(monkeypatch, tmp_path):
  monkeypatch.setenv('HOME', '/home/someone')
  monkeypatch.chdir(tmp_path)
  assert storage.resolve('gs://b/runs/w/') == 'gs://b/runs/w'
  assert storage.resolve('gs://b/~/w') == 'gs://b/~/w'
  assert storage.resolve('~/w') == '/home/someone/w'
  assert storage.resolve('w/') == str(tmp_path / 'w')
  assert storage.is_remote('gs://b/w') and not storage.is_remote('/gs:/b')


def test_only_gs_urls_are_supported():
  storage.check_supported('--workdir', 'gs://b/w')
  storage.check_supported('--workdir', '/tmp/w')
  with pytest.raises(ValueError, match=r'^--workdir=s3://b/w: the only '
                     'remote storage supported is gs://'):
    storage.check_supported('--workdir', 's3://b/w')


_GHOST_SCRIPT = """
import sys
import spcl_jax
import tensorflow as tf
try:   # TF's GCS file system starts before the run's first gs:// write
  tf.io.gfile.exists('gs://tfds-data/x')   # (as TFDS's lookups start it)
except tf.errors.OpError:
  pass
from spcl_jax.infra import storage
from spcl_jax.infra import workdir
folder = sys.argv[1]
workdir.write_json(folder + '/done.json', {})
storage.rmtree(folder)
print('exists after rmtree:', storage.exists(folder))
"""


@pytest.mark.parametrize('stat_cache_max_age, exists', [(None, False),
                                                        ('5', True)])
def test_a_deleted_folder_is_gone_at_once(gcs_env, stat_cache_max_age,
                                          exists):
  """TensorFlow's GCS stat cache would keep a deleted folder for 5 s
  (the control: the user's own setting is kept); spcl_jax turns it off."""
  env = {**os.environ, **gcs_env, 'XLA_FLAGS': ''}
  env.pop('GCS_STAT_CACHE_MAX_AGE')
  if stat_cache_max_age is not None:
    env['GCS_STAT_CACHE_MAX_AGE'] = stat_cache_max_age
  folder = f'gs://{BUCKET}/ghost/{uuid.uuid4().hex[:12]}'
  result = subprocess.run([sys.executable, '-c', _GHOST_SCRIPT, folder],
                          cwd=ROOT, capture_output=True, text=True,
                          check=False, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'exists after rmtree: {exists}' in result.stdout, result.stdout


def test_environment_defaults_keep_the_users_settings():
  environ = {'GCS_STAT_CACHE_MAX_AGE': '60'}
  assert storage.add_environment_defaults(environ) == {}
  assert environ == {'GCS_STAT_CACHE_MAX_AGE': '60'}
  assert storage.add_environment_defaults({}) == {
      'GCS_STAT_CACHE_MAX_AGE': '0'}


def test_file_operations(root):
  """What a run does to its workdir, on either storage: atomic JSON and
  text writes (no temporary left), reads, listings and deletions."""
  stage = os.path.join(root, 'warmup')
  workdir_lib.write_json(os.path.join(stage, 'done.json'), {'miou': 1.5})
  workdir_lib.write_text(os.path.join(stage, 'table.md'), 'a | b\n')
  workdir_lib.write_json(os.path.join(stage, 'done.json'), {'miou': 2.5})
  assert workdir_lib.read_json(os.path.join(stage, 'done.json')) == {
      'miou': 2.5}
  assert storage.read_text(os.path.join(stage, 'table.md')) == 'a | b\n'
  assert storage.listdir(stage) == ['done.json', 'table.md']
  assert storage.isdir(stage) and storage.isdir(root)
  assert storage.isfile(os.path.join(stage, 'done.json'))
  assert not storage.isdir(os.path.join(stage, 'done.json'))
  assert not storage.exists(os.path.join(root, 'spcl'))
  with pytest.raises(FileNotFoundError):
    storage.listdir(os.path.join(root, 'spcl'))
  storage.remove(os.path.join(stage, 'table.md'))
  assert storage.listdir(stage) == ['done.json']
  storage.rmtree(stage)
  assert not storage.exists(stage)
  storage.rmtree(stage, missing_ok=True)
  with pytest.raises(FileNotFoundError):
    storage.rmtree(stage)


def test_a_damaged_json_file_is_named(root):
  path = os.path.join(root, 'report.json')
  workdir_lib.write_text(path, '{"stages": ')
  with pytest.raises(ValueError, match=f'^{path} is not JSON'):
    workdir_lib.read_json(path)


def test_move_tree(root):
  source = os.path.join(root, 'checkpoints', '4')
  for name, text in [('a.txt', 'A'), ('state/b.txt', 'B'),
                     ('state/d/c.txt', 'C')]:
    workdir_lib.write_text(os.path.join(source, name), text)
  moved = os.path.join(root, 'unreadable_checkpoints', '4')
  storage.move_tree(source, moved)
  assert not storage.exists(source)
  assert storage.read_text(os.path.join(moved, 'state', 'd', 'c.txt')) == 'C'
  assert storage.listdir(moved) == ['a.txt', 'state']


def test_save_tree_replaces_an_earlier_or_unfinished_write(root):
  """A stage's output written again (its rerun after a kill before
  done.json) replaces the earlier one; in a bucket, a folder left without
  orbax's commit file is replaced too."""
  model = os.path.join(root, 'spcl', 'model')
  first = {'w': np.arange(6.0).reshape(2, 3)}
  second = {'w': np.arange(6.0).reshape(2, 3) + 10}
  checkpoint.save_tree(model, first)
  checkpoint.save_tree(model, second)
  np.testing.assert_array_equal(
      checkpoint.load_tree(model, jax.tree.map(np.zeros_like, first))['w'],
      second['w'])
  if storage.is_remote(root):
    assert 'commit_success.txt' in storage.listdir(model)
    storage.remove(os.path.join(model, 'commit_success.txt'))  # unfinished
    checkpoint.save_tree(model, first)
    assert 'commit_success.txt' in storage.listdir(model)
    np.testing.assert_array_equal(
        checkpoint.load_tree(model, jax.tree.map(np.zeros_like, first))['w'],
        first['w'])
  else:
    assert storage.listdir(os.path.dirname(model)) == ['model']


def test_pseudo_labels_written_and_read(root):
  """Shards in a bucket are written locally and uploaded, the index last;
  nothing but the two files is left in the workdir; an aborted shard
  leaves nothing."""
  labels = os.path.join(root, 'pseudo_labels', 'labels')
  maps = {f'img{i}': np.full((4, 6), i, np.uint8) for i in range(3)}
  with pseudo_labels.PseudoLabelWriter(labels, 0, 1) as writer:
    for image_id, label in maps.items():
      writer.add(image_id, label)
  with pytest.raises(RuntimeError):
    with pseudo_labels.PseudoLabelWriter(os.path.join(root, 'other'), 0, 1) as writer:
      writer.add('img0', maps['img0'])
      raise RuntimeError('interrupted')
  assert not storage.exists(os.path.join(root, 'other', 'pseudo_labels-'
                                         '00000-of-00001.json'))
  assert storage.listdir(labels) == ['pseudo_labels-00000-of-00001.'
                                     'array_record',
                                     'pseudo_labels-00000-of-00001.json']
  store = pseudo_labels.PseudoLabelStore(labels)
  assert store.image_ids() == sorted(maps)
  for image_id, label in maps.items():
    np.testing.assert_array_equal(store[image_id], label)


def test_litter_is_removed_from_a_bucket(gcs_env):
  """The temporary names of our local writers, found in a bucket (a
  workdir copied up after a crash), go; a user's file stays."""
  del gcs_env
  workdir = f'gs://{BUCKET}/litter'
  ours = [f'{workdir}/.config.json.tmp-abcd1234',
          f'{workdir}/warmup/.model.writing/_METADATA',
          f'{workdir}/pseudo_labels/labels/.pseudo_labels-00000-of-00001.tmp-'
          'x1y2z3w4/records']
  users = f'{workdir}/warmup/notes.txt'
  for url in [*ours, users]:
    storage.write_object(url, b'x')
  removed = workdir_lib.remove_litter(workdir, ['warmup', 'pseudo_labels'])
  assert removed == sorted(os.path.dirname(u) if '/.model' in u or '.tmp-x'
                           in u else u for u in ours)
  assert _bucket_files(workdir) == ['warmup/notes.txt']


def test_log_in_a_bucket_is_appended_and_uploaded(gcs_env, tmp_path):
  """GCS cannot append: the log is kept locally and uploaded whole after
  a warning, when due and at close; a rerun's log follows the earlier
  run's."""
  del gcs_env
  url = f'gs://{BUCKET}/logs/log.txt'
  storage.write_object(url, b'the earlier run\n')
  logger = console.py_logging.getLogger('test_remote_workdir')
  logger.propagate = False
  logger.setLevel('INFO')
  handler = console.UploadedLogHandler(url, upload_every_s=3600)
  logger.addHandler(handler)
  try:
    logger.info('an info line')
    assert storage.read_text(url) == 'the earlier run\n'   # not due yet
    logger.warning('a warning')
    text = storage.read_text(url)
    assert text.startswith('the earlier run\n')
    assert 'an info line' in text and 'a warning' in text
    logger.info('the last line')
  finally:
    logger.removeHandler(handler)
    handler.close()
  assert storage.read_text(url).endswith('the last line\n')
  assert not os.path.exists(handler.baseFilename)   # the local copy


def test_unreadable_checkpoint_in_a_bucket_is_moved_aside(gcs_env):
  del gcs_env
  stage = f'gs://{BUCKET}/unreadable/spcl'
  mesh = mesh_lib.make_mesh()
  state = {'w': np.arange(4.0), 'step': np.int32(0)}
  checkpoints = checkpoint.StageCheckpoints(f'{stage}/checkpoints', keep=3)
  for step in (2, 4):
    checkpoints.save(step, dict(state, step=np.int32(step)), {})
  checkpoints.wait()
  # the newest one damaged: every data file of its state cut to 10 bytes
  state_dir = f'{stage}/checkpoints/4/state'
  for name in _bucket_files(state_dir):
    if '/d/' in f'/{name}':
      path = f'{state_dir}/{name}'
      storage.write_object(path, storage.read_bytes(path)[:10])
  step, restored = checkpoints.restore_newest_readable(
      checkpoint.abstract_like(state, mesh), {},
      f'{stage}/unreadable_checkpoints')
  checkpoints.close()
  assert step == 2 and int(restored['step']) == 2
  assert storage.listdir(f'{stage}/checkpoints') == ['2']
  assert storage.isdir(f'{stage}/unreadable_checkpoints/4/state')


def test_weights_are_written_locally_and_read_from_a_bucket(
    gcs_env, tmp_path, monkeypatch):
  """Weights are written to a temporary folder and renamed: a bucket is
  refused as their destination, with the copy-up command, before any
  work; a run reading missing weights from a bucket says how to make
  them (a run never pretrains into a bucket)."""
  del gcs_env
  from configs import demo_pretrain  # pylint: disable=g-import-not-at-top
  from spcl_jax.run import pretraining  # pylint: disable=g-import-not-at-top
  from spcl_jax.models import porting  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)   # where abspath would have made `gs:`
  with pytest.raises(ValueError, match=re.escape(
      'gs://b/w: ported or pretrained weights are written to a local '
      'directory; write them there and copy it up: gsutil -m cp -r '
      'LOCAL_DIR/* gs://b/w/')):
    porting.save_ported('gs://b/w', 'resnet18', {}, {})
  missing = f'gs://{BUCKET}/weights/none'
  with pytest.raises(FileNotFoundError, match=re.escape(
      f'{missing} holds no pretrained weights; make them once before '
      'reading them from a bucket: python -m spcl_jax.pretrain '
      '--config=configs/demo_pretrain.py --output=LOCAL_DIR && gsutil -m '
      f'cp -r LOCAL_DIR/* {missing}/')):
    pretraining.ensure_pretrained(missing, demo_pretrain.get_config())
  assert not os.listdir(tmp_path)


# --------------------------------------------------------------- pipeline --

def _main(module, *flags, env):
  return subprocess.run(
      [sys.executable, '-m', module, *flags], cwd=ROOT, capture_output=True,
      text=True, check=False, env={**os.environ, 'XLA_FLAGS': '', **env})


def test_a_missing_bucket_is_refused_before_anything_is_written(gcs_env,
                                                                tiny_demo):
  """One error line at once (a write into it would fail after minutes of
  retries), and nothing written anywhere."""
  from tests.test_messages import _expect_one_error_line  # pylint: disable=g-import-not-at-top
  result = _main('spcl_jax.main', '--config=configs/demo.py:smoke',
                 '--workdir=gs://no-such-bucket/runs/w',
                 f'--config.data.data_dir={tiny_demo}', env=gcs_env)
  _expect_one_error_line(
      result, 'error: --workdir=gs://no-such-bucket/runs/w: the bucket '
      'gs://no-such-bucket does not exist, or these credentials cannot see '
      'it; create it (gsutil mb gs://no-such-bucket) or name another')
  assert not storage.exists('gs://no-such-bucket')
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))


@pytest.mark.slow
def test_smoke_pipeline_in_a_bucket_resumes_to_the_local_result(
    gcs_env, tiny_demo, smoke_workdir, tmp_path):
  """Killed right after spcl's model is written (before its done.json),
  then preempted in self_training, then finished: every stage's report
  equals the local uninterrupted run's; the log holds all three runs; no
  local `gs:` folder; `spcl_jax.evaluate` reads the bucket's model and
  writes its metrics there."""
  workdir = f'gs://{BUCKET}/smoke'
  flags = ['--config=configs/demo.py:smoke', f'--workdir={workdir}',
           f'--config.data.data_dir={tiny_demo}']
  killed = _main('spcl_jax.main', *flags,
                 '--config.testing.crash_after_write=spcl/model', env=gcs_env)
  assert killed.returncode == -9, killed.stderr[-6000:]
  assert storage.exists(f'{workdir}/spcl/model/commit_success.txt')
  assert not storage.exists(f'{workdir}/spcl/done.json')
  preempted = _main('spcl_jax.main', *flags,
                    '--config.testing.sigterm_stage=self_training',
                    '--config.testing.sigterm_at_step=1', env=gcs_env)
  assert preempted.returncode == 75, preempted.stderr[-6000:]
  assert storage.listdir(f'{workdir}/self_training/checkpoints') == ['2']
  finished = _main('spcl_jax.main', *flags, env=gcs_env)
  assert finished.returncode == 0, finished.stderr[-6000:]
  assert 'self_training: resuming from step 2' in finished.stderr
  for result in (killed, preempted, finished):
    assert 'Traceback' not in result.stderr, result.stderr[-6000:]

  ours = workdir_lib.read_json(f'{workdir}/report.json')['stages']
  with open(os.path.join(smoke_workdir, 'report.json'), encoding='utf-8') as f:
    theirs = json.load(f)['stages']
  assert list(ours) == list(theirs)
  for name in ours:
    assert ours[name] == theirs[name], name   # (json: one NaN object)
  log = storage.read_text(f'{workdir}/log.txt')
  assert log.index("testing.crash_after_write='spcl/model': killing") < (
      log.index('preempted')) < log.index('self_training: mIoU')
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))
  for stage in ours:   # the same outputs: no temporary, nothing missing
    assert storage.listdir(f'{workdir}/{stage}') == storage.listdir(
        str(smoke_workdir / stage)), stage

  evaluated = _main('spcl_jax.evaluate', f'--workdir={workdir}', env=gcs_env)
  assert evaluated.returncode == 0, evaluated.stderr[-6000:]
  outputs = storage.listdir(f'{workdir}/self_training/evaluation')
  assert len(outputs) == 1, outputs
  metrics = workdir_lib.read_json(
      f'{workdir}/self_training/evaluation/{outputs[0]}/metrics.json')
  assert metrics['miou'] == ours['self_training']['miou']


@pytest.mark.slow
def test_a_workdir_copied_up_resumes_on_two_processes(gcs_env, tiny_demo,
                                                      smoke_workdir):
  """A pod sharing a bucket: the first four stages of the local run copied
  up (a run moved to a bucket), the last two run on two processes. Each
  process uploads its own pseudo-label shard and log; the report equals
  the one-process run's (within float tolerance: cross-device sums are
  ordered differently)."""
  from tests.run import test_pipeline  # pylint: disable=g-import-not-at-top
  del gcs_env   # set in this process: the two processes inherit it
  workdir = f'gs://{BUCKET}/two_processes'
  copied = ['warmup', 'prototypes', 'pseudo_labels', 'spcl', 'config.json']
  for name in copied:
    local = smoke_workdir / name
    files = ([local] if local.is_file() else
             [p for p in local.rglob('*') if p.is_file()])
    for path in files:
      storage.copy_file(path, f'{workdir}/{path.relative_to(smoke_workdir)}')
  for status, err in test_pipeline._two_processes(workdir, tiny_demo):  # pylint: disable=protected-access
    assert status == 0, err[-4000:]
    assert 'spcl: finished earlier, skipped' in err, err[-4000:]
  assert storage.listdir(f'{workdir}/pseudo_labels_2/labels') == [
      f'pseudo_labels-0000{i}-of-00002.{kind}'
      for i in range(2) for kind in ('array_record', 'json')]
  assert storage.listdir(workdir) == sorted(
      os.listdir(smoke_workdir) + ['log.process_1.txt'])
  ours = workdir_lib.read_json(f'{workdir}/report.json')['stages']
  with open(os.path.join(smoke_workdir, 'report.json'), encoding='utf-8') as f:
    theirs = json.load(f)['stages']
  assert list(ours) == list(theirs)
  for name in ours:
    a, b = test_pipeline._numbers(ours[name]), test_pipeline._numbers(  # pylint: disable=protected-access
        theirs[name])
    assert set(a) == set(b), name
    for key in a:
      assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-3,
                                     nan_ok=True), (name, key)
