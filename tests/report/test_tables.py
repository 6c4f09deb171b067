"""Paper-style per-class IoU tables from a hand-made confusion matrix, and
the pipeline's per-stage lines and tables (spcl_jax.report.stage_lines)."""

import csv
import io

import numpy as np

from spcl_jax.core import labels as label_table
from spcl_jax.core import metrics
from spcl_jax.report import stage_lines
from spcl_jax.report import tables

ROAD, SIDEWALK, WALL, FENCE = (label_table.CLASS_NAMES.index(n) for n in
                               ('road', 'sidewalk', 'wall', 'fence'))


def _confusion():
  """road 6 right, 2 as sidewalk; sidewalk 2 right; wall 1 right, 3 as
  fence: IoU road 6/8, sidewalk 2/4, wall 1/4, fence 0/3; others absent."""
  confusion = np.zeros((19, 19), np.int64)
  confusion[ROAD, ROAD], confusion[ROAD, SIDEWALK] = 6, 2
  confusion[SIDEWALK, SIDEWALK] = 2
  confusion[WALL, WALL], confusion[WALL, FENCE] = 1, 3
  return confusion


def test_known_confusion_gives_known_markdown_and_csv_cells():
  entry = metrics.summarize_sets(_confusion(), (19, 16, 13))
  md = tables.markdown({'model A': entry})
  header, rule, row = md.strip().split('\n')
  names = [c.strip() for c in header.strip('|').split('|')]
  assert names[:6] == ['model', 'road', 'sidewalk', 'building', 'wall',
                       'fence']
  assert names[1:20] == list(label_table.CLASS_NAMES)   # the paper's order
  assert names[20:] == ['mIoU (19)', 'tail mIoU (19)', 'mIoU (16)',
                        'tail mIoU (16)', 'mIoU (13)', 'tail mIoU (13)']
  assert rule.count('---') == len(names)
  cells = dict(zip(names, (c.strip() for c in row.strip('|').split('|'))))
  assert cells['model'] == 'model A'
  assert (cells['road'], cells['sidewalk'], cells['wall'],
          cells['fence']) == ('75.0', '50.0', '25.0', '0.0')
  assert cells['building'] == cells['bicycle'] == '-'   # absent: NaN
  # (75 + 50 + 25 + 0) / 4; tail: wall, fence; the 13-class set has no
  # wall / fence: (75 + 50) / 2 and no tail class with a value
  assert (cells['mIoU (19)'], cells['tail mIoU (19)']) == ('37.5', '12.5')
  assert (cells['mIoU (16)'], cells['tail mIoU (16)']) == ('37.5', '12.5')
  assert (cells['mIoU (13)'], cells['tail mIoU (13)']) == ('62.5', '-')

  rows = list(csv.DictReader(io.StringIO(tables.csv_text({'model A':
                                                          entry}))))
  assert len(rows) == 1
  assert rows[0]['model'] == 'model A'
  assert rows[0]['road'] == '75.00' and rows[0]['wall'] == '25.00'
  assert rows[0]['fence'] == '0.00' and rows[0]['building'] == ''
  assert rows[0]['mIoU (13)'] == '62.50' and rows[0]['tail mIoU (13)'] == ''


def test_single_class_set_rows_and_subset_columns(tmp_path):
  a = metrics.summarize(_confusion(), 19)
  b = metrics.summarize(np.eye(19, dtype=np.int64), 13)
  header, rows = tables.table({'a': a, 'b': b}, 'stage')
  assert header[0] == 'stage' and header[-4:] == [
      'mIoU (19)', 'tail mIoU (19)', 'mIoU (13)', 'tail mIoU (13)']
  assert rows[1][header.index('wall')] is None   # b: 13 classes, no wall
  assert rows[1][header.index('mIoU (13)')] == 100.0
  assert rows[1][header.index('mIoU (19)')] is None
  only = tables.markdown({'a': a})
  assert only.split('\n')[0].endswith('| mIoU | tail mIoU |')
  md_path, csv_path = tables.write(str(tmp_path), {'a': a})
  assert open(md_path).read() == only
  assert open(csv_path).read() == tables.csv_text({'a': a})


def test_stage_lines_report_what_each_stage_made():
  train = {**metrics.summarize(_confusion(), 19), 'best_step': 4,
           'best_miou': 40.0}
  assert stage_lines.stage_line('train', 'warmup', train) == (
      'warmup: mIoU 37.50, tail mIoU 12.50 (19 classes), best 40.00 at '
      'step 4')
  inherited = {**train, 'model_from': 'warmup'}   # what such stages carry
  prototypes = {**inherited, 'classes_with_prototype': 4,
                'images_per_class': dict.fromkeys(label_table.CLASS_NAMES, 1)}
  line = stage_lines.stage_line('prototypes', 'prototypes', prototypes)
  assert 'mIoU' not in line and '4 of 19 classes' in line
  pseudo = {**inherited, 'labels_from': 'model',
            'class_thresholds': [0.5, 0.9, 0.7],
            'pseudo_label_coverage': 0.25,
            'pseudo_label_class_coverage': {'road': 80.0},
            'pseudo_label_pixel_precision': 91.0}
  line = stage_lines.stage_line('pseudo_labels', 'pseudo_labels', pseudo)
  assert 'mIoU' not in line
  assert '25.0 % of the target pixels' in line and '0.500..0.900' in line
  assert 'pixel precision 91.0 %' in line
  assert '(median 0.700) of the 3 classes predicted' in line
  assert 'never predicted' not in line
  # classes never predicted (threshold 0) are counted, not summarised
  sparse = {**pseudo, 'class_thresholds': [0.0, 0.6, 0.8, 0.0, 0.75],
            'predicted_pixels': {'road': 0, 'sidewalk': 5, 'building': 9,
                                 'wall': 0, 'fence': 3}}
  line = stage_lines.stage_line('pseudo_labels', 'pseudo_labels', sparse)
  assert ('class thresholds 0.600..0.800 (median 0.750) of the 3 classes '
          'predicted, 2 never predicted') in line, line
  # a report written before the pixel counts: threshold 0 = never predicted
  del sparse['predicted_pixels']
  assert stage_lines.stage_line('pseudo_labels', 'p', sparse) == line.replace(
      'pseudo_labels:', 'p:', 1)
  none = {**sparse, 'class_thresholds': [0.0] * 3}
  assert 'no class predicted' in stage_lines.stage_line('pseudo_labels', 'p',
                                                        none)
  no_labels = {**pseudo, 'pseudo_label_class_coverage': {'road': None}}
  assert 'precision' not in stage_lines.stage_line('pseudo_labels', 'p',
                                                   no_labels)
  table = stage_lines.evaluated_stages_table(
      {'warmup': train, 'prototypes': prototypes},
      {'warmup': 'train', 'prototypes': 'prototypes'})
  assert '| warmup |' in table and 'prototypes' not in table
