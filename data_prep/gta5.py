"""GTA5 (Richter et al., "Playing for Data"): 24,966 synthetic frames.

Labels are palette PNGs whose palette *indices* are Cityscapes label ids;
they are read as indices (never as colours) and mapped to trainIds. A few
labels differ in size from their image: resized with nearest neighbour.
"""

import io

import numpy as np
from PIL import Image

from data_prep import segmentation_builder as sb
from spcl_jax.core import labels as label_table


class Gta5(sb.SegmentationBuilder):
  """GTA5 -> 19 Cityscapes trainIds; split `train` (all pairs)."""

  name = 'gta5'
  HOMEPAGE = 'https://download.visinf.tu-darmstadt.de/data/from_games/'
  REQUIRED_PATHS = ('images', 'labels')
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download GTA5 from https://download.visinf.tu-darmstadt.de/data/from_games/
  (the ten parts 01_images.zip ... 10_images.zip and 01_labels.zip ...
  10_labels.zip) into one directory and pass it as --manual_dir. Either leave
  the zip files there (read in place) or extract them so that the directory
  holds
    images/00001.png ... images/24966.png
    labels/00001.png ... labels/24966.png
  Some copies have 24,941 pairs; missing pairs are skipped and listed.
  """

  def _split_names(self, files):
    return ('train',)

  def _pairs(self, files, split):
    return sb.pairs_by_stem(files.list('images', '.png'),
                            files.list('labels', '.png'), '.png', '.png')

  def _train_ids(self, data, report):
    image = Image.open(io.BytesIO(data))
    if image.mode != 'P':
      raise ValueError(f'expected a palette PNG (mode P) whose indices are '
                       f'label ids, found mode {image.mode}')
    return sb.lookup(np.asarray(image), label_table.CITYSCAPES_ID_TO_TRAINID,
                     label_table.CITYSCAPES_IDS, report)
