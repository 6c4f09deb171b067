"""The pipeline with a folder dataset (data_prep/folder.py) as its target:
the tiny demo's target images written out as a plain folder (training
split: images only; validation split: labels as Cityscapes label ids),
built with `--dataset folder`, and read by name."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import demo
from data_prep import builders
from spcl_jax.core import labels as label_table
from spcl_jax.data import sources
from spcl_jax.run import pipeline
from spcl_jax.run import stage_graph

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
NAME = 'demo_folder'
SMOKE_FLAGS = (f'--config.data.target={NAME}',
               '--config.data.target_split=train',
               '--config.data.val_split=val')


def _save(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


@pytest.fixture(scope='module')
def folder_data(tiny_demo, tmp_path_factory):
  """(data_dir, {image_id: val trainIds}): a data directory holding the
  tiny demo (linked) and `demo_folder` built from its target splits."""
  manual = tmp_path_factory.mktemp('demo_folder_manual')
  val_labels = {}
  for split, folder_split in (('target_train', 'train'),
                              ('target_val', 'val')):
    for record in sources.open_source('sim2real_demo/tiny', split, tiny_demo):
      image_id = record['image_id'].decode()
      _save(f'{manual}/{folder_split}/images/{image_id}.png', record['image'])
      if folder_split == 'val':
        train_ids = record['label'][..., 0]
        _save(f'{manual}/val/labels/{image_id}_labelIds.png',
              label_table.trainids_to_label_ids(train_ids))
        val_labels[image_id] = train_ids
  data_dir = tmp_path_factory.mktemp('folder_data')
  os.symlink(os.path.join(tiny_demo, 'sim2real_demo'),
             data_dir / 'sim2real_demo')
  builders.build('folder', str(data_dir), manual_dir=str(manual), name=NAME)
  return data_dir, val_labels


def test_folder_build_of_the_demo_target_keeps_every_label(folder_data):
  data_dir, val_labels = folder_data
  stored = {r['image_id'].decode(): r['label'][..., 0]
            for r in sources.open_source(NAME, 'val', str(data_dir))}
  assert sorted(stored) == sorted(val_labels) and len(stored) == 16
  for image_id, train_ids in val_labels.items():
    np.testing.assert_array_equal(stored[image_id], train_ids)
  train = sources.open_source(NAME, 'train', str(data_dir))
  assert len(train) == 24
  assert all((r['label'] == 255).all() for r in train)


def test_training_with_a_label_less_validation_split_is_refused(
    folder_data, tmp_path):
  data_dir, _ = folder_data
  config = demo.get_config('smoke')
  config.data.data_dir = str(data_dir)
  config.data.target, config.data.target_split = NAME, 'train'
  config.data.val_split = 'train'
  with pytest.raises(sources.UnlabelledSplitError) as e:
    pipeline.run(config, str(tmp_path / 'workdir'))
  assert "split 'train' of dataset 'demo_folder'" in str(e.value)
  assert "['val']" in str(e.value)
  # refused before any stage started
  assert not os.path.exists(tmp_path / 'workdir' / 'warmup')


@pytest.mark.slow
def test_smoke_pipeline_adapts_to_a_folder_dataset(folder_data, tmp_path):
  data_dir, _ = folder_data
  workdir = tmp_path / 'workdir'
  result = subprocess.run(
      [sys.executable, '-m', 'spcl_jax.main',
       '--config=configs/demo.py:smoke', f'--workdir={workdir}',
       f'--config.data.data_dir={data_dir}', *SMOKE_FLAGS],
      cwd=ROOT, capture_output=True, text=True, check=False,
      env={**os.environ, 'XLA_FLAGS': ''})
  assert result.returncode == 0, result.stderr[-6000:]
  report = json.loads((workdir / 'report.json').read_text())
  assert list(report['stages']) == [s.name for s in stage_graph.STAGES]
  for name, stage in report['stages'].items():
    if 'miou' in stage:
      assert 0.0 <= stage['miou'] <= 100.0, name
  assert report['config']['data']['target'] == NAME
  # the stand-alone evaluation refuses the images-only split by name
  from spcl_jax import evaluate  # pylint: disable=g-import-not-at-top
  with pytest.raises(sources.UnlabelledSplitError, match="split 'train'"):
    evaluate.evaluate(str(workdir), split='train', data_dir=str(data_dir))
