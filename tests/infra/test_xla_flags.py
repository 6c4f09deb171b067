"""spcl_jax's default XLA flags: added once, never over a user's own."""

import os
import subprocess
import sys

from spcl_jax.infra import xla_flags

FLAG = 'xla_cpu_experimental_ynn_fusion_type'


def test_named_flags_reads_names_with_and_without_values():
  assert xla_flags.named_flags(
      '--xla_force_host_platform_device_count=8  --xla_dump_to=/tmp/x '
      f'--{FLAG}= -xla_cpu_enable_fast_math') == {
          'xla_force_host_platform_device_count', 'xla_dump_to', FLAG,
          'xla_cpu_enable_fast_math'}
  assert xla_flags.named_flags('') == set()


def test_defaults_are_added_after_the_users_flags():
  assert (xla_flags.with_defaults('--xla_force_host_platform_device_count=8')
          == '--xla_force_host_platform_device_count=8 '
          f'--{FLAG}=eltwise,reduce')
  assert xla_flags.with_defaults('  ') == f'--{FLAG}=eltwise,reduce'


def test_a_flag_the_user_sets_is_kept_as_set():
  for given in (f'--{FLAG}=', f'--{FLAG}=dot', f'--{FLAG}=-eltwise --a=1'):
    assert xla_flags.with_defaults(given) == given


def test_adding_twice_adds_once():
  environ = {'XLA_FLAGS': '--xla_dump_to=/tmp/x'}
  xla_flags.add_defaults(environ, jaxlib_version='0.10.2')
  once = environ['XLA_FLAGS']
  xla_flags.add_defaults(environ, jaxlib_version='0.10.2')
  assert environ['XLA_FLAGS'] == once
  assert once.count(FLAG) == 1


def test_nothing_is_added_under_an_untested_jaxlib():
  """XLA aborts on a flag it does not know: an untested jaxlib gets none."""
  environ = {}
  xla_flags.add_defaults(environ, jaxlib_version='0.99.0')
  assert environ == {}
  environ = {'XLA_FLAGS': '--a=1'}
  xla_flags.add_defaults(environ, jaxlib_version='0.99.0')
  assert environ == {'XLA_FLAGS': '--a=1'}


def test_the_tests_run_with_the_defaults():
  """This process imported spcl_jax before its backend started (conftest),
  so the tests compile what users compile."""
  assert f'--{FLAG}=eltwise,reduce' in os.environ['XLA_FLAGS']


def _xla_flags_after_import(xla_flags_env):
  """XLA_FLAGS after `import spcl_jax` in a fresh process that then
  compiles and runs a residual ReLU chain on the CPU backend (XLA aborts the
  process on a flag it does not know)."""
  code = ('import os, spcl_jax, jax, jax.numpy as jnp\n'
          'x = jnp.arange(-4.0, 4.0)\n'
          'f = jax.jit(lambda x: jnp.maximum(jnp.maximum(x + 1, 0) + x, 0))\n'
          'assert f(x).tolist() == [0, 0, 0, 0, 1, 3, 5, 7], f(x)\n'
          'print(os.environ["XLA_FLAGS"])\n')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  if xla_flags_env is not None:
    env['XLA_FLAGS'] = xla_flags_env
  result = subprocess.run([sys.executable, '-c', code], env=env,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout.strip()


def test_importing_spcl_jax_sets_the_defaults_that_this_jaxlib_accepts():
  assert _xla_flags_after_import(None) == f'--{FLAG}=eltwise,reduce'
  assert _xla_flags_after_import(f'--{FLAG}=') == f'--{FLAG}='


def test_without_removes_every_setting_of_one_flag():
  flags = f'--a=1 --{FLAG}=eltwise,reduce --b --{FLAG}='
  assert xla_flags.without(flags, FLAG) == '--a=1 --b'
  assert xla_flags.without(flags, 'b') == (
      f'--a=1 --{FLAG}=eltwise,reduce --{FLAG}=')
