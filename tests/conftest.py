"""Test-wide settings: 8 simulated CPU devices (set before JAX is imported),
so that sharded code paths can be compared with single-device ones."""

import os
import subprocess
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # noqa: E402  (after the environment is set)
# torchvision (the parity tests' reference) must be loaded before clu's
# TensorFlow summary writers: in the other order triton's import segfaults.
import torchvision  # noqa: E402,F401  pylint: disable=unused-import


@pytest.fixture(scope='session')
def tiny_demo(tmp_path_factory):
  """The `tiny` sim2real_demo config (64x128; 48 / 24 / 16), built once."""
  from data_prep import builders  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path_factory.mktemp('tfds')
  builders.build('sim2real_demo', str(data_dir), 'tiny')
  return str(data_dir)


@pytest.fixture(scope='session')
def smoke_reference(tiny_demo, tmp_path_factory):
  """(workdir, CompletedProcess) of one uninterrupted `configs/demo.py:smoke`
  pipeline on the tiny data, shared by every test that compares an
  interrupted, resumed or multi-process run with it. Read it, copy from it;
  never write into it."""
  workdir = tmp_path_factory.mktemp('smoke_reference')
  result = subprocess.run(
      [sys.executable, '-m', 'spcl_jax.main', '--config=configs/demo.py:smoke',
       f'--workdir={workdir}', f'--config.data.data_dir={tiny_demo}'],
      cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True,
      text=True, check=False, env={**os.environ, 'XLA_FLAGS': ''})
  return workdir, result
