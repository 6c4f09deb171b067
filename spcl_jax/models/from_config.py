"""The networks a config names: the segmenter of `config.model` (with frozen
or trainable BatchNorm, as a stage trains it) and the discriminator of
`config.discriminator`."""

import jax.numpy as jnp

from spcl_jax import models


def model_kwargs(config) -> dict:
  """create_model keyword arguments of the config's model."""
  return {'dtype': jnp.dtype(config.model.dtype),
          'aspp_rates': tuple(config.model.aspp_rates),
          'base_width': config.model.base_width,
          'frozen_bn_epsilon': config.model.frozen_bn_epsilon,
          'layer_init': config.model.layer_init,
          'remat': config.model.get('remat', 'none')}


def model_for_stage(config, bn_trainable: bool):
  return models.create_model(config.model.name, config.model.num_classes,
                             bn_trainable=bn_trainable, **model_kwargs(config))


def discriminator_for(config):
  return models.Discriminator(tuple(config.discriminator.widths),
                              config.discriminator.negative_slope,
                              layer_init=config.model.layer_init)
