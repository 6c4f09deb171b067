"""grain's worker processes die with their run: a SIGKILLed (or OOM-killed)
trainer leaves no worker behind (`workers.Lifeline`), and the evaluation
and pseudo-label passes start no process at all."""

import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import pytest

from spcl_jax.data import loaders
from spcl_jax.data import workers
from spcl_jax.infra import process_tree
from tests.data import fake_records

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
# the bound: every worker exits within 10 s of its trainer's death
EXIT_BOUND_SECONDS = 10.0


def _wait_until_gone(pids, bound: float) -> float:
  """Seconds until none of `pids` is alive; fails after `bound`."""
  start = time.monotonic()
  while process_tree.alive(pids):
    assert time.monotonic() - start < bound, (
        f'processes {process_tree.alive(pids)} still alive {bound} s after '
        'their run was killed')
    time.sleep(0.1)
  return time.monotonic() - start


# A process (the "trainer") that unpickles a Lifeline in a child it starts
# (the "worker"), prints the worker's PID and waits to be killed.
_PARENT = '''
import pickle, subprocess, sys, time
from spcl_jax.data import workers
lifeline = pickle.dumps(workers.Lifeline(poll_seconds=0.1))
child = subprocess.Popen([sys.executable, '-c',
    'import pickle, sys, time; pickle.loads(sys.stdin.buffer.read()); '
    'print("armed", flush=True); time.sleep(600)'],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
child.stdin.write(lifeline); child.stdin.close()
assert child.stdout.readline().strip() == b'armed'
print(child.pid, flush=True)
time.sleep(600)
'''


def test_an_unpickled_lifeline_exits_its_process_when_the_parent_dies():
  parent = subprocess.Popen([sys.executable, '-c', _PARENT], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    worker = int(parent.stdout.readline())
    time.sleep(0.5)
    assert process_tree.alive([worker]), (
        'the worker exited while its parent lived')
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert _wait_until_gone([worker], 5.0) < 5.0
  finally:
    parent.kill()


def test_a_lifeline_in_its_own_process_watches_nothing():
  lifeline = workers.Lifeline()
  assert lifeline.parent_pid == os.getpid()
  assert workers.watch_parent(os.getpid()) is None
  copy = pickle.loads(pickle.dumps(lifeline))   # unpickled here: no thread
  assert copy == lifeline and copy.map({'x': 1}) == {'x': 1}
  assert not [t for t in threading.enumerate()
              if t.name == workers.THREAD_NAME]


def test_evaluation_passes_start_no_process():
  records = [fake_records.palette_record(s) for s in range(6)]
  spec = loaders.PipelineSpec('unused', 'val', '.', global_batch_size=2,
                              size=(20, 30), shuffle=False)
  before = set(process_tree.children(os.getpid()))
  batches = loaders.eval_batches(spec, source=records, process_index=0,
                                 process_count=1, threads=4)
  next(batches)
  assert set(process_tree.children(os.getpid())) == before
  assert len(list(batches)) == 2


@pytest.mark.slow
def test_a_sigkilled_run_leaves_no_worker_behind(tiny_demo, tmp_path):
  """The warm-up of a real run with two grain workers per stream, SIGKILLed
  once its workers read: every worker has exited within 10 s."""
  trainer = subprocess.Popen(
      [sys.executable, '-m', 'spcl_jax.main',
       '--config=configs/demo.py:smoke,warmup',
       f'--workdir={tmp_path / "run"}',
       f'--config.data.data_dir={tiny_demo}',
       '--config.data.worker_count=2',
       '--config.stages.warmup.steps=1000',
       '--config.stages.warmup.schedule_steps=1000'],
      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 300
    spawned = []
    # two streams (source, target) x two workers
    while len(spawned) < 4 and trainer.poll() is None:
      assert time.monotonic() < deadline, 'no grain workers after 300 s'
      spawned = [pid for pid in process_tree.children(trainer.pid)
                 if b'spawn_main' in process_tree.command_line(pid)]
      time.sleep(0.2)
    assert trainer.poll() is None, 'the run ended before it was killed'
    time.sleep(2.0)   # the workers read and transform batches
    # the workers, and multiprocessing's resource tracker
    started = process_tree.children(trainer.pid)
    assert set(spawned) <= set(started)
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.wait()
    seconds = _wait_until_gone(started, EXIT_BOUND_SECONDS)
    print(f'{len(started)} processes gone {seconds:.1f} s after the SIGKILL')
  finally:
    trainer.kill()
