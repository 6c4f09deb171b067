"""ACDC (Sakaridis et al., "ACDC: The Adverse Conditions Dataset with
Correspondences for Semantic Driving Scene Understanding", ICCV 2021):
1920x1080 frames in fog, night, rain and snow with Cityscapes label ids.

Builder configs choose the conditions: `acdc/fog`, `acdc/night`,
`acdc/rain`, `acdc/snow`, or `acdc/all` (the four together). Splits:
`train` (400 per condition, labelled), `validation` (406 in all: fog 100,
night 106, rain 100, snow 100; labelled) and, if the download has it,
`test` (500 per condition; its labels are withheld: stored as all 255 and
never evaluated). The `*_ref` folders (the same places in normal
conditions) are not read. `image_id`: the file's stem less `_rgb_anon`.
"""

import dataclasses

import tensorflow_datasets as tfds

from data_prep import segmentation_builder as sb

CONDITIONS = ('fog', 'night', 'rain', 'snow')
_SPLIT_DIRS = {'train': 'train', 'validation': 'val', 'test': 'test'}
_IMAGE_SUFFIX = '_rgb_anon.png'
_LABEL_SUFFIX = '_gt_labelIds.png'


@dataclasses.dataclass
class AcdcConfig(tfds.core.BuilderConfig):
  conditions: tuple = CONDITIONS


class Acdc(sb.SegmentationBuilder, skip_registration=True):
  """ACDC -> 19 Cityscapes trainIds; one condition or all four."""

  name = 'acdc'
  HOMEPAGE = 'https://acdc.vision.ee.ethz.ch/'
  BUILDER_CONFIGS = [
      AcdcConfig(name='all', description='fog, night, rain and snow',
                 conditions=CONDITIONS),
      *(AcdcConfig(name=c, description=f'{c} only', conditions=(c,))
        for c in CONDITIONS)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Register at https://acdc.vision.ee.ethz.ch/ and download
  rgb_anon_trainvaltest.zip and gt_trainval.zip into one directory; pass it
  as --manual_dir. Either leave the zip files there (read in place) or
  extract them so that the directory holds
    rgb_anon/{fog,night,rain,snow}/{train,val,test}/SEQ/SEQ_frame_N_rgb_anon.png
    gt/{fog,night,rain,snow}/{train,val}/SEQ/SEQ_frame_N_gt_labelIds.png
  Choose the conditions with --config (all, fog, night, rain, snow).
  """

  @property
  def REQUIRED_PATHS(self):  # pylint: disable=invalid-name
    return tuple(f'{kind}/{condition}/{folder}'
                 for condition in self.builder_config.conditions
                 for kind in ('rgb_anon', 'gt') for folder in ('train', 'val'))

  def _split_names(self, files):
    return tuple(split for split, folder in _SPLIT_DIRS.items()
                 if all(files.has_dir(f'rgb_anon/{c}/{folder}')
                        for c in self.builder_config.conditions))

  def _has_labels(self, split):
    return split != 'test'

  def _pairs(self, files, split):
    folder = _SPLIT_DIRS[split]
    images, labels = [], []
    for condition in self.builder_config.conditions:
      images += files.list(f'rgb_anon/{condition}/{folder}', _IMAGE_SUFFIX)
      if self._has_labels(split):
        labels += files.list(f'gt/{condition}/{folder}', _LABEL_SUFFIX)
    pairs = sb.pairs_by_stem(images, labels, _IMAGE_SUFFIX, _LABEL_SUFFIX)
    return sorted(pairs, key=lambda p: p.image_id)

  def _train_ids(self, data, report):
    return sb.label_id_png_to_train_ids(data, report)
