"""A `gs://` data directory (issue 10): datasets already built are read
from a bucket; nothing is ever built into one, and a workdir stays local.

Against a fake GCS on this machine (tests/fake_gcs.py), started for this
module: the tiny demo data built locally and copied up; the smoke pipeline
reading it equals the one reading the local copy (slow); a dataset missing
from the bucket is refused with the folder looked in (a URL, never a local
`<cwd>/gs:/...`) and how to build it locally and copy it up, before
anything is written."""

import json
import os
import subprocess
import sys

import pytest

from configs import demo
from spcl_jax.data import sources
from spcl_jax.run import config_checks
from tests.test_messages import _expect_one_error_line

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
BUCKET = 'spcl-tests'


@pytest.fixture(scope='module')
def gcs_env(fake_gcs_server):
  """The environment of the session's fake GCS (set in this process while
  the module's tests run; pass it to subprocesses), with the bucket."""
  with fake_gcs_server.environment_with_bucket(BUCKET) as env:
    yield env


def _upload(local_dir: str, url: str) -> None:
  """Copies the files under `local_dir` to the same names under `url`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for folder, _, files in os.walk(local_dir):
    for name in files:
      path = os.path.join(folder, name)
      tf.io.gfile.copy(path, f'{url}/{os.path.relpath(path, local_dir)}')


@pytest.fixture(scope='module')
def gcs_data_dir(gcs_env, tiny_demo):
  """The tiny demo data, built locally (`tiny_demo`) and copied up."""
  del gcs_env   # started, and its environment set
  url = f'gs://{BUCKET}/tfds'
  _upload(tiny_demo, url)
  return url


def _main(workdir, data_dir, env, *flags):
  return subprocess.run(
      [sys.executable, '-m', 'spcl_jax.main', '--config=configs/demo.py:smoke',
       f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *flags],
      cwd=ROOT, capture_output=True, text=True, check=False,
      env={**os.environ, 'XLA_FLAGS': '', **env})


def _smoke(data_dir, **data):
  config = demo.get_config('smoke')
  config.data.data_dir = data_dir
  config.data.update(data)
  return config


def _stages(workdir) -> dict:
  with open(os.path.join(workdir, 'report.json'), encoding='utf-8') as f:
    return json.load(f)['stages']


# ------------------------------------------------------------------ units --

def test_a_url_is_kept_and_a_local_path_expanded(monkeypatch):
  monkeypatch.setenv('HOME', '/home/someone')
  assert sources.data_dir_path('~/tfds') == '/home/someone/tfds'
  assert sources.data_dir_path('gs://b/~/tfds') == 'gs://b/~/tfds'


def test_dataset_directory_in_a_bucket_is_a_url(gcs_data_dir, monkeypatch):
  absolute = []
  real_abspath = os.path.abspath
  monkeypatch.setattr(os.path, 'abspath',
                      lambda p: absolute.append(p) or real_abspath(p))
  directory = sources.dataset_directory('sim2real_demo/tiny', gcs_data_dir + '/')
  assert directory == f'{gcs_data_dir}/sim2real_demo/tiny/2.0.0'
  assert not [p for p in absolute if '://' in str(p)], absolute
  source = sources.open_source('sim2real_demo/tiny', 'target_val', gcs_data_dir)
  assert len(source) == 16 and source[0]['image'].shape == (64, 128, 3)


def test_dataset_missing_from_a_bucket_names_the_url(gcs_env, tmp_path,
                                                     monkeypatch):
  del gcs_env
  monkeypatch.chdir(tmp_path)   # where abspath would have made `gs:`
  empty = f'gs://{BUCKET}/empty'
  with pytest.raises(sources.DatasetNotBuiltError) as e:
    config_checks.check_datasets(_smoke(empty, source='gta5'),
                                 str(tmp_path / 'w'))
  message = str(e.value)
  assert message.startswith(f"dataset 'gta5' is not built in {empty} "
                            f'(looked in {empty}/gta5); build it with:')
  assert ('python -m data_prep.build --dataset gta5 --data_dir LOCAL_DIR '
          f'--manual_dir DOWNLOAD_DIR && gsutil -m cp -r LOCAL_DIR/gta5 '
          f'{empty}/') in message
  assert 'gs:/' not in message.replace('gs://', '')
  assert not os.listdir(tmp_path)


def test_demo_missing_from_a_bucket_is_not_built_there(gcs_env, tmp_path):
  """A run builds the demo data when it is missing, but not into a bucket
  (array_record writes local files): one error line, before any write."""
  empty = f'gs://{BUCKET}/empty'
  result = _main(tmp_path / 'w', empty, gcs_env)
  _expect_one_error_line(
      result,
      f"error: data.data_dir = '{empty}': dataset 'sim2real_demo/tiny' is "
      'not built there, and a run builds it into a local data_dir only; '
      'build it into a local data_dir and copy it up: python -m '
      'data_prep.build --dataset sim2real_demo --config tiny --data_dir '
      f'LOCAL_DIR && gsutil -m cp -r LOCAL_DIR/sim2real_demo {empty}/')
  assert os.listdir(tmp_path / 'w') == ['log.txt']
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  assert not tf.io.gfile.exists(empty)


def test_evaluate_refuses_a_remote_data_dir_it_cannot_read(tmp_path):
  """Checked before the workdir is read (none exists here)."""
  from spcl_jax import evaluate  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r'^--data_dir=s3://b/tfds: the only '
                     'remote storage supported is gs://'):
    evaluate.evaluate(str(tmp_path / 'nowhere'), data_dir='s3://b/tfds')


def test_data_prep_refuses_to_build_into_a_bucket(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'data_prep.build', '--dataset=sim2real_demo/tiny',
       '--data_dir=gs://bucket/tfds'],
      cwd=tmp_path, capture_output=True, text=True, check=False,
      env={**os.environ, 'PYTHONPATH': ROOT})
  assert result.returncode == 1, result.stderr[-3000:]
  assert ('--data_dir=gs://bucket/tfds: a build writes local files only '
          '(ArrayRecord); build into a local --data_dir and copy it up: '
          'gsutil -m cp -r LOCAL_DIR/sim2real_demo gs://bucket/tfds/'
          ) in result.stderr, result.stderr[-3000:]
  assert not os.listdir(tmp_path)   # no folder `gs:`


# --------------------------------------------------------------- pipeline --

@pytest.mark.slow
def test_smoke_pipeline_reading_a_bucket_equals_reading_a_local_copy(
    gcs_env, gcs_data_dir, smoke_workdir, tmp_path):
  """Every number of every stage's report (mIoUs, thresholds, losses)
  equals the shared local run's: the same records, the same programs."""
  result = _main(tmp_path, gcs_data_dir, gcs_env)
  assert result.returncode == 0, result.stderr[-6000:]
  assert 'building sim2real_demo' not in result.stderr   # nothing built
  ours, theirs = _stages(tmp_path), _stages(smoke_workdir)
  assert list(ours) == list(theirs)
  for name in ours:
    assert ours[name] == theirs[name], name
