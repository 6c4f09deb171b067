"""The processes of a run acting together: barriers, agreement on a flag
(a SIGTERM) across processes, waits that SIGTERM cuts short (a compile, a
dataset build), and the testing crash hook."""

import os
import signal
import threading
from typing import Callable

import jax
from jax.experimental import multihost_utils
import numpy as np

from spcl_jax.infra import workdir as workdir_lib


class Preempted(Exception):
  """SIGTERM arrived; the latest state was checkpointed."""


def sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def crash_after(ctx, write: str, wait=None) -> None:
  workdir_lib.crash_after_write(ctx.config, write, wait)


def any_process(flag: bool) -> bool:
  """Whether `flag` is set on any process: a collective (an all-gather that
  waits for every process) when there are several."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def agree_every(ctx, sync_every: bool = False) -> int:
  """Every how many steps or batches the processes agree on a SIGTERM (a
  collective): 1 with one process (its own flag, no collective) or
  `sync_every`, else `checkpoint.preemption_check_every_steps`."""
  if sync_every or jax.process_count() == 1:
    return 1
  return ctx.config.checkpoint.preemption_check_every_steps


# How often a wait that SIGTERM may cut short looks at the flag (seconds).
POLL_SECONDS = 0.2
# How long a work that looks at its `stop` event may take to stop.
STOP_GRACE_SECONDS = 10.0
# The name of the thread that does such a wait's work (`abandoned_work`).
WORK_THREAD_PREFIX = 'interruptible: '


def interruptible(ctx, name: str, what: str,
                  work: Callable[[threading.Event], object],
                  stops: bool = False):
  """`work(stop)` done on a daemon thread while this one looks at the
  SIGTERM flag every POLL_SECONDS: its result, or its exception re-raised,
  or `Preempted` once any process got SIGTERM. Then `stop` is set; a work
  that looks at it (`stops`: a dataset build, between records) is given
  STOP_GRACE_SECONDS to end, one that cannot (a compile) is abandoned: its
  thread runs on until the process exits, which main.py does without
  waiting for it. For what cannot stop between batches: compiling a step,
  building a dataset. `name` ('build', '<stage>/compile', ...) is what
  `testing.sigterm_during` names to send SIGTERM as the work starts.

  With several processes, they look at the flags together (an all-gather of
  (SIGTERM, done) per poll) until every process's work is done or one got
  SIGTERM, so all of them stop at the same poll. The work must then not run
  anything on the devices (compile, do not execute; build on process 0
  only): a program of its own running beside the poll's collectives has
  aborted a two-process CPU run."""
  box, stop = {}, threading.Event()

  def target():
    try:
      box['result'] = work(stop)
    except BaseException as e:  # pylint: disable=broad-except
      box['error'] = e

  thread = threading.Thread(target=target, daemon=True,
                            name=WORK_THREAD_PREFIX + name)
  thread.start()
  if ctx.config.testing.sigterm_during == name:
    os.kill(os.getpid(), signal.SIGTERM)
  while True:
    thread.join(POLL_SECONDS)
    done = not thread.is_alive()
    if jax.process_count() == 1:
      preempted, all_done = ctx.preempted, done
    else:
      flags = multihost_utils.process_allgather(
          np.array([ctx.preempted, done]))
      preempted, all_done = bool(np.any(flags[..., 0])), bool(
          np.all(flags[..., 1]))
    if preempted:
      stop.set()
      if stops:
        thread.join(STOP_GRACE_SECONDS)
      raise Preempted(f'preempted while {what}')
    if all_done:
      break
  if 'error' in box:
    raise box['error']
  return box['result']


def abandoned_work() -> list[str]:
  """The names of `interruptible` works still running (abandoned by a
  SIGTERM): the process must exit without waiting for their threads."""
  return [t.name[len(WORK_THREAD_PREFIX):] for t in threading.enumerate()
          if t.name.startswith(WORK_THREAD_PREFIX) and t.is_alive()]


class CompiledInterruptibly:
  """A jitted function whose first call compiles it through `interruptible`
  (SIGTERM stops the run within POLL_SECONDS instead of after a compile of
  minutes at the recipe's sizes), then calls it as usual: JAX keeps the
  compiled executable, so the call does not compile again. The calls after
  the first go straight to the jitted function."""

  def __init__(self, ctx, name: str, what: str, jitted):
    self._ctx, self._name, self._what, self._jitted = ctx, name, what, jitted
    self._compiled = False

  def __call__(self, *args):
    if not self._compiled:
      interruptible(self._ctx, self._name, self._what,
                    lambda stop: self._jitted.lower(*args).compile())
      self._compiled = True
    return self._jitted(*args)
