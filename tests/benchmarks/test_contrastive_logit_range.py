"""The logit-range benchmark: on a narrow network, every contrastive logit
lies within 1/τ, every prototype has norm <= 1 and every pixel's L_cl lies
within 2/τ of ln C, for τ = 100, 1 and 0.1 (the bounds that make L_cl
inert at the released τ = 100). Run as a program: its flags are defined
on import."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def test_logits_prototypes_and_loss_within_their_bounds(tmp_path):
  output = tmp_path / 'rows.json'
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.contrastive_logit_range',
       '--model=deeplabv2_resnet18', '--base_width=8', '--height=64',
       '--width=128', '--target_height=48', '--target_width=96',
       f'--weights_dir={tmp_path}', f'--output={output}'],
      cwd=ROOT, capture_output=True, text=True, check=False,
      env={**os.environ, 'XLA_FLAGS': ''})
  assert result.returncode == 0, result.stderr[-4000:]
  rows = json.loads(output.read_text())
  assert [r['temperature'] for r in rows] == [100.0, 1.0, 0.1]
  for r in rows:
    assert r['pixels'] == 8 * 16 + 6 * 12
    assert -r['bound'] - 1e-6 <= r['logit_min'] < r['logit_max'] <= (
        r['bound'] + 1e-6), r
    assert r['prototype_norm_max'] <= 1 + 1e-6
    assert r['ln_c'] == math.log(19)
    for loss in (r['loss_min'], r['loss_max']):
      assert abs(loss - r['ln_c']) <= r['loss_bound'] + 1e-5, r
  # the same logits scaled: τ = 0.1 spreads them 1000x as far as τ = 100
  spread = [r['logit_max'] - r['logit_min'] for r in rows]
  assert math.isclose(spread[2] / spread[0], 1000, rel_tol=1e-3)
  assert 'logit min' in result.stdout
