"""The label table agrees with SPEC §3."""

import numpy as np

from spcl_jax.core import labels


def test_cityscapes_id_to_trainid_matches_spec_table():
  spec = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
          23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17,
          33: 18}
  expected = np.full(256, 255)
  for k, v in spec.items():
    expected[k] = v
  np.testing.assert_array_equal(labels.ID_TO_TRAINID, expected)
  np.testing.assert_array_equal(labels.ID_TO_TRAINID[labels.TRAINID_TO_ID],
                                np.arange(19))


def test_class_sets_and_tail():
  assert labels.CLASS_SETS[16] == (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13,
                                   15, 17, 18)
  assert labels.CLASS_SETS[13] == (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17,
                                   18)
  assert labels.TAIL_CLASSES == (3, 4, 6, 7, 9, 12, 14, 15, 16, 17, 18)
  assert labels.PALETTE.shape == (19, 3)
  assert tuple(labels.PALETTE[0]) == (128, 64, 128)  # road


def test_synthia16_maps_trainids_and_ignores_terrain_truck_train():
  lut = labels.trainid_lut('synthia16')
  stored = np.array([0, 8, 9, 10, 14, 16, 17, 18, 255, 30])
  # terrain (9), truck (14), train (16) -> ignore; sky 10 -> 9, ...
  np.testing.assert_array_equal(lut[stored],
                                [0, 8, 255, 9, 255, 255, 14, 15, 255, 30])
  np.testing.assert_array_equal(labels.trainid_lut('cityscapes19'),
                                np.arange(256))
  assert labels.class_names('synthia16')[9] == 'sky'
  assert labels.class_set_indices(13, 'synthia16') == (
      0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)


def test_trainids_to_official_label_ids_and_label_space_trainids():
  trainids = np.array([[0, 1, 13], [18, 255, 10]], np.uint8)
  np.testing.assert_array_equal(labels.trainids_to_label_ids(trainids),
                                [[7, 8, 26], [33, 0, 23]])
  with np.testing.assert_raises(ValueError):
    labels.trainids_to_label_ids(np.array([19]))
  np.testing.assert_array_equal(labels.space_to_trainids('cityscapes19'),
                                np.arange(19))
  assert labels.space_to_trainids('synthia16')[9] == 10   # sky


def test_class_index_maps_become_trainids_with_ignore_kept():
  # synthia16: index 9 is sky (trainId 10), 15 bicycle (18); 16 is outside
  classes = np.array([[0, 9, 15], [16, 255, 2]], np.uint8)
  np.testing.assert_array_equal(
      labels.classes_to_trainids(classes, 'synthia16'),
      [[0, 10, 18], [255, 255, 2]])
  np.testing.assert_array_equal(
      labels.classes_to_trainids(classes, 'cityscapes19'),
      [[0, 9, 15], [16, 255, 2]])
