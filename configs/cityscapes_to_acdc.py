"""Cityscapes -> ACDC (fog, night, rain, snow), DeepLab-v2 ResNet-101 with
the SPCL recipe of configs/default.py (stage lengths, learning rates,
thresholds, SPCL loss): only the data differ.

Source: Cityscapes `train` (2,975 labelled frames, 2048x1024, read at
512x1024). Target: ACDC's training images of the four conditions (`acdc/
all`, 1,600 frames, 1920x1080, read at 576x1024: the same width, the
aspect kept); the method never trains on their labels (the pseudo-label
stages only report their agreement with them). Validation: ACDC's labelled
`validation` split (406 frames), 19 classes. Build both datasets first:
  python -m data_prep.build --dataset spcl_cityscapes --manual_dir CS \
      --data_dir D
  python -m data_prep.build --dataset acdc/all --manual_dir ACDC --data_dir D
Variants: `fog`, `night`, `rain`, `snow` (that condition only, target and
validation: build `acdc/<condition>`), and `vgg16`, `source_only`,
`released`, `class_balanced` (as in configs/gta5.py).
"""

import functools

from configs import default
from configs import gta5

CONDITIONS = ('fog', 'night', 'rain', 'snow')


def condition(config, name):
  config.data.target = f'acdc/{name}'


def from_cityscapes(target: str, target_split: str):
  """The recipe with Cityscapes `train` as source and `target`'s
  `target_split` (16:9 frames, read at 576x1024) as target, validated on
  its `validation` split (also configs/cityscapes_to_darkzurich.py)."""
  config = default.get_config()
  data = config.data
  data.source, data.source_split = 'spcl_cityscapes', 'train'
  data.source_size = (512, 1024)
  data.target, data.target_split = target, target_split
  data.val_split = 'validation'
  data.target_size = data.eval_size = (576, 1024)
  config.evaluation.class_sets = (19,)
  return config


# the variants every Cityscapes-source config has
VARIANTS = {'vgg16': gta5.vgg16, 'source_only': gta5.source_only,
            'released': default.released,
            'class_balanced': default.class_balanced}


def get_config(arg=None):
  variants = {name: functools.partial(condition, name=name)
              for name in CONDITIONS}
  variants.update(VARIANTS)
  return default.apply_arg(from_cityscapes('acdc/all', 'train'), arg,
                           variants)
