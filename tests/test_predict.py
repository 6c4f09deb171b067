"""`python -m spcl_jax.predict` on the finished smoke workdir (read only):
every output of every input, palette colours, official label ids, the
evaluation's predictions, and an unreadable input."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from spcl_jax.core import labels as label_table
from spcl_jax.core import metrics
from spcl_jax.data import sources
from spcl_jax.report import visualize

ROOT = os.path.dirname(os.path.dirname(__file__))


@pytest.mark.slow
def test_predict_writes_every_output(smoke_reference, tiny_demo, tmp_path):
  workdir, run = smoke_reference
  assert run.returncode == 0, run.stderr[-6000:]
  report = json.loads((workdir / 'report.json').read_text())
  data = report['config']['data']
  source = sources.open_source(data['target'], data['val_split'], tiny_demo)
  inputs, labels = tmp_path / 'in', []
  inputs.mkdir()
  for i in range(len(source)):   # the validation split as image files
    record = source[i]
    Image.fromarray(np.asarray(record['image'])).save(inputs / f'{i:03}.png')
    labels.append(np.asarray(record['label']).squeeze())
  odd = np.random.default_rng(0).integers(0, 256, (45, 70), np.uint8)
  Image.fromarray(odd).save(inputs / 'odd_size_grey.jpg')
  (inputs / 'broken.png').write_text('not an image')
  out = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, '-m', 'spcl_jax.predict', f'--workdir={workdir}',
       f'--input={inputs}/*', f'--output={out}', '--cityscapes_ids'],
      cwd=ROOT, capture_output=True, text=True, check=False,
      env={**os.environ, 'XLA_FLAGS': ''})
  assert result.returncode == 1, result.stderr[-6000:]   # broken.png
  assert 'broken.png' in result.stderr
  # the pass over the inputs reports its progress (every file, broken too)
  assert (f'self_training: predict {len(source) + 2} files in '
          in result.stderr), result.stderr[-3000:]
  stems = [f'{i:03}' for i in range(len(source))] + ['odd_size_grey']
  assert sorted(os.listdir(out)) == sorted(
      f'{s}_{k}.png' for s in stems
      for k in ('trainid', 'color', 'overlay', 'labelid'))
  palette = {tuple(c) for c in label_table.PALETTE}
  confusion = np.zeros((19, 19), np.int64)
  for stem in stems:
    trainid = np.asarray(Image.open(out / f'{stem}_trainid.png'))
    color = np.asarray(Image.open(out / f'{stem}_color.png'))
    labelid = np.asarray(Image.open(out / f'{stem}_labelid.png'))
    overlay = np.asarray(Image.open(out / f'{stem}_overlay.png'))
    assert trainid.dtype == np.uint8 and trainid.max() < 19
    assert {tuple(c) for c in color.reshape(-1, 3)} <= palette
    np.testing.assert_array_equal(color, visualize.colorize(trainid))
    np.testing.assert_array_equal(labelid,
                                  label_table.TRAINID_TO_ID[trainid])
    assert overlay.shape == color.shape
    if stem == 'odd_size_grey':
      assert trainid.shape == odd.shape   # upsampled to the file's size
    else:
      confusion += np.asarray(metrics.confusion_matrix(
          labels[int(stem)], trainid, 19))
  # the same predictions as the stage's own evaluation of the split
  assert metrics.summarize(confusion)['miou'] == report['stages'][
      'self_training']['miou']
