"""`python -m spcl_jax.evaluate` on the finished smoke workdir (read only):
the stage's own evaluation reproduced, output files, and bad input."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from spcl_jax import evaluate
from spcl_jax.run import trained_model

ROOT = os.path.dirname(os.path.dirname(__file__))
TRAINING_STAGES = ['warmup', 'spcl', 'self_training']


@pytest.fixture
def reference(smoke_workdir):
  return smoke_workdir


def _same(a, b):
  return a == b or (math.isnan(a) and math.isnan(b))


@pytest.mark.slow
def test_evaluate_reproduces_the_stage_evaluation(reference, tmp_path):
  out = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, '-m', 'spcl_jax.evaluate', f'--workdir={reference}',
       f'--output={out}'], cwd=ROOT, capture_output=True, text=True,
      check=False, env={**os.environ, 'XLA_FLAGS': ''})
  assert result.returncode == 0, result.stderr[-6000:]
  report = json.loads((reference / 'report.json').read_text())
  expected = report['stages']['self_training']   # the last training stage
  metrics = json.loads((out / 'metrics.json').read_text())
  assert metrics['miou'] == expected['miou']      # exactly, at scale 1
  assert metrics['tail_miou'] == expected['tail_miou']
  assert metrics['per_class_iou'].keys() == expected['per_class_iou'].keys()
  assert all(_same(metrics['per_class_iou'][k], v)
             for k, v in expected['per_class_iou'].items())
  config = report['config']
  assert {k: metrics[k] for k in ('stage', 'checkpoint', 'class_set',
                                  'dataset', 'split')} == {
      'stage': 'self_training', 'checkpoint': 'final', 'class_set': 19,
      'dataset': config['data']['target'],
      'split': config['data']['val_split']}
  table = (out / 'table.md').read_text()
  assert table in result.stdout and '| self_training (final) |' in table
  row, = csv.DictReader(open(out / 'table.csv'))
  assert float(row['mIoU']) == round(expected['miou'], 2)
  assert float(row['road']) == round(expected['per_class_iou']['road'], 2)
  assert not os.path.exists(reference / 'self_training' / 'evaluation')


@pytest.mark.slow
def test_stage_choice_lists_the_stages_that_exist(reference, tmp_path):
  assert trained_model.choose_stage(str(reference)) == 'self_training'
  assert trained_model.choose_stage(str(reference), 'warmup') == 'warmup'
  with pytest.raises(trained_model.StageNotAvailableError) as error:
    evaluate.evaluate(str(reference), stage='pseudo_labels')
  assert 'no model' in str(error.value)
  assert str(TRAINING_STAGES) in str(error.value)
  partial = tmp_path / 'partial'
  (partial / 'warmup').mkdir(parents=True)
  (partial / 'config.json').write_text((reference / 'config.json')
                                       .read_text())
  (partial / 'warmup' / 'done.json').write_text('{}')
  with pytest.raises(trained_model.StageNotAvailableError,
                     match=r"'spcl' is not finished.*\['warmup'\]"):
    trained_model.choose_stage(str(partial), 'spcl')
  with pytest.raises(FileNotFoundError, match='config.json'):
    evaluate.evaluate(str(tmp_path / 'nothing'))


@pytest.mark.slow
def test_unwritable_output_fails_before_any_compute(reference, tmp_path,
                                                    monkeypatch):
  def no_compute(*_):
    raise AssertionError('the model was loaded')
  monkeypatch.setattr(trained_model, 'load', no_compute)
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  with pytest.raises(PermissionError,
                     match=f'cannot write to the output directory {blocker}'):
    evaluate.evaluate(str(reference), output=str(blocker / 'out'))
  with pytest.raises(ValueError, match='class set 12'):
    evaluate.evaluate(str(reference), class_sets=(19, 12),
                      output=str(tmp_path / 'o'))
  best = trained_model.model_directory(
      trained_model.context(trained_model.read_config(str(reference)),
                            str(reference), 'best'), 'warmup')
  assert best.startswith(str(reference / 'warmup' / 'best'))
