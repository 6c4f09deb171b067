"""Cityscapes (fine annotations): train 2,975 / validation 500 / test 1,525.

Named `spcl_cityscapes`: TFDS ships a different builder named `cityscapes`,
which `tfds.data_source("cityscapes")` would find (and try to download).
`spcl_jax.data.sources.open_source` reads the build from its directory, as
does `tfds.builder_from_directory(DATA_DIR/spcl_cityscapes/1.0.0)`.
"""

from data_prep import segmentation_builder as sb

_SPLIT_DIRS = {'train': 'train', 'validation': 'val', 'test': 'test'}
_IMAGE_SUFFIX = '_leftImg8bit.png'
_LABEL_SUFFIX = '_gtFine_labelIds.png'


class Cityscapes(sb.SegmentationBuilder, skip_registration=True):
  """Cityscapes -> 19 trainIds; `test` has no labels (stored as all 255)."""

  name = 'spcl_cityscapes'
  HOMEPAGE = 'https://www.cityscapes-dataset.com/'
  REQUIRED_PATHS = ('leftImg8bit/train', 'leftImg8bit/val', 'gtFine/train',
                    'gtFine/val')
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from
  https://www.cityscapes-dataset.com/downloads/ into one directory and pass
  it as --manual_dir. Either leave the zip files there (read in place) or
  extract them so that the directory holds
    leftImg8bit/{train,val,test}/CITY/CITY_SEQ_FRAME_leftImg8bit.png
    gtFine/{train,val}/CITY/CITY_SEQ_FRAME_gtFine_labelIds.png
  """

  def _split_names(self, files):
    return tuple(split for split, folder in _SPLIT_DIRS.items()
                 if files.has_dir(f'leftImg8bit/{folder}'))

  def _has_labels(self, split):
    return split != 'test'

  def _pairs(self, files, split):
    folder = _SPLIT_DIRS[split]
    images = files.list(f'leftImg8bit/{folder}', _IMAGE_SUFFIX)
    labels = (files.list(f'gtFine/{folder}', _LABEL_SUFFIX)
              if self._has_labels(split) else [])
    pairs = sb.pairs_by_stem(images, labels, _IMAGE_SUFFIX, _LABEL_SUFFIX)
    return sorted(pairs, key=lambda p: p.image_id)

  def _train_ids(self, data, report):
    return sb.label_id_png_to_train_ids(data, report)

