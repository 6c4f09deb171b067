"""The ablation benchmark: equal budgets, stage sharing only where stages are
identical, paired statistics, bad rows refused before training, resume."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import ablation
from benchmarks import seed_stats
from configs import demo


def _smoke():
  config = demo.get_config('smoke')
  config.lock()
  return config


def _rows(*names):
  return ablation.select_rows(list(names), False, [])


def test_every_row_trains_the_same_budget():
  base = _smoke()
  total = base.stages.warmup.steps + base.stages.spcl.steps + (
      base.stages.self_training.steps)
  assert ablation.budget(base) == total == 12
  rows = ablation.select_rows(None, True, [])
  assert {r.name for r in rows} >= {'source_only', 'warmup_only',
                                    'spcl_source_cl', 'spcl_stage',
                                    'full_spcl', 'self_training_no_cl',
                                    'oracle', 'tau_1', 'update_before_loss'}
  for row in rows:
    config = ablation.row_config(base, row, seed=1)
    assert ablation.row_steps(config, row) == total, row.name
    assert config.seed == base.seed + 1
    for name in ablation.TRAIN_STAGES:  # schedules stretched, never short
      stage = config.stages[name]
      assert stage.steps <= stage.schedule_steps
  source_only = ablation.row_config(base, _rows('source_only')[0], 0)
  assert source_only.stages.warmup.steps == 12
  assert source_only.stages.warmup.adversarial_weight == 0
  # 6-step schedule of a 4-step stage, stretched to 12 steps: 18
  assert source_only.stages.warmup.schedule_steps == 18
  spcl_stage = ablation.row_config(base, _rows('spcl_stage')[0], 0)
  assert (spcl_stage.stages.warmup.steps, spcl_stage.stages.spcl.steps) == (
      4, 8)
  oracle = ablation.row_config(base, _rows('oracle')[0], 0)
  assert oracle.data.source_split == base.data.target_split


def test_stages_are_shared_exactly_where_identical():
  base = _smoke()
  full, no_cl, source_only, spcl_stage = (
      ablation.row_config(base, r, 0) for r in _rows(
          'full_spcl', 'self_training_no_cl', 'source_only', 'spcl_stage'))
  key = ablation.stage_key
  for name in ('warmup', 'prototypes', 'pseudo_labels'):
    assert key(full, name) == key(no_cl, name) == key(spcl_stage, name)
  for name in ('spcl', 'pseudo_labels_2', 'self_training'):
    assert key(full, name) != key(no_cl, name)  # λ differs upstream
  assert key(full, 'spcl') != key(spcl_stage, 'spcl')  # 4 vs 8 steps
  assert key(full, 'warmup') != key(source_only, 'warmup')
  other_seed = ablation.row_config(base, _rows('full_spcl')[0], 1)
  assert key(other_seed, 'warmup') != key(full, 'warmup')
  # a field added later, at its old behaviour's value, is no change
  with full.unlocked():
    full.stages.spcl.optimizer = 'sgd'   # its default: keys as before
  key_before = key(full, 'spcl')
  with full.unlocked():
    del full.stages.spcl['optimizer']
  assert key(full, 'spcl') == key_before
  with full.unlocked():
    full.stages.spcl.optimizer = 'adamw'
  assert key(full, 'spcl') != key_before
  with full.unlocked():
    full.stages.spcl.optimizer = 'sgd'
  # worker count does not change results
  with full.unlocked():
    full.data.worker_count = 7
  assert key(full, 'spcl') == key(ablation.row_config(
      base, _rows('full_spcl')[0], 0), 'spcl')


def test_extra_rows_run_beside_the_named_rows():
  # --rows with --extra_row once ran the named rows only, silently
  extra = ['tau_1_full=full_spcl:stages.spcl.temperature=1.0']
  chosen = ablation.select_rows(['self_training_no_cl'], False, extra)
  assert [r.name for r in chosen] == ['self_training_no_cl', 'tau_1_full']
  assert chosen[1].overrides == {'stages.spcl.temperature': 1.0}
  named = ablation.select_rows(['tau_1_full', 'full_spcl'], False, extra)
  assert [r.name for r in named] == ['tau_1_full', 'full_spcl']
  assert [r.name for r in ablation.select_rows(None, False, extra)][-1] == (
      'tau_1_full')


def test_stage_links_resolve_from_a_relative_workdir(tmp_path, monkeypatch):
  # a relative --workdir once gave links relative to the row's directory,
  # which pointed nowhere and failed the first stage
  monkeypatch.chdir(tmp_path)
  config = ablation.row_config(_smoke(), _rows('full_spcl')[0], 0)
  row_dir = os.path.join('abl', 'rows', 'full_spcl', 'seed0')
  ablation.link_stages(config, row_dir, os.path.join('abl', 'stages'))
  for name in config.stages_to_run:
    link = os.path.join(row_dir, name)
    assert os.path.isdir(link), name
    assert os.path.realpath(link) == str(
        tmp_path / 'abl' / 'stages' / ablation.stage_key(config, name))
  ablation.link_stages(config, row_dir, os.path.join('abl', 'stages'))


def test_paired_difference_and_summary_by_hand():
  d = seed_stats.paired_difference([31.0, 33.0, 35.0], [30.0, 30.0, 30.0])
  assert d['mean'] == pytest.approx(3.0)
  # differences 1, 3, 5: std 2, se 2 / sqrt(3)
  assert d['se'] == pytest.approx(2 / 3 ** 0.5)
  assert seed_stats.paired_difference([1.0], [0.0])['se'] is None
  rows = _rows('source_only', 'full_spcl', 'self_training_no_cl', 'oracle')
  per_class = {'road': 1.0}
  results = {}
  for name, values in (('source_only', (30, 32)), ('full_spcl', (40, 44)),
                       ('self_training_no_cl', (38, 40)),
                       ('oracle', (50, 52))):
    for seed, v in enumerate(values):
      results[name, seed] = {'miou': v, 'tail_miou': v / 2,
                             'per_class_iou': per_class, 'curve': []}
  table = ablation.summarize(rows, results, {r.name: 12 for r in rows})
  full = table['full_spcl']
  assert full['miou_mean'] == 42 and full['miou_std'] == pytest.approx(
      2 * 2 ** 0.5)
  assert full['vs_source_only']['mean'] == pytest.approx(11)
  assert full['vs_baseline']['mean'] == pytest.approx(3)  # vs no-L_cl twin
  assert full['gap_closed'] == pytest.approx(11 / 20)
  text = ablation.markdown(table, {'config': 'c', 'seeds': 2, 'budget': 12,
                                   'wall_time_s': 60, 'machine': 'm'})
  assert '| full_spcl |' in text and '+11.0 ± 1.0' in text


def test_bad_rows_fail_before_training(tiny_demo, tmp_path):
  base = _smoke()
  with base.unlocked():
    base.data.data_dir = tiny_demo
  typo = ablation.select_rows(
      ['spcl_stage'], False, ['tau_x=spcl_stage:stages.spcl.temprature=1.0'])
  with pytest.raises(ValueError, match=r"(?s)row 'tau_x'.*temprature"):
    ablation.run_ablation(base, str(tmp_path / 'a'), 1,
                          ablation.select_rows(['tau_x'], False, [
                              'tau_x=spcl_stage:stages.spcl.temprature=1.0']))
  assert typo and not (tmp_path / 'a').exists()
  bad_value = ablation.select_rows(
      ['m'], False, ["m=spcl_stage:stages.spcl.target_mask='both'"])
  with pytest.raises(ValueError, match=r"(?s)row 'm'.*target_mask"):
    ablation.check_rows(base, bad_value, 1)
  with pytest.raises(ValueError, match='unknown rows'):
    ablation.select_rows(['sorce_only'], False, [])
  with pytest.raises(ValueError, match='NAME=BASE_ROW'):
    ablation.select_rows(None, False, ['x=nothing:a=1'])
  missing = base.copy_and_resolve_references()
  with missing.unlocked():
    missing.data.data_dir = str(tmp_path / 'empty')
    missing.data.build_if_missing = False
  with pytest.raises(ValueError, match=r"(?s)source_only.*not built"):
    ablation.check_rows(missing, _rows('source_only'), 1)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))

# `ablation.run_ablation` of the smoke config in a process of its own;
# argv: data_dir, workdir, comma-separated rows, where to write the table
# it returns (JSON).
_RUN_ABLATION = """
import json, sys
from benchmarks import ablation
from configs import demo
data_dir, workdir, rows, out = sys.argv[1:]
base = demo.get_config('smoke')
base.data.data_dir = data_dir
base.lock()
table = ablation.run_ablation(base, workdir, 1, ablation.select_rows(
    rows.split(','), False, []), 'smoke')
