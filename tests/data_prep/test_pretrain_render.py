"""The pretraining images: deterministic, every category drawable, no street
layout, and the object carries the label (not the background)."""

import numpy as np
import pytest

from data_prep import pretrain_render
from data_prep.sim2real_render import Canvas


def test_render_is_deterministic_and_typed():
  a, category_a = pretrain_render.render((1, 2, 3), 48)
  b, category_b = pretrain_render.render((1, 2, 3), 48)
  c, _ = pretrain_render.render((1, 2, 4), 48)
  assert a.shape == (48, 48, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert category_a == category_b
  assert 0 <= category_a < len(pretrain_render.CATEGORIES)
  assert not np.array_equal(a, c)


def test_categories_are_balanced_over_seeds():
  counts = np.bincount([pretrain_render.render((5, i), 24)[1]
                        for i in range(640)],
                       minlength=len(pretrain_render.CATEGORIES))
  assert counts.min() > 0.4 * 640 / len(counts)  # uniform draw, 40 per kind


@pytest.mark.parametrize('name', pretrain_render.CATEGORIES)
def test_each_category_paints_a_centred_object_of_its_own_shape(name):
  canvas = Canvas(64, 128)
  pretrain_render._draw(canvas, name, 32, 32, 40)
  painted = canvas.obj[:, :64] > 0  # the visible square (wide objects are
  # cut at its edge, as in photos)
  assert 0.02 < painted.mean() < 0.9, painted.mean()
  rows, cols = np.nonzero(painted)
  assert abs(rows.mean() - 32) < 14 and abs(cols.mean() - 32) < 14


def test_shapes_differ_between_categories():
  masks = {}
  for name in pretrain_render.CATEGORIES:
    canvas = Canvas(64, 128)
    pretrain_render._draw(canvas, name, 32, 32, 40)
    masks[name] = canvas.obj > 0
  names = list(masks)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      assert (masks[a] != masks[b]).any(), (a, b)


def test_unknown_category_is_named():
  with pytest.raises(ValueError, match='nosuch'):
    pretrain_render._draw(Canvas(8, 16), 'nosuch', 4, 4, 4)
