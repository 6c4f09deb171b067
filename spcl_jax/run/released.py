"""The released code's behaviour where it differs from our defaults
(docs/differences.md): config field -> the released value. The `:released`
variant (`configs/default.released`) sets them all; with `released = True`
a run whose config contradicts one of them is refused (`conflicts`)."""

RELEASED = {
    'stages.spcl.prototype_update': 'before_loss',
    'stages.spcl.decay_absent_classes': True,
    'stages.spcl.target_mask': 'offline',   # the release has no online mask
    'chain_model': 'best',
    'data.image_interpolation': 'bicubic',
    'model.layer_init': 'torch',
    'model.frozen_bn_epsilon': 0.0,
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
