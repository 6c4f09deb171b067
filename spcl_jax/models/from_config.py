"""The networks a config names: the segmenter of `config.model` (with frozen
or trainable BatchNorm, as a stage trains it) and the discriminator of
`config.discriminator`."""

import jax.numpy as jnp

from spcl_jax import models


def family(config) -> str:
  """'deeplab' or 'segformer': the family of the config's model."""
  return models.check_name(config.model.name).family


def _family_kwargs(config, kwargs: dict) -> dict:
  """Those of `kwargs` the config's model family takes (models.FAMILY_KW)."""
  return {k: v for k, v in kwargs.items()
          if k in models.FAMILY_KW[family(config)]}


def width_kwargs(config) -> dict:
  """The keyword arguments that narrow the config's model (DeepLab's
  `base_width`; a SegFormer's width is its variant's)."""
  return _family_kwargs(config, {'base_width': config.model.base_width})


def model_kwargs(config) -> dict:
  """create_model keyword arguments of the config's model."""
  model = config.model
  return _family_kwargs(config, {
      'dtype': jnp.dtype(model.dtype),
      'frozen_bn_epsilon': model.frozen_bn_epsilon,
      'layer_init': model.layer_init, 'remat': model.get('remat', 'none'),
      'base_width': model.base_width,
      'aspp_rates': tuple(model.aspp_rates),
      'drop_path_rate': model.get('drop_path_rate', 0.0),
      'head_dropout': model.get('head_dropout', 0.0)})


def model_for_stage(config, bn_trainable: bool):
  return models.create_model(config.model.name, config.model.num_classes,
                             bn_trainable=bn_trainable, **model_kwargs(config))


def model_for_pass(config):
  """The segmenter with frozen BatchNorm whose ε is `model.pass_bn_epsilon`
  (`model.frozen_bn_epsilon` for a config written before the field): the
  prototype and pseudo-label passes', and the evaluation of a stage that
  trains BatchNorm."""
  epsilon = config.model.get('pass_bn_epsilon',
                             config.model.frozen_bn_epsilon)
  return models.create_model(config.model.name, config.model.num_classes,
                             bn_trainable=False, **{
                                 **model_kwargs(config),
                                 'frozen_bn_epsilon': epsilon})


def model_for_evaluation(config, stage_name: str):
  """The segmenter (frozen BatchNorm) that evaluates training stage
  `stage_name`'s model, as the released test.py does: with the stage's own
  frozen BatchNorm where it trains with frozen BatchNorm, with
  `model_for_pass`'s ε where it trains BatchNorm (self-training)."""
  if config.stages[stage_name].get('bn_trainable', False):
    return model_for_pass(config)
  return model_for_stage(config, False)


def discriminator_for(config):
  return models.Discriminator(tuple(config.discriminator.widths),
                              config.discriminator.negative_slope,
                              layer_init=config.model.layer_init)
