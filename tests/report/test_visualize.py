"""Palette colours and overlays."""

import numpy as np
import pytest

from spcl_jax.core import labels as label_table
from spcl_jax.report import visualize


def test_colorize_and_overlay():
  trainids = np.array([[0, 10], [18, 255]], np.uint8)
  colors = visualize.colorize(trainids)
  np.testing.assert_array_equal(colors[0, 0], label_table.PALETTE[0])
  np.testing.assert_array_equal(colors[1, 0], label_table.PALETTE[18])
  np.testing.assert_array_equal(colors[1, 1], visualize.IGNORE_COLOR)
  image = np.full((2, 2, 3), 200, np.uint8)
  blended = visualize.overlay(image, colors, 0.5)
  np.testing.assert_array_equal(
      blended[0, 0], np.round(100 + label_table.PALETTE[0] / 2))
  with pytest.raises(ValueError, match='shape'):
    visualize.overlay(image[:1], colors)
