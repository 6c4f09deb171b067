"""SYNTHIA-RAND-CITYSCAPES -> Cityscapes, DeepLab-v2 ResNet-101.

Source images 1280x760 (paper Table 6); mIoU over 16 classes, with the
13-class subset reported beside it. Variants: `vgg16`, `source_only`.
"""

from configs import default
from configs import gta5


def get_config(arg=None):
  config = default.get_config()
  config.data.source = 'synthia'
  config.data.source_size = (760, 1280)
  config.evaluation.class_sets = (16, 13)
  return default.apply_arg(config, arg, {'vgg16': gta5.vgg16,
                                         'source_only': gta5.source_only})
