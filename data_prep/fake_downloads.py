"""Fake downloads of GTA5 and Cityscapes at their real image sizes, in the
exact on-disk layouts `data_prep.build` reads (docs/data.md), for trying
the recipe at its real sizes without the data (`benchmarks.full_size_run`
and its test). The contents are no dataset: a scene of class bands and
boxes, each class painted in its Cityscapes colour with noise, so that the
files decode, map and compress like real ones.

  GTA5        DIR/images/NNNNN.png (RGB), DIR/labels/NNNNN.png (palette PNG
              whose indices are Cityscapes label ids)
  Cityscapes  DIR/leftImg8bit/{train,val}/CITY/CITY_000000_NNNNNN_leftImg8bit.png
              DIR/gtFine/{train,val}/CITY/CITY_000000_NNNNNN_gtFine_labelIds.png
"""

import os
import shutil
import time

import numpy as np
from PIL import Image

from spcl_jax.core import labels as label_table

GTA5_SIZE = (1052, 1914)         # (height, width) of a GTA5 frame
CITYSCAPES_SIZE = (1024, 2048)
# Cityscapes label ids of the scene's bands, top to bottom, and of its boxes
_BANDS = (23, 11, 21, 7, 8)      # sky, building, vegetation, road, sidewalk
_BOXES = (26, 24, 17, 20, 19, 25, 33, 32, 28, 31, 27, 13, 12)


def scene_label_ids(size, seed: int) -> np.ndarray:
  """uint8 [H, W] Cityscapes label ids: bands of stuff classes with random
  boundaries and random boxes of thing classes."""
  rng = np.random.default_rng(seed)
  height, width = size
  bounds = np.sort(rng.uniform(0.05, 0.95, len(_BANDS) - 1)) * height
  rows = np.arange(height)[:, None]
  ids = np.asarray(_BANDS, np.uint8)[np.searchsorted(bounds, rows)]
  ids = np.broadcast_to(ids, (height, width)).copy()
  for label in rng.choice(_BOXES, 12):
    h, w = (rng.uniform(0.05, 0.3, 2) * size).astype(int) + 1
    top, left = rng.integers(0, height - h), rng.integers(0, width - w)
    ids[top:top + h, left:left + w] = label
  return ids


def scene_image(ids: np.ndarray, seed: int) -> np.ndarray:
  """uint8 [H, W, 3]: each pixel its class's Cityscapes colour plus noise."""
  colours = np.zeros((256, 3), np.int16)
  for train_id, label_id in enumerate(label_table.TRAINID_TO_ID):
    colours[label_id] = label_table.PALETTE[train_id]
  noise = np.random.default_rng(seed).integers(-12, 13, ids.shape + (3,))
  return np.clip(colours[ids] + noise, 0, 255).astype(np.uint8)


def _save(path: str, image: Image.Image) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path)


def write_gta5(root: str, count: int, size=GTA5_SIZE, seed: int = 0) -> None:
  """`count` frames of GTA5's layout into `root`."""
  palette = [c for i in range(256)
             for c in ((i * 37 + 11) % 256, (i * 91 + 3) % 256, i)]
  for index in range(count):
    ids = scene_label_ids(size, seed + index)
    stem = f'{index + 1:05d}'
    _save(os.path.join(root, 'images', f'{stem}.png'),
          Image.fromarray(scene_image(ids, seed + index)))
    label = Image.fromarray(ids, mode='P')
    label.putpalette(palette)
    _save(os.path.join(root, 'labels', f'{stem}.png'), label)


def write_cityscapes(root: str, train: int, val: int,
                     size=CITYSCAPES_SIZE, seed: int = 1000) -> None:
  """`train` and `val` frames of Cityscapes' layout (leftImg8bit, gtFine
  label ids) into `root`."""
  for split, city, count in (('train', 'aachen', train),
                             ('val', 'frankfurt', val)):
    for index in range(count):
      frame_seed = seed + index + (0 if split == 'train' else 500)
      ids = scene_label_ids(size, frame_seed)
      stem = f'{city}_000000_{index:06d}'
      _save(os.path.join(root, 'leftImg8bit', split, city,
                         f'{stem}_leftImg8bit.png'),
            Image.fromarray(scene_image(ids, frame_seed)))
      _save(os.path.join(root, 'gtFine', split, city,
                         f'{stem}_gtFine_labelIds.png'), Image.fromarray(ids))


def built_fake_recipe_data(root: str, source_images: int = 6,
                           target_images: int = 6, val_images: int = 3,
                           log=print) -> str:
  """ROOT/tfds holding `gta5` and `spcl_cityscapes` built (`data_prep.build`'s
  builders) from fake downloads written into ROOT/downloads at the real
  sizes; made once for these counts, reused after."""
  from data_prep import builders  # pylint: disable=g-import-not-at-top
  data_dir = os.path.join(root, 'tfds')
  made = os.path.join(root, 'downloads')
  counts = (source_images, target_images, val_images)
  marker = os.path.join(made, 'made_{}_{}_{}'.format(*counts))
  if not os.path.exists(marker):
    shutil.rmtree(made, ignore_errors=True)
    shutil.rmtree(data_dir, ignore_errors=True)
    start = time.time()
    write_gta5(os.path.join(made, 'gta5'), source_images)
    write_cityscapes(os.path.join(made, 'cityscapes'), target_images,
                     val_images)
    for name, folder in (('gta5', 'gta5'), ('spcl_cityscapes', 'cityscapes')):
      builders.build(name, data_dir, manual_dir=os.path.join(made, folder))
    with open(marker, 'w', encoding='utf-8'):
      pass
    log(f'fake downloads made and built in {time.time() - start:.0f} s -> '
        f'{data_dir}')
  return data_dir
