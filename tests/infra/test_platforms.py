"""libtpu installed for compiling only (requirements-tpu-compile.txt) leaves
ordinary runs as they are: no TPU backend is started on a machine without
a TPU, and nothing new is printed."""

import os
import subprocess
import sys

from spcl_jax.infra import platforms

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _skip(environ, installed=True, present=False):
  return platforms.skip_absent_tpu(environ, lambda: installed,
                                   lambda: present)


def test_cpu_only_where_libtpu_is_installed_and_no_accelerator_shows():
  environ = {}
  assert _skip(environ)
  assert environ == {'JAX_PLATFORMS': 'cpu'}


def test_nothing_changes_without_libtpu_beside_an_accelerator_or_when_set():
  for environ, installed, present in (({}, False, False), ({}, True, True),
                                      ({'JAX_PLATFORMS': ''}, True, False),
                                      ({'JAX_PLATFORMS': 'tpu'}, True, False)):
    before = dict(environ)
    assert not _skip(environ, installed, present)
    assert environ == before


def test_a_cpu_process_prints_nothing_new_and_starts_no_tpu_backend():
  """What `import spcl_jax` leaves a process with, libtpu installed or not
  (CI installs it): the CPU backend alone, no line on stderr, and libtpu's
  library not loaded."""
  code = ('import spcl_jax, jax, os, sys\n'
          'print(jax.default_backend(), len(jax.devices()))\n'
          'maps = open("/proc/self/maps").read()\n'
          'print("libtpu.so" in maps, os.environ.get("JAX_PLATFORMS"))\n')
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  env['XLA_FLAGS'] = ''
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
  backend, libtpu_loaded = result.stdout.splitlines()
  assert backend == 'cpu 1'
  assert result.stderr == ''
  if not platforms.libtpu_installed():
    assert libtpu_loaded == 'False None'
  elif not platforms.accelerator_present():   # CI
    assert libtpu_loaded == 'False cpu'
