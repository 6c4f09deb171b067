"""The label table agrees with SPEC §3."""

import numpy as np

from spcl_jax import labels


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
