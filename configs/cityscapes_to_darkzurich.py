"""Cityscapes -> Dark Zurich (daytime to nighttime), DeepLab-v2 ResNet-101
with the SPCL recipe of configs/default.py: only the data differ.

Source: Cityscapes `train` (2,975 labelled frames, 2048x1024, read at
512x1024). Target: Dark Zurich's unlabelled night training images
(`train_night`, 2,416 frames, 1920x1080, read at 576x1024: the same width,
the aspect kept). Validation: the 50 labelled night frames (`validation`),
19 classes. Build both datasets first:
  python -m data_prep.build --dataset spcl_cityscapes --manual_dir CS \
      --data_dir D
  python -m data_prep.build --dataset dark_zurich --manual_dir DZ --data_dir D
Variants: `vgg16`, `source_only`, `released`, `class_balanced` (as in
configs/gta5.py).
"""

from configs import cityscapes_to_acdc
from configs import default


def get_config(arg=None):
  return default.apply_arg(
      cityscapes_to_acdc.from_cityscapes('dark_zurich', 'train_night'), arg,
      cityscapes_to_acdc.VARIANTS)
