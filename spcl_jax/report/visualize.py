"""Pictures of label maps: the Cityscapes palette (spcl_jax.core.labels.PALETTE)
and overlays of a colour map on its image."""

import numpy as np

from spcl_jax.core import labels as label_table

IGNORE_COLOR = (0, 0, 0)   # trainId 255 (ignored / unlabelled)


def colorize(trainids) -> np.ndarray:
  """uint8 [H, W, 3] palette colours of a trainId map (255: black)."""
  trainids = np.asarray(trainids)
  lut = np.zeros((256, 3), np.uint8)
  lut[:] = IGNORE_COLOR
  lut[:label_table.NUM_CLASSES] = label_table.PALETTE
  return lut[trainids.astype(np.uint8)]


def overlay(image, colors, alpha: float = 0.5) -> np.ndarray:
  """uint8 [H, W, 3]: `image` blended with `colors` (weight `alpha`)."""
  image, colors = np.asarray(image), np.asarray(colors)
  if image.shape != colors.shape:
    raise ValueError(f'image {image.shape} and colours {colors.shape} '
                     'differ in shape')
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'alpha = {alpha} must be in [0, 1]')
  blended = (1 - alpha) * image.astype(np.float32) + alpha * colors
  return np.clip(np.round(blended), 0, 255).astype(np.uint8)
