"""The parts of a training stage's step loop that keep the host from
waiting on the devices between two check points (issue 14).

* `DevicePrefetch`: the next batches of a `GlobalBatchIterator`, read and
  put onto the devices by a background thread while the current step runs.
  The iterator state it hands to checkpoints is the one after the batches
  the loop consumed, not after the prefetched ones, so an interrupted and
  resumed run reads exactly what an uninterrupted one reads.
* `MetricsWatch`: the steps' metrics merged on the devices (one small jitted
  call per step, no transfer), with the first step at which each metric was
  not finite; the host reads it only at the loop's check points (log,
  checkpoint, evaluation, preemption and the end of the stage).
* `DispatchWindow`: at most `max_steps_in_flight` steps dispatched and not
  finished (their buffers wait in device memory).
* `transfer_guard`: `jax.transfer_guard_device_to_host(level)` around the
  steps between check points (`testing.transfer_guard`; '' for none).
"""

import collections
import contextlib
import dataclasses
import queue
import threading

import jax
import jax.numpy as jnp
import numpy as np


def transfer_guard(level: str):
  """`jax.transfer_guard_device_to_host(level)`, or nothing for ''. On the
  CPU backend JAX guards no device-to-host read (they are zero-copy);
  tests/test_train_loop.py makes them visible there."""
  if not level:
    return contextlib.nullcontext()
  return jax.transfer_guard_device_to_host(level)


# ----------------------------------------------------------------- prefetch --

@dataclasses.dataclass(frozen=True)
class _Failure:
  error: BaseException


class DevicePrefetch:
  """Iterates a `GlobalBatchIterator` with up to `depth` + 1 of its next
  batches already made and put onto the devices (a background thread does
  it while the step runs); `depth` = 0: no thread, each batch is made when
  asked for (the loop before issue 14).

  `local_iterator` (what `checkpoint.StageCheckpoints` saves and restores)
  carries the state after the last batch handed out by `next()`. The state
  can be set (a restore) only before the first `next()`. `close()` stops
  the thread, then closes the wrapped iterator."""

  def __init__(self, iterator, depth: int):
    if depth < 0:
      raise ValueError(f'prefetch depth {depth} must be >= 0')
    self._iterator, self._depth = iterator, depth
    self._queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    self._thread = None
    self._consumed_state = None   # None: the wrapped iterator's own state

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._depth == 0:
      return next(self._iterator)
    if self._thread is None:
      self._consumed_state = self._iterator.get_state()
      self._thread = threading.Thread(target=self._fill, daemon=True,
                                      name='device-prefetch')
      self._thread.start()
    item = self._queue.get()
    if isinstance(item, _Failure):
      self._queue.put(item)   # every later next() fails the same way
      raise item.error
    batch, self._consumed_state = item
    return batch

  def _fill(self) -> None:
    try:
      while not self._stop.is_set():
        batch = next(self._iterator)
        self._queue.put((batch, self._iterator.get_state()))
    except BaseException as e:  # pylint: disable=broad-exception-caught
      self._queue.put(_Failure(e))

  def get_state(self) -> bytes:
    """The state after the batches handed out (not the prefetched ones)."""
    if self._consumed_state is None:
      return self._iterator.get_state()
    return self._consumed_state

  def set_state(self, state: bytes) -> None:
    if self._thread is not None:
      raise RuntimeError('the state of a prefetching iterator can only be '
                         'set before its first batch')
    self._iterator.set_state(state)
    self._consumed_state = None

  @property
  def local_iterator(self):
    """What grain's orbax handler saves (the consumed batches' state, taken
    now) and restores into (this iterator)."""
    return _ConsumedState(self, self.get_state())

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      while self._thread.is_alive():   # a full queue blocks its put: empty it
        self._drain()
        self._thread.join(timeout=0.05)
      self._drain()
    self._iterator.close()

  def _drain(self) -> None:
    try:
      while True:
        self._queue.get_nowait()
    except queue.Empty:
      pass


