"""Resizing images (bilinear or bicubic) and label maps (nearest), as the
recipe resizes them; shared by the loaders and the dataset builders."""

import numpy as np
from PIL import Image


def resize_array(array: np.ndarray, size, resample) -> np.ndarray:
  """`array` resized to size = (height, width) with the PIL filter
  `resample` (itself when it has that size)."""
  height, width = size
  if array.shape[:2] == (height, width):
    return array
  return np.asarray(Image.fromarray(array).resize((width, height), resample))


def resize_label(label: np.ndarray, size) -> np.ndarray:
  """Nearest-neighbour resize of a label map to size = (height, width):
  never creates a value absent from the input."""
  return resize_array(label, size, Image.NEAREST)


def resize_image(image: np.ndarray, size) -> np.ndarray:
  """Bilinear resize of an image to size = (height, width)."""
  return resize_array(image, size, Image.BILINEAR)


def resize_pair(image: np.ndarray, label: np.ndarray, size):
  """(image bilinear, label nearest) resized to size = (height, width)."""
  return resize_image(image, size), resize_label(label, size)


# `data.image_interpolation`: PIL filters of the image resize (labels are
# always resized with nearest neighbour).
INTERPOLATIONS = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}
