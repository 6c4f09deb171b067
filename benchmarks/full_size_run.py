r"""Every stage of `configs/gta5.py` at the recipe's real image sizes on
this machine, a few steps each: the time per step, the passes' throughput
and the peak RSS of the whole process tree (trainer and grain workers),
stage by stage.

  python -m benchmarks.full_size_run --workdir=/tmp/full_size
  python -m benchmarks.full_size_run --workdir=/tmp/narrow --base_width=8 \
      --model=deeplabv2_resnet18

makes its own data: fake downloads in GTA5's and Cityscapes' layouts at
their real sizes (1914x1052 and 2048x1024, `data_prep.fake_downloads`:
`--source_images` GTA5 frames, `--target_images` Cityscapes train and
`--val_images` val frames), built with `data_prep.build` into
WORKDIR/tfds (kept for the next run), then runs

  python -m spcl_jax.main --config=configs/gta5.py --workdir=WORKDIR/run

with the recipe's sizes and the settings docs/performance.md recommends
for a small machine (`SMALL_MACHINE`: one source and one target image a
step, one evaluation image a batch, `model.remat=blocks`, one grain
worker), `--steps` steps a stage, the backbone from random weights (no
ImageNet download). `--model` and `--base_width` choose the network
(ResNet-101 at full width by default; the test runs a narrow one).
Extra `--override=FIELD=VALUE` flags go to the run as
`--config.FIELD=VALUE`.

XLA:CPU's default flag of spcl_jax (`spcl_jax.infra.xla_flags`) doubles
the compiled peak of a full-size step (20.4 -> 11.0 GiB for the warm-up,
docs/performance.md): `--xla_default_flag=false` (the default here) runs
without it, `true` with it.

Prints one row per stage and the whole tree's peak RSS; exit status 1 if
the run fails (its last lines are printed).
"""

import functools
import os
import re
import shutil
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags

from benchmarks.stand_in import stand_in_weights
from data_prep import fake_downloads
from spcl_jax.infra import flag_errors
from spcl_jax.infra import process_tree
from spcl_jax.infra import xla_flags
from spcl_jax.run import stage_graph

_WORKDIR = flags.DEFINE_string('workdir', None, 'fakes, built data and the '
                               'run go here')
_MODEL = flags.DEFINE_string('model', 'deeplabv2_resnet101', 'model.name')
_BASE_WIDTH = flags.DEFINE_integer('base_width', 64, 'model.base_width')
_STEPS = flags.DEFINE_integer('steps', 2, 'steps of each training stage')
_SOURCE_IMAGES = flags.DEFINE_integer('source_images', 6, 'GTA5 frames')
_TARGET_IMAGES = flags.DEFINE_integer('target_images', 6,
                                      'Cityscapes train frames')
_VAL_IMAGES = flags.DEFINE_integer('val_images', 3, 'Cityscapes val frames')
_DEFAULT_FLAG = flags.DEFINE_bool('xla_default_flag', False, 'compile with '
                                  "spcl_jax's default XLA:CPU flag")
_OVERRIDES = flags.DEFINE_multi_string('override', [], 'FIELD=VALUE, passed '
                                       'as --config.FIELD=VALUE')
_FRESH = flags.DEFINE_bool('fresh', True, 'remove an earlier run first')
_STAND_IN = flags.DEFINE_bool(
    'stand_in_weights', True, 'start the backbone from `stand_in_weights` '
    '(the recipe starts from ImageNet weights, which cannot be downloaded '
    'here); false: from random weights, whose frozen BatchNorm lets a deep '
    'ResNet\'s activations overflow in its first step')

# What docs/performance.md recommends for the recipe on a small machine
# (24 GiB, no accelerator): the sizes stay the recipe's.
SMALL_MACHINE = {
    'model.remat': 'blocks',
    'data.worker_count': 1,
    'data.eval_batch_size': 1,
    'stages.warmup.source_batch_size': 1,
    'stages.warmup.target_batch_size': 1,
    'stages.prototypes.batch_size': 1,
    'stages.pseudo_labels.batch_size': 1,
    'stages.spcl.source_batch_size': 1,
    'stages.spcl.target_batch_size': 1,
    'stages.pseudo_labels_2.batch_size': 1,
    'stages.self_training.target_batch_size': 1,
    'evaluation.dashboard_images': 1,
}
STAGE_LINE = re.compile(r'^\d\d:\d\d:\d\d (\w+): starting$')
STEP_LINE = re.compile(r'^\d\d:\d\d:\d\d (\w+): step (\d+)/\d+ ')
PASS_LINE = re.compile(r'^\d\d:\d\d:\d\d (\w+): (\S+(?: \w+)?) (\d+) images '
                       r'in \S+ \(([\d.]+) images/s\)')


