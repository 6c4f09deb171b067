"""Test-wide settings: 8 simulated CPU devices (set before JAX is imported),
so that sharded code paths can be compared with single-device ones."""

import os

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
