"""The outputs of earlier stages a stage starts from: their saved models
(`chain_model`: the final or the best one) and prototype banks."""

import jax
import jax.numpy as jnp

from spcl_jax.core import spcl
from spcl_jax.infra import checkpoint
from spcl_jax.infra import workdir as workdir_lib
from spcl_jax import models


def load_variables(directory: str, model, mesh):
  """A saved `model` directory's variables, replicated over `mesh`."""
  shapes = jax.eval_shape(lambda: models.init_variables(model,
                                                        jax.random.key(0)))
  return checkpoint.load_tree(directory,
                              checkpoint.abstract_like(shapes, mesh))


# `chain_model`: what a stage starts from (see configs/default.py).
CHAIN_MODELS = ('final', 'best')


def model_directory(ctx, stage_name: str) -> str:
  """The saved model of the finished training stage `stage_name` that a
  later stage starts from: DIR/<stage>/model ('final'), or its best model on
  the validation split, DIR/<stage>/best/<best_step>/state ('best')."""
  if ctx.config.chain_model == 'final':
    return ctx.stage_dir(stage_name, 'model')
  step = workdir_lib.read_json(ctx.done_path(stage_name))['best_step']
  return ctx.stage_dir(stage_name, 'best', str(step), 'state')


def load_model(ctx, stage_name: str, model):
  return load_variables(model_directory(ctx, stage_name), model, ctx.mesh)


def load_prototypes(ctx, stage_name: str, num_features: int):
  c = ctx.config.model.num_classes
  abstract = spcl.PrototypeBank(
      jax.ShapeDtypeStruct((c, num_features), jnp.float32),
      jax.ShapeDtypeStruct((c,), jnp.int32))
  return checkpoint.load_tree(ctx.stage_dir(stage_name, 'prototypes'),
                              checkpoint.abstract_like(abstract, ctx.mesh))

