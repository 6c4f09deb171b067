"""Synscapes -> Cityscapes, DeepLab-v2 ResNet-101.

Source images resized to 1024x512 (paper Table 6). Variants: `source_only`,
`released`, `class_balanced`, `mit_b5` (as in configs/gta5.py).
"""

from configs import default
from configs import gta5


def get_config(arg=None):
  config = default.get_config()
  config.data.source = 'synscapes'
  config.data.source_size = (512, 1024)
  config.evaluation.class_sets = (19,)
  return default.apply_arg(config, arg, {'source_only': gta5.source_only,
                                         'released': default.released,
                                         'mit_b5': default.mit_b5,
                                         'class_balanced':
                                             default.class_balanced})
