r"""Our training step with spcl_jax's default XLA flags (`spcl_jax.xla_flags`)
and with each of them turned off, beside the PyTorch reference step, in one
run:

  taskset -c 1 python -m benchmarks.xla_flag_ablation           # SPCL, 128x256
  python -m benchmarks.xla_flag_ablation --stage=warmup --batch=2

XLA reads its flags once per process, so every setting runs
`benchmarks.step_vs_pytorch` in a child process of its own (the defaults
with the PyTorch step; each flag off without it) and this prints their
seconds per step side by side: ours, PyTorch and ours/PyTorch. On a 2-core
machine pin the run to one core (`taskset`, inherited by the children):
PyTorch's threads slow down badly when the cores are shared.
"""

import json
import os
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

from spcl_jax.infra import xla_flags

# step_vs_pytorch's flags that make the case, passed on as given
CASE_FLAGS = ('stage', 'dtype', 'height', 'width', 'batch', 'steps')


def settings(environ_flags: str):
  """(name, XLA_FLAGS, run PyTorch) of every setting: the defaults, then
  each default flag turned off (set to an empty value). `environ_flags` is
  this process's XLA_FLAGS (importing spcl_jax has added the defaults)."""
  yield 'defaults', xla_flags.with_defaults(environ_flags), True
  for name in xla_flags.DEFAULTS:
    off = f'{xla_flags.without(environ_flags, name)} --{name}='.strip()
    yield f'--{name}=', xla_flags.with_defaults(off), False


def case_flags() -> list:
  """The flags of this run's case, passed on to step_vs_pytorch."""
  return [f'--{name}={flags.FLAGS[name].value}' for name in CASE_FLAGS]


def run_setting(xla_flags_value: str, torch: bool, output: str) -> dict:
  """step_vs_pytorch's one case under `xla_flags_value`."""
  command = [sys.executable, '-m', 'benchmarks.step_vs_pytorch',
             *case_flags(), f'--output={output}',
             '--torch' if torch else '--notorch']
  env = {**os.environ, 'XLA_FLAGS': xla_flags_value}
  subprocess.run(command, env=env, check=True,
                 cwd=os.path.dirname(os.path.dirname(__file__)))
  with open(output, encoding='utf-8') as f:
    return json.load(f)[0]


def main(argv):
  del argv
  environ_flags = os.environ.get('XLA_FLAGS', '')
  rows, torch_s = [], None
  with tempfile.TemporaryDirectory() as tmp:
    for index, (name, value, torch) in enumerate(settings(environ_flags)):
      result = run_setting(value, torch, os.path.join(tmp, f'{index}.json'))
      ours_s = result['ours']['step_s']
      if torch:
        torch_s = result['torch']['step_s']
      rows.append((name, value, ours_s, result['ours']['compile_s']))
  print(f"\n{' '.join(case_flags())}: seconds per step (PyTorch "
        f'{torch_s:.3f} s)')
  print(f"{'setting':<48}{'compile s':>10}{'ours s':>9}{'ours/PyTorch':>14}")
  for name, value, ours_s, compile_s in rows:
    print(f'{name:<48}{compile_s:>10.1f}{ours_s:>9.3f}'
          f'{ours_s / torch_s:>14.2f}')
    print(f'  XLA_FLAGS={value!r}')


if __name__ == '__main__':
  # defined here, not on import: step_vs_pytorch and other benchmarks
  # define the same names (the tests import this module beside them)
  flags.DEFINE_string('stage', 'spcl', 'warmup | spcl | self_training')
  flags.DEFINE_string('dtype', 'float32', 'float32 | bfloat16')
  flags.DEFINE_integer('height', 128, 'image height')
  flags.DEFINE_integer('width', 256, 'image width')
  flags.DEFINE_integer('batch', 1, 'images per domain per step')
  flags.DEFINE_integer('steps', 3, 'timed steps')
  app.run(main)
