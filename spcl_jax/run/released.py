"""The released code's behaviour where it differs from our defaults
(docs/released_code.md): config field -> the released value. The `:released`
variant (`configs/default.released`) sets them all; with `released = True`
a run whose config contradicts one of them is refused (`conflicts`).

`:released` is exactly these fields: the differences that no field
reproduces (per-GPU prototype banks, prototypes not checkpointed, the
thresholds' exact in-memory median at 512x1024) are the table's rows
whose field is "none", each with its reason; `data.source_sampling` is each
recipe config's own (the release's differs by source)."""

RELEASED = {
    'stages.spcl.prototype_update': 'before_loss',
    'stages.spcl.decay_absent_classes': True,
    'stages.spcl.target_mask': 'offline',   # the release has no online mask
    'chain_model': 'best',
    'data.image_interpolation': 'bicubic',
    'model.layer_init': 'torch',
    'model.frozen_bn_epsilon': 0.0,
    'model.pass_bn_epsilon': 1e-5,   # BatchNorm2d's, in the passes
    'data.color_jitter_order': 'before_resize',
    'data.scaled_size_rounding': 'floor',
    # one loss mean per GPU: 1 source + 1 target image per GPU (8 images on
    # 4 GPUs), 2 target images per GPU in self-training
    'stages.warmup.images_per_loss_mean': 1,
    'stages.spcl.images_per_loss_mean': 1,
    'stages.self_training.images_per_loss_mean': 2,
}


def get_field(config, dotted: str):
  """`config`'s field at the dotted path `dotted` ('model.layer_init')."""
  for key in dotted.split('.'):
    config = config[key]
  return config


def apply(config) -> None:
  """Sets every field of RELEASED, and `released = True`."""
  config.released = True
  for dotted, value in RELEASED.items():
    parent, _, key = dotted.rpartition('.')
    (get_field(config, parent) if parent else config)[key] = value


def conflicts(config) -> list:
  """The fields that contradict `released = True` (empty when it is off)."""
  if not config.released:
    return []
  return [f'released = True (the `:released` variant) contradicts '
          f'{dotted} = {get_field(config, dotted)!r}; the released code has '
          f'{value!r}' for dotted, value in RELEASED.items()
          if get_field(config, dotted) != value]
