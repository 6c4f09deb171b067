"""Later self-training rounds: their wiring, the seeds of the pipeline's
own stages kept, the statistics by hand, bad quantiles refused, and one
smoke run whose first six stages are the plain pipeline's."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import self_training_rounds as rounds
from configs import demo
from spcl_jax.run import config_checks
from spcl_jax.run import context
from spcl_jax.run import pipeline
from spcl_jax.run import stage_graph

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def test_round2_reads_the_self_trained_model_and_the_control_round1_labels():
  labels, train, control = rounds.extra_stages([0.8])
  assert (labels.name, labels.kind, labels.model_from) == (
      'pseudo_labels_round2_q80', 'pseudo_labels', 'self_training')
  assert (train.kind, train.step, train.model_from, train.pseudo_labels_from
          ) == ('train', 'self_training', 'self_training', labels.name)
  assert (control.name, control.model_from, control.pseudo_labels_from) == (
      'self_training_more_steps', 'self_training', 'pseudo_labels_2')


def test_seed_config_adds_a_block_per_extra_stage():
  base = demo.get_config('smoke')
  base.lock()
  config = rounds.seed_config(base, [0.8, 0.5], seed=2)
  assert config.seed == base.seed + 2
  stages = stage_graph.STAGES + rounds.extra_stages([0.8, 0.5])
  assert config.stages_to_run == tuple(s.name for s in stages)
  for tag, quantile in (('q80', 0.8), ('q50', 0.5)):
    labels = config.stages[f'pseudo_labels_round2_{tag}']
    assert (labels.threshold_quantile, labels.threshold_cap) == (quantile, 1.0)
    assert labels.batch_size == base.stages.pseudo_labels_2.batch_size
    assert (config.stages[f'self_training_round2_{tag}'].to_dict()
            == base.stages.self_training.to_dict())
  assert config.stages.pseudo_labels_2.to_dict() == (
      base.stages.pseudo_labels_2.to_dict())   # round 1 untouched
  config_checks.validate(config, num_devices=8, stages=stages)
  with pytest.raises(ValueError, match='unknown stage'):
    config_checks.validate(config, num_devices=8)   # without the extra stages
  plain = demo.get_config('smoke')   # no blocks for the extra stages
  with pytest.raises(ValueError, match=r"no block stages.<name> for the "
                     r"stages \['pseudo_labels_round2_q80', "):
    config_checks.validate(plain, num_devices=8, stages=stages)


def test_extra_stages_keep_the_seeds_of_the_pipeline_stages():
  stages = stage_graph.STAGES + rounds.extra_stages([0.8])
  for seed in (0, 7, 2 ** 31 - 1):
    for stage in stage_graph.STAGES:
      for stream in context.SEED_STREAMS:
        assert context.stream_seed(seed, stage.name, stream, stages) == (
            context.stream_seed(seed, stage.name, stream))
    every = {context.stream_seed(seed, s.name, stream, stages)
             for s in stages for stream in context.SEED_STREAMS}
    assert len(every) == len(stages) * len(context.SEED_STREAMS)


def test_run_refuses_stages_that_do_not_begin_with_the_pipeline(tmp_path):
  config = demo.get_config('smoke')
  with pytest.raises(ValueError, match='begin with stage_graph.STAGES'):
    pipeline.run(config, str(tmp_path), stages=stage_graph.STAGES[1:])
  assert not os.listdir(tmp_path)


def test_summary_by_hand():
  per_seed = [{'miou': {'self_training': 40.0,
                        'self_training_round2_q80': 42.0,
                        'self_training_more_steps': 41.0}},
              {'miou': {'self_training': 44.0,
                        'self_training_round2_q80': 45.0,
                        'self_training_more_steps': 45.0}}]
  rows = rounds.summarize(per_seed, [0.8])
  assert list(rows) == ['self_training', 'self_training_round2_q80',
                        'self_training_more_steps']
  round2 = rows['self_training_round2_q80']
  assert round2['miou_mean'] == pytest.approx(43.5)
  assert round2['miou_std'] == pytest.approx(2.1213203)   # sd of 42, 45
  # differences 2, 1: mean 1.5, sd 0.7071, se 0.5
  assert round2['vs_round1'] == pytest.approx({'mean': 1.5, 'se': 0.5})
  # differences 1, 0: mean 0.5, se 0.5
  assert round2['vs_more_steps'] == pytest.approx({'mean': 0.5, 'se': 0.5})
  assert 'vs_more_steps' not in rows['self_training_more_steps']
  assert '| self_training_round2_q80 | 42.0 / 45.0 | 43.5 ± 2.1 | +1.5 ± 0.5 ' \
      '| +0.5 ± 0.5 |' in rounds.markdown(rows)


@pytest.mark.parametrize('values, message', [
    (['1.5'], "'1.5' is not a fraction"), (['x'], "'x' is not a fraction"),
    (['0'], "'0' is not a fraction"),
    (['0.8', '0.80'], 'repeats a value')])
def test_bad_quantiles_are_refused(values, message):
  with pytest.raises(ValueError, match=message):
    rounds.parse_quantiles(values)


@pytest.mark.slow
def test_smoke_rounds_extend_the_plain_pipeline(smoke_workdir, tiny_demo,
                                                tmp_path):
  """One seed of the smoke config, on one CPU device like the shared smoke
  run: its first six stages are that run's (the same seeds), and round 2
  read labels made by the self-trained model, not round 1's."""
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.self_training_rounds',
       '--config=configs/demo.py:smoke', f'--workdir={tmp_path}', '--seeds=1',
       '--quantiles=0.8', f'--config.data.data_dir={tiny_demo}'],
      cwd=ROOT, capture_output=True, text=True, check=False,
      env={**os.environ, 'XLA_FLAGS': ''})
  assert result.returncode == 0, result.stderr[-6000:]
  assert '| self_training_round2_q80 |' in result.stdout
  written = json.loads((tmp_path / 'rounds.json').read_text())
  assert list(written['rows']) == ['self_training',
                                   'self_training_round2_q80',
                                   'self_training_more_steps']
  report = json.loads((tmp_path / 'seed_0' / 'report.json').read_text())
  plain = json.loads(open(os.path.join(smoke_workdir, 'report.json')).read())
  for stage in stage_graph.STAGES:
    assert report['stages'][stage.name]['miou'] == plain['stages'][
        stage.name]['miou'], stage.name
  assert written['rows']['self_training']['mious'] == [
      plain['stages']['self_training']['miou']]
  round2 = report['stages']['pseudo_labels_round2_q80']
  assert round2['model_from'] == 'self_training'
  assert round2['miou'] == plain['stages']['self_training']['miou']
  assert round2['class_thresholds'] != report['stages']['pseudo_labels_2'][
      'class_thresholds']
  for name in ('self_training_round2_q80', 'self_training_more_steps'):
    assert report['stages'][name]['steps'] == (
        demo.get_config('smoke').stages.self_training.steps)