def run_overrides(data_dir: str, pretrained_dir: str) -> list[str]:
  """The `--config.` flags of the run."""
  steps = _STEPS.value
  fields = {'data.data_dir': data_dir, 'model.name': _MODEL.value,
            'model.base_width': _BASE_WIDTH.value,
            'model.pretrained_dir': pretrained_dir,
            'log_every_steps': 1, **SMALL_MACHINE}
  for stage in stage_graph.TRAINING_STAGES:
    fields.update({f'stages.{stage}.steps': steps,
                   f'stages.{stage}.schedule_steps': steps,
                   f'stages.{stage}.eval_every_steps': steps})
  fields['checkpoint.every_steps'] = steps
  args = [f'--config.{k}={v}' for k, v in fields.items()]
  return args + [f'--config.{o}' for o in _OVERRIDES.value]


class Watch:
  """Reads the run's console lines and samples its tree's RSS: per stage,
  its wall time, last steady images/s, passes and peak RSS."""

  def __init__(self, process: subprocess.Popen):
    self.process = process
    self.stages: dict[str, dict] = {}
    self.stage = 'start-up'
    self.lines: list[str] = []
    self.peak = 0
    self._new_stage('start-up')

  def _new_stage(self, name: str) -> None:
    self.stage = name
    self.stages[name] = {'start': time.time(), 'end': time.time(),
                         'peak': 0, 'steps': [], 'passes': []}

  def sample(self) -> None:
    while self.process.poll() is None:
      rss = process_tree.tree_rss(self.process.pid)
      self.peak = max(self.peak, rss)
      entry = self.stages[self.stage]
      entry['peak'] = max(entry['peak'], rss)
      time.sleep(0.2)

  def read(self) -> None:
    for line in self.process.stderr:
      line = line.rstrip('\n')
      self.lines.append(line)
      print(line, file=sys.stderr, flush=True)
      if match := STAGE_LINE.match(line):
        self.stages[self.stage]['end'] = time.time()
        self._new_stage(match.group(1))
      elif STEP_LINE.match(line):   # log_every_steps = 1: one per step
        self.stages[self.stage]['steps'].append(time.time())
      elif match := PASS_LINE.match(line):
        self.stages[self.stage]['passes'].append(
            f'{match.group(2)} {match.group(4)}/s')
    self.stages[self.stage]['end'] = time.time()


def seconds_per_step(step_times: list) -> float | None:
  """Mean seconds between consecutive step lines after the first (which
  includes the compile), or None with fewer than two steps."""
  if len(step_times) < 2:
    return None
  return (step_times[-1] - step_times[0]) / (len(step_times) - 1)


def table(watch: Watch) -> str:
  rows = ['| stage | wall | s/step after the first | passes (images/s) | '
          'peak RSS of the tree |', '|---|---:|---:|---|---:|']
  for name, entry in watch.stages.items():
    seconds = seconds_per_step(entry['steps'])
    per_step = '-' if seconds is None else f'{seconds:.1f}'
    rows.append(f'| {name} | {entry["end"] - entry["start"]:.0f} s | '
                f'{per_step} | {", ".join(entry["passes"]) or "-"} | '
                f'{entry["peak"] / 2**30:.2f} GiB |')
  return '\n'.join(rows)


def main(argv):
  del argv
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  data_dir = fake_downloads.built_fake_recipe_data(
      workdir, _SOURCE_IMAGES.value, _TARGET_IMAGES.value, _VAL_IMAGES.value,
      log=lambda line: print(line, flush=True))
  run_dir = os.path.join(workdir, 'run')
  weights = (stand_in_weights(os.path.join(workdir, 'weights'), _MODEL.value,
                              _BASE_WIDTH.value) if _STAND_IN.value else '')
  if _FRESH.value:
    shutil.rmtree(run_dir, ignore_errors=True)
  env = dict(os.environ)   # importing spcl_jax added the default flag
  if not _DEFAULT_FLAG.value:
    (name,) = xla_flags.DEFAULTS   # '--name=' (empty) turns it off
    env['XLA_FLAGS'] = (xla_flags.without(env.get('XLA_FLAGS', ''), name)
                        + f' --{name}=').strip()
  command = [sys.executable, '-m', 'spcl_jax.main',
             '--config=configs/gta5.py', f'--workdir={run_dir}',
             *run_overrides(data_dir, weights)]
  print(' '.join(command), flush=True)
  process = subprocess.Popen(
      command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
      env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(
          __file__))))
  watch = Watch(process)
  sampler = threading.Thread(target=watch.sample, daemon=True)
  sampler.start()
  watch.read()
  process.wait()
  sampler.join()
  print(f'\n{_MODEL.value} (base width {_BASE_WIDTH.value}), '
        f'{_STEPS.value} steps a stage, XLA:CPU default flag '
        f'{"on" if _DEFAULT_FLAG.value else "off"}:\n{table(watch)}\n'
        f'peak RSS of the process tree: {watch.peak / 2**30:.2f} GiB')
  if process.returncode:
    print(f'error: the run exited with status {process.returncode}',
          file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main, flags_parser=functools.partial(flag_errors.parse_flags,
                                               config_flags=()))
