"""What the training loaders' grain worker processes run besides the
transforms: a lifeline to the run that started them.

grain starts its workers with multiprocessing's `spawn` and stops them when
the loader is closed. A trainer that is SIGKILLed (or OOM-killed) closes
nothing: its workers would live on with parent PID 1, holding their
read-ahead buffers (gigabytes at the recipe's sizes). `Lifeline` is the
first operation of every training loader; unpickled in a worker, it
starts a daemon thread that exits the worker (`os._exit`, no cleanup that
could block) once the process that made the loader is gone: when the
worker's parent PID is no longer that process's. The thread looks every
`poll_seconds`; a check of the parent PID is one system call.

The parent's death is detected by polling, not by `prctl(PR_SET_PDEATHSIG)`:
the death signal fires when the *thread* that started the worker exits,
and grain may start workers from a thread (the device prefetch's) that
ends before the run does.
"""

import dataclasses
import os
import threading

import grain

# How often a worker looks whether its run is still alive (seconds).
POLL_SECONDS = 0.5
# The name of a worker's lifeline thread.
THREAD_NAME = 'spcl_jax lifeline'


def watch_parent(parent_pid: int, poll_seconds: float = POLL_SECONDS,
                 exit_status: int = 1) -> threading.Thread | None:
  """In a process whose parent is `parent_pid`: a started daemon thread
  that exits this process (`os._exit(exit_status)`) once its parent is
  another process (the parent died and the process was re-parented), or
  at once if that is already so. In `parent_pid` itself: None (nothing to
  watch)."""
  if os.getpid() == parent_pid:
    return None

  def watch():
    while os.getppid() == parent_pid:
      threading.Event().wait(poll_seconds)
    os._exit(exit_status)   # pylint: disable=protected-access

  thread = threading.Thread(target=watch, name=THREAD_NAME, daemon=True)
  thread.start()
  return thread


@dataclasses.dataclass(frozen=True)
class Lifeline(grain.transforms.Map):
  """An identity operation whose copy in a worker process watches the
  process that made it (`watch_parent`). Made in the trainer (`parent_pid`
  defaults to its PID), pickled into each worker with the pipeline."""
  parent_pid: int = dataclasses.field(default_factory=os.getpid)
  poll_seconds: float = POLL_SECONDS

  def __setstate__(self, state):
    self.__dict__.update(state)
    watch_parent(self.parent_pid, self.poll_seconds)

  def map(self, element):
    return element
