"""Every stage at the recipe's real image sizes: the full-size command with a
narrow network runs the data path, the pseudo-label storage and the
evaluation at 1024x2048 on every CI run."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from data_prep import fake_downloads
from spcl_jax.data import pseudo_labels

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
STAGES = ('warmup', 'prototypes', 'pseudo_labels', 'spcl', 'pseudo_labels_2',
          'self_training')


def test_fake_downloads_have_the_real_sizes_and_label_ids(tmp_path):
  fake_downloads.write_gta5(str(tmp_path / 'gta5'), 1)
  fake_downloads.write_cityscapes(str(tmp_path / 'cs'), 1, 1)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = Image.open(tmp_path / 'gta5' / 'images' / '00001.png')
  label = Image.open(tmp_path / 'gta5' / 'labels' / '00001.png')
  assert image.size == label.size == (1914, 1052) and label.mode == 'P'
  ids = np.asarray(label)   # a palette PNG's indices are the label ids
  assert set(np.unique(ids)) <= {7, 8, 11, 12, 13, 17, 19, 20, 21, 23, 24,
                                 25, 26, 27, 28, 31, 32, 33}
  city = tmp_path / 'cs' / 'gtFine' / 'val' / 'frankfurt'
  (name,) = os.listdir(city)
  assert name.endswith('_gtFine_labelIds.png')
  assert Image.open(city / name).size == (2048, 1024)


@pytest.mark.slow
def test_every_stage_runs_at_the_recipe_sizes(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.full_size_run',
       f'--workdir={tmp_path}', '--model=deeplabv2_resnet18',
       '--base_width=8', '--steps=2', '--source_images=4',
       '--target_images=4', '--val_images=2'],
      cwd=ROOT, capture_output=True, text=True, timeout=900,
      # this machine's one CPU device, not the suite's eight simulated ones
      env={**os.environ, 'XLA_FLAGS': ''})
  assert result.returncode == 0, result.stderr[-6000:]
  rows = {line.split('|')[1].strip(): line for line in
          result.stdout.splitlines() if line.startswith('| ')}
  assert set(STAGES) <= set(rows), result.stdout
  for stage in ('warmup', 'spcl', 'self_training'):
    assert re.search(r'\| \d+ s \| [\d.]+ \|', rows[stage]), rows[stage]
  assert 'train labels' in rows['pseudo_labels']
  peak = re.search(r'peak RSS of the process tree: ([\d.]+) GiB',
                   result.stdout)
  assert peak and 0 < float(peak.group(1)) <= 20, result.stdout

  run = tmp_path / 'run'
  report = json.loads((run / 'report.json').read_text())
  assert list(report['stages']) == list(STAGES)
  assert report['config']['data']['target_size'] == [512, 1024]
  # evaluation against the 2048x1024 labels of both val images
  done = json.loads((run / 'self_training' / 'done.json').read_text())
  assert 0.5 * 2 * 1024 * 2048 < done['num_pixels'] <= 2 * 1024 * 2048
  # pseudo labels stored at the labels' full size
  store = pseudo_labels.PseudoLabelStore(str(run / 'pseudo_labels_2' /
                                             'labels'))
  assert len(store) == 4
  assert all(store[image_id].shape == (1024, 2048)
             for image_id in store.image_ids())
