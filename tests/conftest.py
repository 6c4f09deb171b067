"""Test-wide settings: 8 simulated CPU devices (set before JAX is imported),
so that sharded code paths can be compared with single-device ones; and one
persistent XLA compilation cache for the session, shared by this process
and every pipeline it starts as a subprocess (they inherit the variable).

The cache only skips recompiling a program already compiled in this session:
its key is the program's HLO, the compile options, the XLA flags (so the
8-device tests and the 1-device subprocesses never share an entry), the
backend and the jax version, and a hit loads the very executable the
compiler made, so every result is bit-for-bit what a fresh compile gives.
Most of a smoke pipeline's time is compiling: the subprocess runs that
follow the first one (the crash chains, the SIGTERM and resume tests) mostly
reuse its programs. Set JAX_COMPILATION_CACHE_DIR to choose the directory
(kept), or JAX_ENABLE_COMPILATION_CACHE=false to compile everything afresh."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _COMPILATION_CACHE = tempfile.mkdtemp(prefix='spcl_jax_tests_xla_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _COMPILATION_CACHE
  atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)

import pytest  # noqa: E402  (after the environment is set)
# spcl_jax adds its default XLA flags (spcl_jax.xla_flags) on import: before
# any test starts a backend.
import spcl_jax  # noqa: E402,F401  pylint: disable=unused-import
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


@pytest.fixture
def smoke_workdir(smoke_reference):
  """The shared smoke run's workdir, once it is known to have finished."""
  workdir, result = smoke_reference
  if result.returncode != 0:
    raise AssertionError(f'exit {result.returncode}\n{result.stderr[-6000:]}')
  return workdir


@pytest.fixture(scope='session')
def fake_gcs_server():
  """One fake GCS for the session (tests/fake_gcs.py); a module that uses
  it sets `server.env()` for its own tests only (`gcs_env` fixtures)."""
  from tests import fake_gcs  # pylint: disable=g-import-not-at-top
  server = fake_gcs.FakeGCS()
  try:
    yield server
  finally:
    server.stop()
