"""SYNTHIA-RAND-CITYSCAPES: 9,400 synthetic frames, 16 Cityscapes classes.

Labels are 16-bit three-channel PNGs with the class id in the first (R)
channel and instance ids in the others. PIL silently truncates them to 8
bits, so they are decoded with OpenCV (`IMREAD_UNCHANGED`, channels in BGR
order: R is the last).
"""

import cv2
import numpy as np

from data_prep import segmentation_builder as sb
from spcl_jax.core import labels as label_table


class Synthia(sb.SegmentationBuilder):
  """SYNTHIA-RAND-CITYSCAPES -> trainIds of its 16 classes; split `train`."""

  name = 'synthia'
  HOMEPAGE = 'https://synthia-dataset.net/'
  REQUIRED_PATHS = ('RGB', 'GT/LABELS')
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download SYNTHIA-RAND-CITYSCAPES (RAND_CITYSCAPES.rar) from
  https://synthia-dataset.net/downloads/ and extract it; pass the extracted
  RAND_CITYSCAPES directory as --manual_dir. It must hold
    RGB/0000000.png ... RGB/0009399.png
    GT/LABELS/0000000.png ... GT/LABELS/0009399.png
  (the .rar archive itself cannot be read in place).
  """

  def _split_names(self, files):
    return ('train',)

  def _pairs(self, files, split):
    return sb.pairs_by_stem(files.list('RGB', '.png'),
                            files.list('GT/LABELS', '.png'), '.png', '.png')

  def _train_ids(self, data, report):
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
      raise ValueError('not a PNG image')
    if decoded.ndim != 3 or decoded.shape[2] < 3 or decoded.dtype != np.uint16:
      raise ValueError(f'expected a 16-bit 3-channel PNG, found '
                       f'{decoded.dtype} with shape {decoded.shape}')
    class_ids = decoded[:, :, 2]  # BGR(A): R is channel 2
    return sb.lookup(class_ids, label_table.SYNTHIA_ID_TO_TRAINID,
                     label_table.SYNTHIA_IDS, report)
