r"""Seconds from SIGTERM to exit in every stage of the smoke pipeline
(issue 10's goal: within 5 s on the smoke data).

  python -m benchmarks.sigterm_latency --workdir=DIR [--delays=0.5,3]

Runs `configs/demo.py:smoke` once to the end (DIR/reference; kept and
reused), then for each stage and delay: a copy of the reference with that
stage and the later ones removed is run again, SIGTERM is sent `delay`
seconds after the stage's "starting" line (in its set-up, its compile, its
passes or steps) and the time until the process exits is measured. Prints
one row per (stage, delay): the exit status (75: preempted), the seconds
and the line saying where the run stopped. The smoke data must be built
(the first run builds it); each run starts a process, so the whole takes
a few minutes on 2 cores.
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags

from spcl_jax.run import stage_graph

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/demo.py:smoke'


def _command(workdir: str) -> list[str]:
  return [sys.executable, '-m', 'spcl_jax.main', f'--config={CONFIG}',
          f'--workdir={workdir}']


def ensure_reference(directory: str) -> str:
  """A finished smoke workdir at `directory` (run once, then reused)."""
  if not os.path.exists(os.path.join(directory, 'self_training',
                                     'done.json')):
    subprocess.run(_command(directory), cwd=ROOT, check=True,
                   capture_output=True)
  return directory


def workdir_before(reference: str, stage: str, workdir: str) -> None:
  """`workdir` = `reference` with `stage` and the later stages removed."""
  shutil.rmtree(workdir, ignore_errors=True)
  shutil.copytree(reference, workdir)
  names = [s.name for s in stage_graph.STAGES]
  for name in names[names.index(stage):]:
    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
  os.remove(os.path.join(workdir, 'report.json'))


def time_to_exit(workdir: str, stage: str, delay: float):
  """(exit status, seconds from SIGTERM to exit or None if the run ended
  first, the last line naming a preemption)."""
  process = subprocess.Popen(_command(workdir), cwd=ROOT,
                             stderr=subprocess.PIPE, text=True)
  sent = []

  def terminate():
    time.sleep(delay)
    if process.poll() is None:
      process.send_signal(signal.SIGTERM)
      sent.append(time.monotonic())

  stopped, started = '', False
  for line in process.stderr:
    if not started and f'{stage}: starting' in line:
      started = True
      threading.Thread(target=terminate, daemon=True).start()
    if 'preempted' in line:
      stopped = line.strip()
  status = process.wait()
  seconds = time.monotonic() - sent[0] if sent else None
  return status, seconds, stopped


def main(argv):
  del argv
  base = os.path.abspath(flags.FLAGS.workdir)
  reference = ensure_reference(os.path.join(base, 'reference'))
  delays = [float(d) for d in flags.FLAGS.delays]
  print(f'{"stage":16} {"delay":>6} {"exit":>5} {"s to exit":>9}  stopped')
  for stage in stage_graph.STAGES:
    for delay in delays:
      workdir = os.path.join(base, f'run_{stage.name}')
      workdir_before(reference, stage.name, workdir)
      status, seconds, stopped = time_to_exit(workdir, stage.name, delay)
      shown = f'{seconds:9.1f}' if seconds is not None else f'{"-":>9}'
      print(f'{stage.name:16} {delay:6.1f} {status:5d} {shown}  '
            f'{stopped[:110]}', flush=True)


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'output directory')
  flags.DEFINE_list('delays', ['0.5', '3'], 'seconds after a stage starts')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
