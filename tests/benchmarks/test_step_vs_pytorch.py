"""The step benchmark prints, for every training step, a table of finite
positive numbers for ours and PyTorch's step at a tiny size; the
accelerator check refuses a machine without a GPU or TPU at once.

Both run as programs (subprocesses): `benchmarks.step_vs_pytorch` shares
`--config` with `benchmarks.memory`, which `benchmarks.ablation` defines
too, so neither is imported here. `accelerator_check.sh --cpu-dry-run` (all
six cases plus the input pipeline, several minutes on 2 CPU cores) has no
test; the test below covers its step benchmark's tables.
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
STAGES = ('spcl', 'warmup', 'self_training')
ROWS = ('compile s', 'first call s', 's/step', 'images/s',
        'GFLOP/step (XLA)', 'TFLOP/s', 'MFU %', 'peak GiB (compiled)',
        'peak GiB (allocator)')
# The cells that hold a number on a CPU (ours, PyTorch, ours/PyTorch): no
# peak to take MFU against, no allocator that counts its peak.
NUMBERS = {'compile s': (True, False, False),
           'first call s': (True, True, True),
           's/step': (True, True, True), 'images/s': (True, True, True),
           'GFLOP/step (XLA)': (True, False, False),
           'TFLOP/s': (True, True, True), 'MFU %': (False, False, False),
           'peak GiB (compiled)': (True, False, False),
           'peak GiB (allocator)': (False, False, False)}


def _env():
  """One CPU device (not the tests' 8), no GPU for either framework, and
  XLA without LLVM optimisation: the test reads the tables, not the speed."""
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': '',
          'TF_CPP_MIN_LOG_LEVEL': '2',
          'XLA_FLAGS': '--xla_backend_optimization_level=0'}


def _tables(stdout: str) -> dict:
  """{stage: {row: [ours, PyTorch, ratio]}} of the printed case tables."""
  tables, current = {}, None
  for line in stdout.splitlines():
    if line.startswith('== '):
      current = tables.setdefault(line.split()[1], {})
    elif current is not None and line[:22].strip() in ROWS:
      current[line[:22].strip()] = line[22:].split()
  return tables


def test_every_stage_prints_a_table_of_finite_positive_numbers(tmp_path):
  output = tmp_path / 'steps.json'
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.step_vs_pytorch',
       f'--stage={",".join(STAGES)}', '--dtype=float32',
       '--model=deeplabv2_resnet18', '--height=32', '--width=64', '--batch=1',
       '--steps=1', '--untimed_steps=1', f'--output={output}'],
      cwd=ROOT, env=_env(), capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  tables = _tables(result.stdout)
  assert sorted(tables) == sorted(STAGES), result.stdout
  for stage, table in tables.items():
    assert tuple(table) == ROWS, (stage, result.stdout)
    for row, cells in table.items():
      assert len(cells) == 3, (stage, row, cells)
      for cell, is_number in zip(cells, NUMBERS[row]):
        if is_number:
          value = float(cell)
          assert math.isfinite(value) and value > 0, (stage, row, cells)
        else:
          assert cell == '-', (stage, row, cells)
  assert 'summary' in result.stdout  # several cases: one row each

  results = {r['stage']: r for r in json.loads(output.read_text())}
  assert sorted(results) == sorted(STAGES)
  for stage, r in results.items():
    # B source + B target images (warm-up, SPCL), B target (self-training)
    assert r['images'] == (1 if stage == 'self_training' else 2)
    assert r['batch_sizes'] == ('1' if stage == 'self_training' else '1+1')
    ours, theirs, ratio = r['table']['s/step']
    assert ratio == ours / theirs
    assert r['table']['images/s'][0] * ours == pytest.approx(r['images'])
    gflop = r['table']['GFLOP/step (XLA)'][0]
    assert abs(r['table']['TFLOP/s'][0] * 1e3 * ours - gflop) <= 1e-6 * gflop


def test_accelerator_check_stops_without_an_accelerator():
  result = subprocess.run(
      ['bash', os.path.join(ROOT, 'benchmarks', 'accelerator_check.sh')],
      cwd=ROOT, env=_env(), capture_output=True, text=True, check=False,
      timeout=120)
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert 'no GPU or TPU' in result.stderr
  assert '--cpu-dry-run' in result.stderr
  assert not result.stdout.strip()  # nothing ran


def test_segformer_self_training_step_beside_transformers():
  """SegFormer (the demo's MiT, the recipe's AdamW) against transformers'
  model in the self-training step; a stage without a PyTorch SegFormer side
  is refused by name."""
  def run(*extra):
    return subprocess.run(
        [sys.executable, '-m', 'benchmarks.step_vs_pytorch', '--dtype=float32',
         '--model=segformer_mit_demo', '--height=32', '--width=64', '--batch=1',
         '--steps=1', '--untimed_steps=1', *extra],
        cwd=ROOT, env=_env(), capture_output=True, text=True, check=False)
  result = run('--stage=self_training')
  assert result.returncode == 0, result.stderr[-4000:]
  table = _tables(result.stdout)['self_training']
  for row in ('s/step', 'images/s', 'TFLOP/s'):
    assert all(math.isfinite(float(c)) and float(c) > 0 for c in table[row])
  refused = run('--stage=spcl', '--jax=false')
  assert refused.returncode != 0
  assert ('PyTorch spcl float32: ValueError: the PyTorch SegFormer reference '
          'is the self-training step') in refused.stdout
