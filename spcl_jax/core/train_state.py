"""The train state and the optimisers of the training stages.

`TrainState` is everything a training step reads and writes: parameters, BN
statistics, optimiser states, the prototype bank, the RNG and the step. It
goes into and comes out of every jitted step (`core.train_steps`).
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from spcl_jax.core import spcl


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes."""
  step: jax.Array                     # int32 scalar
  params: Any                         # segmenter parameters
  batch_stats: Any                    # BatchNorm statistics
  opt_state: Any                      # segmenter optimiser state
  disc_params: Any                    # discriminator parameters ({} if none)
  disc_opt_state: Any                 # discriminator optimiser state
  prototype_bank: spcl.PrototypeBank  # [C, N] prototypes + bookkeeping
  rng: jax.Array                      # uint32 PRNG key, split every step

  def variables(self) -> dict:
    return {'params': self.params, 'batch_stats': self.batch_stats}


# -------------------------------------------------------------- optimisers --

def poly_schedule(lr: float, schedule_steps: int, power: float):
  """lr * (1 - step / schedule_steps) ** power (the released 'poly')."""
  return optax.polynomial_schedule(init_value=lr, end_value=0.0, power=power,
                                   transition_steps=schedule_steps)


def _param_groups(params, batch_stats, bn_trainable: bool):
  """'classifier' (the ASPP head), 'frozen' (BatchNorm affine parameters
  when BN is frozen) or 'backbone', for every parameter leaf."""
  bn_modules = {path[:-1] for path in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(batch_stats))}
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  labels = {}
  for path in flat:
    if path[0] == 'classifier':
      labels[path] = 'classifier'
    elif path[:-1] in bn_modules and not bn_trainable:
      labels[path] = 'frozen'
    else:
      labels[path] = 'backbone'
  return flax.traverse_util.unflatten_dict(labels)


def segmenter_optimizer(stage: ml_collections.ConfigDict, params,
                        batch_stats) -> optax.GradientTransformation:
  """SGD with momentum and PyTorch-style (coupled) weight decay on a poly
  schedule; the classifier at `classifier_lr_multiplier` x the rate; frozen
  BatchNorm parameters are not touched (no decay either)."""
  schedule = poly_schedule(stage.lr, stage.schedule_steps, stage.poly_power)

  def sgd(multiplier):
    return optax.chain(
        optax.add_decayed_weights(stage.weight_decay),
        optax.sgd(lambda step: multiplier * schedule(step),
                  momentum=stage.momentum))

  groups = _param_groups(params, batch_stats, stage.bn_trainable)
  return optax.multi_transform(
      {'backbone': sgd(1.0), 'classifier': sgd(stage.classifier_lr_multiplier),
       'frozen': optax.set_to_zero()}, groups)


def discriminator_optimizer(stage) -> optax.GradientTransformation:
  b1, b2 = stage.discriminator_betas
  return optax.adam(poly_schedule(stage.discriminator_lr,
                                  stage.schedule_steps, stage.poly_power),
                    b1=b1, b2=b2)


def new_train_state(variables, tx, rng, prototype_bank=None,
                    disc_params=None, d_tx=None, num_features=None,
                    num_classes=None) -> TrainState:
  """A stage's initial state: fresh optimiser states, step 0."""
  if prototype_bank is None:
    prototype_bank = spcl.PrototypeBank(
        jnp.zeros((num_classes, num_features), jnp.float32),
        jnp.zeros((num_classes,), jnp.int32))
  disc_params = {} if disc_params is None else disc_params
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=variables['params'],
      batch_stats=variables['batch_stats'],
      opt_state=tx.init(variables['params']), disc_params=disc_params,
      disc_opt_state=d_tx.init(disc_params) if d_tx is not None else {},
      prototype_bank=prototype_bank, rng=rng)
