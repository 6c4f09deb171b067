"""SYNTHIA-RAND-CITYSCAPES -> Cityscapes, DeepLab-v2 ResNet-101.

Source images 1280x760 (paper Table 6), sampled class-balanced as in the
release (`data.source_sampling`). The released protocol: a 16-way
head over SYNTHIA's 16 classes; Cityscapes pixels of terrain, truck and train
are ignored (neither trained on nor counted); mIoU over the 16 classes, with
the 13-class subset reported beside it. Variants: `vgg16`, `source_only`,
`released`, `class_balanced`, `mit_b5` (as in configs/gta5.py).
"""

from configs import default
from configs import gta5


def get_config(arg=None):
  config = default.get_config()
  config.data.source = 'synthia'
  # the release's class-balanced source sampling (data.source_sampling)
  config.data.source_sampling = 'class_balanced'
  config.data.source_size = (760, 1280)
  config.data.label_space = 'synthia16'
  config.model.num_classes = 16
  config.evaluation.class_sets = (16, 13)
  return default.apply_arg(config, arg, {'vgg16': gta5.vgg16,
                                         'source_only': gta5.source_only,
                                         'released': default.released,
                                         'mit_b5': default.mit_b5,
                                         'class_balanced':
                                             default.class_balanced})
