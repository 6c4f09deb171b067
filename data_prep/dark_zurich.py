"""Dark Zurich (Sakaridis et al., "Guided Curriculum Model Adaptation and
Uncertainty-Aware Evaluation for Semantic Nighttime Image Segmentation",
ICCV 2019): 1920x1080 frames of Zurich by day, twilight and night.

Splits: `train_night` (2,416), `train_twilight` (2,920) and `train_day`
(3,041), unlabelled (the adaptation target is `train_night`);
`validation` (the 50 labelled night frames of `val/night`, Cityscapes
label ids); and, if the download has it, `test` (151 night frames whose
labels are withheld). Unlabelled splits are stored with all-255 labels and
never evaluated. `image_id`: the file's stem less `_rgb_anon`.
"""

from data_prep import segmentation_builder as sb

# split -> (image folder, label folder or None)
_SPLITS = {'train_night': ('rgb_anon/train/night', None),
           'train_twilight': ('rgb_anon/train/twilight', None),
           'train_day': ('rgb_anon/train/day', None),
           'validation': ('rgb_anon/val/night', 'gt/val/night'),
           'test': ('rgb_anon/test/night', None)}
_IMAGE_SUFFIX = '_rgb_anon.png'
_LABEL_SUFFIX = '_gt_labelIds.png'


class DarkZurich(sb.SegmentationBuilder, skip_registration=True):
  """Dark Zurich -> 19 Cityscapes trainIds; night / twilight / day training
  images, the labelled night validation split."""

  name = 'dark_zurich'
  HOMEPAGE = 'https://www.trace.ethz.ch/publications/2019/GCMA_UIoU/'
  REQUIRED_PATHS = ('rgb_anon/train/night', 'rgb_anon/val/night',
                    'gt/val/night')
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download Dark_Zurich_train_anon.zip and Dark_Zurich_val_anon.zip (and,
  optionally, Dark_Zurich_test_anon_withoutGt.zip) from
  https://www.trace.ethz.ch/publications/2019/GCMA_UIoU/ into one
  directory; pass it as --manual_dir. Either leave the zip files there
  (read in place) or extract them so that the directory holds
    rgb_anon/train/{night,twilight,day}/SEQ/SEQ_frame_N_rgb_anon.png
    rgb_anon/val/night/SEQ/SEQ_frame_N_rgb_anon.png
    gt/val/night/SEQ/SEQ_frame_N_gt_labelIds.png
  """

  def _split_names(self, files):
    return tuple(split for split, (images, _) in _SPLITS.items()
                 if files.has_dir(images))

  def _has_labels(self, split):
    return _SPLITS[split][1] is not None

  def _pairs(self, files, split):
    images, labels = _SPLITS[split]
    pairs = sb.pairs_by_stem(
        files.list(images, _IMAGE_SUFFIX),
        files.list(labels, _LABEL_SUFFIX) if labels else [], _IMAGE_SUFFIX,
        _LABEL_SUFFIX)
    return sorted(pairs, key=lambda p: p.image_id)

  def _train_ids(self, data, report):
    return sb.label_id_png_to_train_ids(data, report)
