"""Synscapes (Wrenninge & Unger): 25,000 photorealistic synthetic frames
with Cityscapes label ids."""

from data_prep import segmentation_builder as sb


class Synscapes(sb.SegmentationBuilder):
  """Synscapes -> 19 Cityscapes trainIds; split `train`."""

  name = 'synscapes'
  HOMEPAGE = 'https://synscapes.on.liu.se/'
  REQUIRED_PATHS = ('img/rgb', 'img/class')
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download Synscapes from https://synscapes.on.liu.se/download.html and
  extract the archive; pass the extracted Synscapes directory as
  --manual_dir. It must hold (file names without zero padding)
    img/rgb/1.png ... img/rgb/25000.png
    img/class/1.png ... img/class/25000.png
    meta/1.json ... (not read)
  """

  def _split_names(self, files):
    return ('train',)

  def _pairs(self, files, split):
    return sb.pairs_by_stem(files.list('img/rgb', '.png'),
                            files.list('img/class', '.png'), '.png', '.png')

  def _train_ids(self, data, report):
    return sb.label_id_png_to_train_ids(data, report)
