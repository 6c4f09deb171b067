"""Waits that SIGTERM cuts short (`processes.interruptible`): the work's
result or error, the stop at the next poll once the flag is set (the work
abandoned, or stopped where it looks at `stop`), the test hook, and the
first call of a jitted step compiled that way."""

import contextlib
import signal
import threading

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from spcl_jax.run import context
from spcl_jax.run import processes


def _ctx(sigterm_during=''):
  config = ml_collections.ConfigDict(
      {'testing': {'sigterm_during': sigterm_during}})
  return context.Context(config, '/nonexistent', None, None)


@contextlib.contextmanager
def _sigterm_sets_the_flag(ctx):
  """What pipeline.run installs: SIGTERM sets `ctx.preempted`."""
  previous = signal.signal(signal.SIGTERM,
                           lambda *_: setattr(ctx, 'preempted', True))
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_the_work_s_result_and_error_come_back():
  ctx = _ctx()
  assert processes.interruptible(ctx, 'x', 'adding', lambda stop: 1 + 1
                                     ) == 2
  with pytest.raises(KeyError, match='missing'):
    processes.interruptible(ctx, 'x', 'failing',
                            lambda stop: {}['missing'])
  assert processes.abandoned_work() == []


def test_sigterm_abandons_a_work_that_cannot_stop():
  ctx = _ctx()
  release, started = threading.Event(), threading.Event()

  def compile_like(stop):   # ignores `stop`, as a compile does
    del stop
    started.set()
    release.wait(60)

  def flag_when_started():
    started.wait(60)
    ctx.preempted = True

  threading.Thread(target=flag_when_started, daemon=True).start()
  try:
    with pytest.raises(processes.Preempted,
                       match='preempted while compiling a step'):
      processes.interruptible(ctx, 'x/compile', 'compiling a step',
                              compile_like)
    # raised while the work still runs: main.py exits without waiting
    assert processes.abandoned_work() == ['x/compile']
  finally:
    release.set()
  for thread in threading.enumerate():
    if thread.name.startswith(processes.WORK_THREAD_PREFIX):
      thread.join(60)
  assert processes.abandoned_work() == []


def test_a_work_that_looks_at_stop_has_ended_when_preempted_is_raised():
  ctx = _ctx('build')   # the hook: SIGTERM as the work starts
  records = []

  def build_like(stop):
    for i in range(6000):   # at most 60 s
      if stop.wait(0.01):
        records.append('stopped')
        return
      records.append(i)

  with _sigterm_sets_the_flag(ctx):
    with pytest.raises(processes.Preempted,
                       match='preempted while building a dataset'):
      processes.interruptible(ctx, 'build', 'building a dataset',
                              build_like, stops=True)
  assert records[-1] == 'stopped'
  assert processes.abandoned_work() == []


def test_the_hook_fires_only_for_its_name():
  ctx = _ctx('warmup/compile')
  with _sigterm_sets_the_flag(ctx):
    assert processes.interruptible(ctx, 'spcl/compile', 'compiling',
                                   lambda stop: 'done') == 'done'
    assert not ctx.preempted


def test_first_call_compiles_interruptibly_and_computes_as_jit():
  ctx = _ctx()
  lowered = []

  def double(x):
    lowered.append(x.shape)   # runs at tracing only
    return 2 * x

  step = processes.CompiledInterruptibly(ctx, 's/compile', 'compiling s',
                                         jax.jit(double))
  assert float(step(jnp.float32(3))) == 6.0
  assert float(step(jnp.float32(4))) == 8.0
  # traced once, for the compile: the calls reuse its trace and executable
  assert lowered == [()]
  preempted = _ctx('t/compile')
  with _sigterm_sets_the_flag(preempted):
    never = processes.CompiledInterruptibly(
        preempted, 't/compile', 'compiling t', jax.jit(lambda x: x + 1))
    with pytest.raises(processes.Preempted, match='compiling t'):
      never(jnp.float32(1))