with open(out, 'w') as f:
  json.dump(table, f)
"""


def _run_ablation(data_dir, workdir, rows, out):
  """`ablation.run_ablation(smoke, workdir, 1, rows)`'s returned table, run
  on one CPU device (XLA_FLAGS cleared) as the pipeline tests' smoke runs
  and docs/commands.md's `python -m benchmarks.ablation` are: its programs are
  then the same as theirs, compiled once per session (the compilation cache
  of conftest.py), not once more for 8 simulated devices."""
  result = subprocess.run(
      [sys.executable, '-c', _RUN_ABLATION, data_dir, str(workdir),
       ','.join(r.name for r in rows), str(out)],
      cwd=ROOT, capture_output=True, text=True, check=False,
      env={**os.environ, 'XLA_FLAGS': ''})
  assert result.returncode == 0, result.stderr[-6000:]
  return json.loads(out.read_text())


@pytest.mark.slow
def test_smoke_ablation_writes_tables_and_resumes(tiny_demo, tmp_path,
                                                  tmp_path_factory):
  rows = _rows('source_only', 'full_spcl', 'self_training_no_cl', 'oracle',
               'self_training_true_labels', 'self_training_correct_pseudo_labels')
  out = tmp_path_factory.mktemp('ablation_table') / 'table.json'
  table = _run_ablation(tiny_demo, tmp_path, rows, out)
  written = json.loads((tmp_path / 'ablation.json').read_text())
  assert list(written['rows']) == [r.name for r in rows]
  for name, entry in written['rows'].items():
    assert entry['steps'] == 12 and len(entry['mious']) == 1
    assert 0 <= entry['miou_mean'] <= 100
    assert entry['per_class_iou_mean']
    assert entry['curves'][0][-1][0] == 12  # last evaluation at the budget
  assert table['full_spcl']['miou_mean'] == written['rows']['full_spcl'][
      'miou_mean']
  assert '| oracle |' in (tmp_path / 'ablation.md').read_text()
  # the two pipelines that differ only in λ share their first three stages
  stores = sorted(os.listdir(tmp_path / 'stages'))
  assert sum(s.startswith('warmup-') for s in stores) == 3  # so, full, oracle
  assert sum(s.startswith('spcl-') for s in stores) == 2
  assert sum(s.startswith('pseudo_labels_2-') for s in stores) == 4
  # the diagnostic row's self-training read the stored labels: perfect
  # pseudo labels, every labelled pixel covered
  true_labels = json.loads((tmp_path / 'rows' / 'self_training_true_labels' /
                            'seed0' / 'pseudo_labels_2' / 'done.json'
                            ).read_text())
  assert true_labels['labels_from'] == 'stored'
  assert true_labels['pseudo_label_pixel_precision'] == 100.0
  assert all(v in (None, 100.0) for v in true_labels[
      'pseudo_label_class_coverage'].values())
  model = json.loads((tmp_path / 'rows' / 'full_spcl' / 'seed0' /
                      'pseudo_labels_2' / 'done.json').read_text())
  assert model['labels_from'] == 'model'
  assert set(model['pseudo_label_precision']) == set(true_labels[
      'pseudo_label_precision'])
  # the model's right labels only: what it kept, less its errors
  correct = json.loads((tmp_path / 'rows' /
                        'self_training_correct_pseudo_labels' / 'seed0' /
                        'pseudo_labels_2' / 'done.json').read_text())
  assert correct['labels_from'] == 'model_where_correct'
  assert correct['pseudo_label_pixel_precision'] == 100.0
  # every right label of the model kept, so per-class recall is unchanged
  assert correct['pseudo_label_recall'] == model['pseudo_label_recall']
  assert correct['pseudo_label_coverage'] < model['pseudo_label_coverage']
  done = {s: os.path.getmtime(tmp_path / 'stages' / s / 'done.json')
          for s in stores}
  # rerun: every row is finished, nothing retrains
  again = _run_ablation(tiny_demo, tmp_path, rows, out)
  assert again['oracle']['mious'] == table['oracle']['mious']
  assert done == {s: os.path.getmtime(tmp_path / 'stages' / s / 'done.json')
                  for s in stores}
