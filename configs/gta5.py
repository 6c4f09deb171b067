"""GTA5 -> Cityscapes, DeepLab-v2 ResNet-101: the released recipe (SPEC §2),
with its class-balanced source sampling (`data.source_sampling`).

Variants: `vgg16` (DeepLab-v2 VGG-16, paper Table 1; the SPEC gives no
VGG-specific optimiser numbers, so the ResNet recipe's are kept),
`source_only` (warm-up with adversarial weight 0), `released` (every
behaviour of the released code, spcl_jax.run.released.RELEASED),
`class_balanced` (self-training on the top 20 % of each class's pseudo labels instead of
the released median rule; default.class_balanced), `mit_b5` (SegFormer on
MiT-B5 with DAFormer's AdamW recipe, 512x512 source crops;
default.segformer_recipe says every number and its source).
"""

from configs import default


def vgg16(config):
  config.model.name = 'deeplabv2_vgg16'


def source_only(config):
  config.stages.warmup.adversarial_weight = 0.0


def get_config(arg=None):
  config = default.get_config()
  config.data.source = 'gta5'
  # the release's class-balanced source sampling (data.source_sampling)
  config.data.source_sampling = 'class_balanced'
  config.data.source_size = (720, 1280)
  config.evaluation.class_sets = (19,)
  return default.apply_arg(config, arg, {'vgg16': vgg16,
                                         'source_only': source_only,
                                         'released': default.released,
                                         'mit_b5': default.mit_b5,
                                         'class_balanced':
                                             default.class_balanced})
