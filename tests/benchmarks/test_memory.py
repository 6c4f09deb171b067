"""benchmarks.memory --topology: a table of per-chip numbers from libtpu's
compiler; a topology libtpu refuses, or a global batch that does not split
over the chips, is one `error:` line naming the value and what works."""

import os
import re
import subprocess
import sys

import pytest

from benchmarks import memory
from configs import demo
from spcl_jax.infra import platforms

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
# TensorFlow's and XLA's native lines (printed at import), not the command's
_NATIVE_LINE = re.compile(r'[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\] |WARNING: All '
                          r'log messages before absl::InitializeLog')
needs_libtpu = pytest.mark.skipif(
    not platforms.libtpu_installed(),
    reason='libtpu is not installed (pip install -r '
           'requirements-tpu-compile.txt; CI installs it)')


def _memory(*args):
  return subprocess.run(
      [sys.executable, '-m', 'benchmarks.memory',
       '--config=configs/demo.py:smoke', *args],
      cwd=ROOT, capture_output=True, text=True, check=False,
      env={**os.environ, 'XLA_FLAGS': ''})


def _error_line(result) -> str:
  assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
  lines = [line for line in result.stderr.splitlines()
           if line.strip() and not _NATIVE_LINE.match(line)]
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  return lines[0]


def test_batch_scale_that_splits_every_batch():
  config = demo.get_config('smoke')   # batches of 8
  stages = ('warmup', 'spcl', 'self_training')
  assert memory.scale_that_splits(config, stages, 4) == 1
  assert memory.scale_that_splits(config, stages, 16) == 2
  config.unlock()
  config.stages.spcl.target_batch_size = 6
  assert memory.scale_that_splits(config, stages, 16) == 8
  scaled = memory.scaled(config, 8)
  assert (scaled.stages.spcl.target_batch_size,
          scaled.stages.warmup.source_batch_size,
          scaled.stages.self_training.source_batch_size) == (48, 64, 0)


@needs_libtpu
def test_an_unknown_topology_is_one_line_naming_what_works():
  line = _error_line(_memory('--topology=v9:2x2'))
  assert line.startswith('error: --topology=v9:2x2: not a TPU topology '
                         'libtpu compiles for'), line
  assert 'v5e:2x2, v5e:4x4, v4:2x2x2' in line, line


@needs_libtpu
def test_a_batch_that_does_not_split_over_the_chips_names_the_scale():
  line = _error_line(_memory('--topology=v5e:4x4'))
  assert line == (
      'error: --topology=v5e:4x4: the global batch '
      'stages.warmup.source_batch_size = 8 does not split over its 16 chips '
      '(nor do 4 other batch sizes); use multiples of 16, e.g. '
      '--batch_scale=2'), line


@needs_libtpu
def test_the_table_of_a_topology(tmp_path):
  result = _memory('--topology=v5e:2x2', '--stages=self_training',
                   '--config.model.base_width=4',
                   '--config.stages.self_training.crop_size=16,32',
                   f'--cache_dir={tmp_path}')
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert lines[0].startswith('deeplabv2_resnet18 on v5e:2x2 (4 chips of TPU '
                             'v5 lite, 16 GiB HBM each)'), lines[0]
  rows = [line.split() for line in lines[2:]]
  # the config's setting, bfloat16 + remat at 2 micro-batches (2 crops per
  # chip), at 4 skipped: it does not divide 2
  assert [row[:6] for row in rows] == [
      ['self_training', '8', '2', 'float32', '1', 'none'],
      ['self_training', '8', '2', 'bfloat16', '2', 'blocks'],
      ['self_training', '8', '2', 'bfloat16', '4', 'blocks']]
  for row in rows[:2]:
    gib, tflop = float(row[6]), float(row[7])
    assert 0 < gib < 1 and tflop > 0, row
    assert row[9] == 'yes' and row[10:12] == ['all-reduce', row[11]], row
  assert rows[2][6:8] == ['-', 'skipped:'], rows[2]
  assert len(list(tmp_path.iterdir())) == 2


def test_settings_are_parsed_and_a_bad_one_is_named():
  assert memory.parse_settings(['float32/1/groups', 'bfloat16/4/blocks']) == [
      ('float32', 1, 'groups'), ('bfloat16', 4, 'blocks')]
  config = demo.get_config('smoke')
  chosen = memory.parse_settings(['bfloat16/1/none'])
  assert memory.settings(config, False, chosen) == [('bfloat16', 1, 'none')]
  assert memory.settings(config, True, chosen) == [('bfloat16', 1, 'none')]
  for bad in ('float16/1/none', 'float32/0/none', 'float32/one/none',
              'float32/1/layers', 'float32/1'):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
      memory.parse_settings([bad])


def test_a_bad_setting_is_one_line():
  line = _error_line(_memory('--settings=float32/2/lots'))
  assert line.startswith("error: --settings=float32/2/lots: 'float32/2/lots' "
                         'is not DTYPE/MICRO_BATCHES/REMAT'), line
  assert "REMAT one of none, blocks, groups" in line, line
