"""The training stage's step loop (issue 14): nothing is read from the
devices between two check points (log, checkpoint, evaluation), the next
batches are prefetched onto the devices with exact checkpointed iterator
states, and a non-finite metric is reported with the step it began at."""

import contextlib

from clu import metrics as clu_metrics
import jax
from jax._src import array as jax_array
from jax._src import config as jax_config
import jax.numpy as jnp
import numpy as np
import pytest

from spcl_jax.core import mesh as mesh_lib
from spcl_jax.data import global_batches
from spcl_jax.data import loaders
from spcl_jax.infra import checkpoint
from spcl_jax.run import step_loop

_GUARDING = ('disallow', 'disallow_explicit')


@contextlib.contextmanager
def _device_to_host_guard_on_cpu():
  """Makes `jax.transfer_guard_device_to_host` hold on the CPU backend.

  JAX applies it only where a read copies (GPU, TPU): a CPU array is read
  in place, unguarded. Every read of the value of a jax.Array that spans
  several devices (the mesh's arrays here: conftest simulates 8 CPU
  devices) goes through `ArrayImpl._value` (`float()`, `int()`, `.item()`,
  `np.asarray`, `jax.device_get`, printing); this raises there when the
  calling thread's guard level forbids the read, as JAX does on an
  accelerator."""
  read = jax_array.ArrayImpl._value

  def guarded(self):
    level = jax_config.transfer_guard_device_to_host.value
    if level in _GUARDING:
      raise RuntimeError(f'Disallowed device-to-host transfer ({level}): '
                         f'{self.aval}')
    return read.fget(self)

  jax_array.ArrayImpl._value = property(guarded)
  try:
    yield
  finally:
    jax_array.ArrayImpl._value = read


def _mesh_scalar(value):
  mesh = mesh_lib.make_mesh()
  return jax.device_put(jnp.float32(value), mesh_lib.replicated(mesh))


def test_the_cpu_guard_sees_a_read_of_a_mesh_array():
  """The emulation is not vacuous: it sees what the loop before issue 14
  did after every step (`float()` of a metric) and lets it through
  outside the guard."""
  loss = _mesh_scalar(2.0) * 2
  with _device_to_host_guard_on_cpu():
    for read in (float, np.asarray, jax.device_get, lambda x: x.item()):
      with jax.transfer_guard_device_to_host('disallow_explicit'):
        with pytest.raises(RuntimeError, match='Disallowed device-to-host'):
          read(loss)
      assert float(read(loss)) == 4.0


