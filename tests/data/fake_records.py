"""Records made in memory for the data tests."""

import numpy as np

from spcl_jax.core import labels as label_table


def palette_record(seed, height=40, width=60):
  """An image whose label is recoverable from its pixel colours."""
  rng = np.random.RandomState(seed)
  label = np.kron(rng.randint(0, 19, (4, 6)), np.ones((10, 10), int))
  label[rng.rand(height, width) < 0.002] = 255
  colours = np.vstack([label_table.PALETTE, [[0, 0, 0]]]).astype(np.uint8)
  image = colours[np.where(label == 255, 19, label)]
  return {'image': image, 'label': label.astype(np.uint8)[..., None],
          'image_id': f'r{seed}'.encode()}
