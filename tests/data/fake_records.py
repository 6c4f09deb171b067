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


# The trainIds of `write_rare_class_folder`'s records: road in every one,
# car in every other, rider in every fifth, train in two, bicycle in one.
RARE_FOLDER_RECORDS = 20


def rare_class_trainids(index: int) -> list:
  """The trainIds record `index` of `write_rare_class_folder` contains."""
  classes = [0]   # road
  if index % 2 == 0:
    classes.append(13)   # car
  if index % 5 == 0:
    classes.append(12)   # rider
  if index in (3, 11):
    classes.append(16)   # train
  if index == 7:
    classes.append(18)   # bicycle
  return classes


def write_rare_class_folder(root: str) -> None:
  """A folder dataset (data_prep/folder.py) of tiny 8x8 records with rare
  classes: split `train` labelled (Cityscapes label ids, one class per
  row, the rest ignored), split `bare` images only."""
  import os  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for index in range(RARE_FOLDER_RECORDS):
    rng = np.random.RandomState(index)
    ids = np.zeros((8, 8), np.uint8)   # 'unlabeled'
    for row, train_id in enumerate(rare_class_trainids(index)):
      ids[row] = label_table.TRAINID_TO_ID[train_id]
    for split, label in (('train', ids), ('bare', None)):
      image = rng.randint(0, 256, (8, 8, 3), dtype=np.uint8)
      folder = os.path.join(root, split, 'images')
      os.makedirs(folder, exist_ok=True)
      Image.fromarray(image).save(os.path.join(folder, f'{index:03d}.png'))
      if label is not None:
        folder = os.path.join(root, split, 'labels')
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(label).save(os.path.join(folder, f'{index:03d}.png'))


def build_rare_class_folder(root: str, data_dir: str) -> str:
  """Builds `write_rare_class_folder` as dataset 'rare_city' into
  `data_dir`; returns the dataset's name."""
  from data_prep import builders  # pylint: disable=g-import-not-at-top
  write_rare_class_folder(root)
  builders.build('folder', data_dir, manual_dir=root, name='rare_city')
  return 'rare_city'