@pytest.mark.slow   # compiling the warm-up step for 8 devices: ~1-3 min
def test_no_device_to_host_transfer_between_check_points(tiny_demo,
                                                         tmp_path):
  """Four warm-up steps with check points (log, checkpoint, evaluation) at
  steps 2 and 4: every step runs under
  `jax.transfer_guard_device_to_host('disallow_explicit')`
  (testing.transfer_guard), only the check points' work outside it. The
  loop before issue 14 read the metrics after every step (`float()`)."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  from spcl_jax.run import pipeline  # pylint: disable=g-import-not-at-top
  config = demo.get_config('smoke')
  config.data.data_dir = tiny_demo
  config.stages_to_run = ('warmup',)
  config.stages.self_training.target_batch_size = 8   # 8 devices (conftest)
  config.log_every_steps = 2
  config.checkpoint.every_steps = config.stages.warmup.eval_every_steps = 4
  config.evaluation.dashboard_images = 0
  config.testing.transfer_guard = 'disallow_explicit'
  with _device_to_host_guard_on_cpu():
    results = pipeline.run(config, str(tmp_path))
  assert results['warmup']['steps'] == config.stages.warmup.steps == 4
  assert [h['step'] for h in results['warmup']['eval_history']] == [4]


# ---------------------------------------------------------------- prefetch --

def _iterator(tiny_demo, depth):
  spec = loaders.PipelineSpec(dataset='sim2real_demo/tiny', split='source_train',
                              data_dir=tiny_demo, global_batch_size=8, seed=3,
                              size=(32, 64), worker_count=0)
  return step_loop.DevicePrefetch(
      global_batches.GlobalBatchIterator(loaders.train_loader(spec), mesh_lib.make_mesh()),
      depth)


def _labels(batches):
  return [np.asarray(b['label']) for b in batches]


def test_prefetched_batches_and_checkpointed_state_are_the_consumed_ones(
    tiny_demo, tmp_path):
  """Prefetching changes no batch, and a checkpoint taken after 3 batches
  (while more are already on the devices) resumes at the 4th."""
  plain = _iterator(tiny_demo, 0)
  expected = _labels([next(plain) for _ in range(6)])
  plain.close()
  prefetching = _iterator(tiny_demo, 2)
  got = _labels([next(prefetching) for _ in range(3)])
  saved = checkpoint.StageCheckpoints(str(tmp_path / 'ckpt'), 1, ('source',))
  state = {'w': _mesh_scalar(1.0)}
  saved.save(3, state, {'source': prefetching})
  saved.wait()
  got += _labels([next(prefetching) for _ in range(3)])
  prefetching.close()
  saved.close()
  for a, b in zip(got, expected):
    np.testing.assert_array_equal(a, b)

  resumed = _iterator(tiny_demo, 2)
  restored = checkpoint.StageCheckpoints(str(tmp_path / 'ckpt'), 1,
                                         ('source',))
  restored.restore(3, checkpoint.abstract_like(state, mesh_lib.make_mesh()),
                   {'source': resumed})
  after = _labels([next(resumed) for _ in range(3)])
  resumed.close()
  restored.close()
  for a, b in zip(after, expected[3:]):
    np.testing.assert_array_equal(a, b)


def test_prefetch_hands_on_a_failure_of_the_wrapped_iterator():
  class Failing:
    def __init__(self):
      self.closed, self.n = False, 0

    def __next__(self):
      self.n += 1
      if self.n == 3:
        raise ValueError('a corrupt record')
      return {'n': self.n}

    def get_state(self):
      return str(self.n).encode()

    def close(self):
      self.closed = True

  wrapped = Failing()
  prefetching = step_loop.DevicePrefetch(wrapped, 2)
  assert [next(prefetching)['n'] for _ in range(2)] == [1, 2]
  assert prefetching.get_state() == b'2'
  with pytest.raises(ValueError, match='a corrupt record'):
    next(prefetching)
  with pytest.raises(ValueError, match='a corrupt record'):
    next(prefetching)
  prefetching.close()
  assert wrapped.closed


def test_state_cannot_be_set_once_prefetching():
  class Endless:
    def __next__(self):
      return {}

    def get_state(self):
      return b'0'

    def set_state(self, state):
      pass

    def close(self):
      pass

  prefetching = step_loop.DevicePrefetch(Endless(), 1)
  prefetching.set_state(b'0')   # before the first batch: a restore
  next(prefetching)
  with pytest.raises(RuntimeError, match='before its first batch'):
    prefetching.set_state(b'0')
  prefetching.close()           # the thread blocked on its full queue ends


# ----------------------------------------------------------------- metrics --

_Metrics = clu_metrics.Collection.create(
    loss=clu_metrics.Average.from_output('loss'),
    adv=clu_metrics.Average.from_output('adv'))


def test_watch_names_the_first_non_finite_step_of_each_metric():
  mesh = mesh_lib.make_mesh()
  watch = step_loop.MetricsWatch(10, mesh_lib.replicated(mesh))
  losses = [1.0, 3.0, np.nan, 2.0, 5.0]
  advs = [1.0, 1.0, 1.0, np.inf, 1.0]
  for loss, adv in zip(losses, advs):
    watch.add(_Metrics.single_from_model_output(
        loss=_mesh_scalar(loss), adv=_mesh_scalar(adv)))
  reading = watch.read()
  assert reading.first_bad == {'loss': 13, 'adv': 14}
  assert np.isnan(reading.means['loss'])
  message = step_loop.non_finite_message('spcl', 15, reading,
                                         'the last good checkpoint is step 12')
  assert message.startswith('stage spcl: non-finite loss at step 13 '
                            '(between steps 12 and 13')
  assert 'found at the check after step 15; adv from step 14' in message
  assert 'the last good checkpoint is step 12. Nothing was saved' in message


def test_watch_means_restart_at_each_log_and_finite_reads_pass():
  mesh = mesh_lib.make_mesh()
  watch = step_loop.MetricsWatch(0, mesh_lib.replicated(mesh))
  for loss in (1.0, 3.0):
    watch.add(_Metrics.single_from_model_output(
        loss=_mesh_scalar(loss), adv=_mesh_scalar(0.0)))
  reading = watch.read()
  assert reading.means == {'loss': 2.0, 'adv': 0.0}
  assert step_loop.non_finite_message('x', 2, reading, '') is None
  watch.reset()
  watch.add(_Metrics.single_from_model_output(
      loss=_mesh_scalar(7.0), adv=_mesh_scalar(1.0)))
  assert watch.read().means == {'loss': 7.0, 'adv': 1.0}


class _Pending:
  """A step's output that records when the host waited for it."""

  def __init__(self, name, waited):
    self.name, self.waited = name, waited

  def block_until_ready(self):
    self.waited.append(self.name)
    return self


@pytest.mark.parametrize('limit,waited', [
    (2, ['s0', 's1', 's2']),   # s3 and s4 still in flight
    (1, ['s0', 's1', 's2', 's3']),
    (0, [])])                  # no bound
def test_dispatch_window_waits_for_the_oldest_step_beyond_its_limit(
    limit, waited):
  seen = []
  window = step_loop.DispatchWindow(limit)
  for i in range(5):
    window.add(_Pending(f's{i}', seen))
  assert seen == waited


def test_dispatch_window_refuses_a_negative_limit():
  with pytest.raises(ValueError, match='limit -1 must be >= 0'):
    step_loop.DispatchWindow(-1)
