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


def learning_rate(stage: ml_collections.ConfigDict):
  """The segmenter's learning rate at each step: the poly schedule, times
  mmcv's linear warm-up factor 1 - (1 - step / W) (1 - r) over the first
  W = `lr_warmup_steps` steps (r = `lr_warmup_ratio`: the factor at step
  0), as DAFormer's schedule. W = 0 (and a stage config without the
  field): no warm-up."""
  poly = poly_schedule(stage.lr, stage.schedule_steps, stage.poly_power)
  warmup_steps = int(stage.get('lr_warmup_steps', 0))
  if not warmup_steps:
    return poly
  ratio = float(stage.lr_warmup_ratio)

  def schedule(step):
    progress = jnp.minimum(step / warmup_steps, 1.0)
    # = 1 - (1 - progress)(1 - ratio), without its float32 cancellation
    return poly(step) * (ratio + (1.0 - ratio) * progress)
  return schedule


# `stages.<stage>.optimizer`: the segmenter's optimisers.
OPTIMIZERS = ('sgd', 'adamw')


def _param_groups(params, batch_stats, bn_trainable: bool):
  """'classifier' (the head: ASPP, or SegFormer's decode head), 'frozen'
  (BatchNorm affine parameters when BN is frozen) or 'backbone', for every
  parameter leaf."""
  bn_modules = {path[:-1] for path in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(batch_stats))}
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  labels = {}
  for path in flat:
    if path[:-1] in bn_modules and not bn_trainable:
      labels[path] = 'frozen'
    elif path[0] == 'classifier':
      labels[path] = 'classifier'
    else:
      labels[path] = 'backbone'
  return flax.traverse_util.unflatten_dict(labels)


def decay_mask(params, decay_norms: bool):
  """True for the parameters weight decay reaches: all of them, or with
  `decay_norms` False all but those of modules whose name contains 'norm'
  (the MiT's LayerNorms; DAFormer's `custom_keys={'norm': decay_mult 0}`)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  return flax.traverse_util.unflatten_dict({
      path: decay_norms or not any('norm' in name for name in path[:-1])
      for path in flat})


def segmenter_optimizer(stage: ml_collections.ConfigDict, params,
                        batch_stats) -> optax.GradientTransformation:
  """The segmenter's optimiser on `learning_rate(stage)`, the classifier
  at `classifier_lr_multiplier` x the rate, frozen BatchNorm parameters not
  touched (no decay either). `stage.optimizer`: 'sgd' (momentum,
  PyTorch-style coupled weight decay: the released recipe) or 'adamw'
  (decoupled weight decay, PyTorch's AdamW: DAFormer's recipe)."""
  schedule = learning_rate(stage)
  kind = stage.get('optimizer', 'sgd')
  decay_norms = stage.get('decay_norms', True)
  mask = None if decay_norms else decay_mask(params, decay_norms)

  def group(multiplier):
    rate = lambda step: multiplier * schedule(step)
    if kind == 'sgd':
      return optax.chain(
          optax.add_decayed_weights(stage.weight_decay, mask),
          optax.sgd(rate, momentum=stage.momentum))
    if kind == 'adamw':
      b1, b2 = stage.adam_betas
      return optax.adamw(rate, b1=b1, b2=b2, eps=1e-8,
                         weight_decay=stage.weight_decay, mask=mask)
    raise ValueError(f'optimizer: {kind!r}, expected one of {OPTIMIZERS}')

  groups = _param_groups(params, batch_stats, stage.bn_trainable)
  return optax.multi_transform(
      {'backbone': group(1.0),
       'classifier': group(stage.classifier_lr_multiplier),
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