class _ConsumedState:
  """A `DevicePrefetch` as grain's checkpoint handler sees a loader's
  iterator: `get_state()` -> bytes (the state taken when it was made),
  `set_state(bytes)`, `start_prefetch()`."""

  def __init__(self, prefetch: DevicePrefetch, state: bytes):
    self._prefetch, self._state = prefetch, state

  def get_state(self) -> bytes:
    return self._state

  def set_state(self, state: bytes) -> None:
    self._prefetch.set_state(state)
    self._state = state

  def start_prefetch(self) -> None:
    start = getattr(self._prefetch._iterator.local_iterator,  # pylint: disable=protected-access
                    'start_prefetch', None)
    if start is not None:
      start()


# ------------------------------------------------------------ dispatching --

class DispatchWindow:
  """Bounds how far the host dispatches steps ahead of the devices: `add`
  an output of each dispatched step; once more than `limit` are pending,
  the host waits for the oldest to be computed (`block_until_ready`: no
  transfer, nothing read). `limit` 0: no bound."""

  def __init__(self, limit: int):
    if limit < 0:
      raise ValueError(f'limit {limit} must be >= 0')
    self._limit, self._pending = limit, collections.deque()

  def add(self, output) -> None:
    if not self._limit:
      return
    self._pending.append(output)
    while len(self._pending) > self._limit:
      self._pending.popleft().block_until_ready()


# ------------------------------------------------------------------ metrics --

@jax.jit
def _accumulate(merged, first_bad, count, metrics):
  count = count + 1
  bad_now = {name: jnp.where(jnp.all(jnp.isfinite(value)), -1, count)
             for name, value in metrics.compute().items()}
  if first_bad is None:
    first_bad = bad_now
  else:
    first_bad = {name: jnp.where(first_bad[name] >= 0, first_bad[name],
                                 bad_now[name]) for name in bad_now}
  merged = metrics if merged is None else merged.merge(metrics)
  return merged, first_bad, count


@dataclasses.dataclass(frozen=True)
class Reading:
  """What the host learns at a check point."""
  means: dict        # metric -> mean over the steps since the last reset
  first_bad: dict    # metric -> first step whose value was not finite


class MetricsWatch:
  """The metrics of a stage's steps, on the devices: their merge since the
  last `reset()` (clu metrics), and for each metric the first step since
  the watch began (`step` = the stage's step before its first `add`) whose
  value was not finite. Nothing is read on the host before `read()`."""

  def __init__(self, step: int, sharding: jax.sharding.Sharding):
    self._count = jax.device_put(np.int32(step), sharding)
    self._merged, self._first_bad = None, None

  def add(self, metrics) -> None:
    """The metrics of the next step (asynchronous: no transfer)."""
    self._merged, self._first_bad, self._count = _accumulate(
        self._merged, self._first_bad, self._count, metrics)

  def reset(self) -> None:
    """Starts the next log interval's merge."""
    self._merged = None

  def read(self) -> Reading:
    """Waits for the steps added so far; one device-to-host transfer."""
    means, first_bad = jax.device_get((
        self._merged.compute() if self._merged is not None else {},
        self._first_bad or {}))
    return Reading({k: float(v) for k, v in means.items()},
                   {k: int(v) for k, v in first_bad.items() if v >= 0})


def non_finite_message(stage_name: str, step: int, reading: Reading,
                       last_good: str) -> str | None:
  """The NonFiniteLossError message for a `reading` taken after `step`,
  or None when every metric was finite. `last_good` names the last good
  checkpoint."""
  if not reading.first_bad:
    return None
  first = min(reading.first_bad.values())
  names = sorted(k for k, s in reading.first_bad.items() if s == first)
  later = sorted((s, k) for k, s in reading.first_bad.items() if s > first)
  also = ''.join(f'; {k} from step {s}' for s, k in later)
  means = ', '.join(f'{k}={reading.means[k]}' for k in sorted(
      reading.first_bad) if k in reading.means)
  return (f'stage {stage_name}: non-finite {", ".join(names)} at step '
          f'{first} (between steps {first - 1} and {first}: the steps '
          f'before were finite; found at the check after step {step}'
          f'{also}; means since the last log: {means}); {last_good}. '
          'Nothing was saved after it.')

