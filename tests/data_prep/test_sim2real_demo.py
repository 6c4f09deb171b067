"""The built-in demo dataset: determinism, label validity, layout."""

import os

import numpy as np
import tensorflow_datasets as tfds

from data_prep import builders
from data_prep import sim2real_render
from spcl_jax import labels as label_table


def _record_files(root):
  found = {}
  for directory, _, files in os.walk(root):
    for f in files:
      if '.array_record' in f:
        with open(os.path.join(directory, f), 'rb') as fh:
          found[f] = fh.read()
  return found


def test_build_is_byte_identical(tiny_demo, tmp_path):
  builders.build('sim2real_demo', str(tmp_path), 'tiny')
  first, second = _record_files(tiny_demo), _record_files(tmp_path)
  assert sorted(first) == sorted(second) and len(first) == 3
  for name in first:
    assert first[name] == second[name], name


def test_records_match_the_contract(tiny_demo):
  classes_seen = set()
  for split, count in (('source_train', 48), ('target_train', 24),
                       ('target_val', 16)):
    source = tfds.data_source('sim2real_demo/tiny', split=split,
                              data_dir=tiny_demo)
    assert len(source) == count
    ids = set()
    for record in source:
      assert record['image'].shape == (64, 128, 3)
      assert record['image'].dtype == np.uint8
      assert record['label'].shape == (64, 128, 1)
      values = set(np.unique(record['label']).tolist())
      assert values <= set(sim2real_render.DEMO_CLASSES) | {255}
      assert values <= set(range(label_table.NUM_CLASSES)) | {255}
      classes_seen |= values
      ids.add(record['image_id'].decode())
    assert ids == {f'{split}_{i:06d}' for i in range(count)}
  assert classes_seen == set(sim2real_render.DEMO_CLASSES) | {255}


def test_render_is_deterministic_and_domains_differ():
  a_img, a_lbl = sim2real_render.render([0, 0, 5], 'real', 96, 160)
  b_img, b_lbl = sim2real_render.render([0, 0, 5], 'real', 96, 160)
  np.testing.assert_array_equal(a_img, b_img)
  np.testing.assert_array_equal(a_lbl, b_lbl)
  # appearance gap: the mean colour of road pixels differs between domains
  synthetic_road, real_road = [], []
  for i in range(20):
    for domain, bucket in (('synthetic', synthetic_road), ('real', real_road)):
      image, label = sim2real_render.render([1, i], domain, 64, 128)
      bucket.append(image[label == sim2real_render.ROAD].mean(0))
  assert np.abs(np.mean(synthetic_road, 0) - np.mean(real_road, 0)).max() > 20
  # geometry gap: only the real-like camera has an ignored ego hood
  _, label = sim2real_render.render([2], 'real', 64, 128)
  assert (label[-1] == 255).all()
