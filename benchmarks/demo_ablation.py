r"""τ ablation and equal-budget baseline of the SPCL stage, side by side.

  python -m spcl_jax.main --config=configs/demo.py --workdir=workdirs/demo
  python -m benchmarks.demo_ablation --workdir=workdirs/demo --taus=100,10,1,0.1

Reuses the finished `warmup`, `prototypes` and `pseudo_labels` stages of
`--workdir` and reruns only the `spcl` stage, in a scratch copy per row:
  * one row per τ (`stages.spcl.temperature`);
  * the equal-budget baseline: the same stage with λ = 0 (source
    cross-entropy only, same steps, schedule and data), so that a gain of
    SPCL is measured against as many extra training steps without it.
Prints target_val mIoU (and tail mIoU) per row; `--config` must be the one
the workdir was made with.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'finished demo workdir')
_CONFIG = flags.DEFINE_string('config', 'configs/demo.py', 'its config')
_TAUS = flags.DEFINE_list('taus', ['100', '10', '1', '0.1'], 'τ values')
_EXTRA = flags.DEFINE_multi_string('override', [], 'extra --config.X=Y')

_INPUTS = ('warmup', 'prototypes', 'pseudo_labels')


def run_variant(workdir: str, scratch: str, overrides: list[str]) -> dict:
  for name in _INPUTS:
    shutil.copytree(os.path.join(workdir, name), os.path.join(scratch, name))
  shutil.copy(os.path.join(workdir, 'config.json'), scratch)
  with open(os.path.join(workdir, 'config.json')) as f:
    data_dir = json.load(f)['data']['data_dir']
  subprocess.run([sys.executable, '-m', 'spcl_jax.main',
                  f'--config={_CONFIG.value}:spcl', f'--workdir={scratch}',
                  f'--config.data.data_dir={data_dir}', '--allow_config_change',
                  *overrides, *_EXTRA.value], check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  with open(os.path.join(scratch, 'spcl', 'done.json')) as f:
    return json.load(f)


def main(argv):
  del argv
  workdir = os.path.abspath(_WORKDIR.value)
  for name in _INPUTS:
    if not os.path.exists(os.path.join(workdir, name, 'done.json')):
      raise app.UsageError(f'{workdir} has no finished {name} stage; run the '
                           'demo pipeline first')
  with open(os.path.join(workdir, 'warmup', 'done.json')) as f:
    warmup = json.load(f)
  rows = [('warm-up model (input)', warmup)]
  variants = [(f'SPCL tau={tau}', [f'--config.stages.spcl.temperature={tau}'])
              for tau in _TAUS.value]
  variants.append(('equal budget: lambda=0',
                   ['--config.stages.spcl.contrastive_weight=0.0']))
  for label, overrides in variants:
    with tempfile.TemporaryDirectory() as scratch:
      rows.append((label, run_variant(workdir, scratch, overrides)))
      print(f'{label:26s} mIoU {rows[-1][1]["miou"]:6.2f}', flush=True)
  baseline = rows[-1][1]['miou']
  print(f'\n{"row":26s} {"mIoU":>6s} {"tail":>6s} {"vs equal budget":>16s}')
  for label, result in rows:
    print(f'{label:26s} {result["miou"]:6.2f} {result["tail_miou"]:6.2f} '
          f'{result["miou"] - baseline:+16.2f}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
