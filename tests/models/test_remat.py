"""`remat='blocks'`: every ResNet block / VGG block rematerialised, and
`remat='groups'`: runs of ResNet blocks rematerialised again, with the plain
model's parameters, outputs, gradients and BN statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spcl_jax import models
from spcl_jax.models import layers
from spcl_jax.models import resnet
from tests.core.test_micro_batches import random_like

# XLA:CPU compiles these tiny models ~3x faster without its expensive LLVM
# passes; both models of a comparison are compiled alike.
FAST_COMPILE = {'xla_backend_optimization_level': 0,
                'xla_llvm_disable_expensive_passes': True}


def _make(kind, remat, bn_trainable=False):
  if kind != 'vgg16':  # few blocks per stage: cheap to compile
    block = {'basic': resnet.BasicBlock, 'bottleneck': resnet.Bottleneck,
             'deep': resnet.Bottleneck}[kind]
    stages = (1, 4, 3, 1) if kind == 'deep' else (1, 1, 1, 1)
    return resnet.ResNet(stages, block, base_width=4,
                         bn_trainable=bn_trainable, remat=remat)
  return models.create_model('deeplabv2_vgg16', 3, base_width=4,
                             bn_trainable=bn_trainable, remat=remat,
                             aspp_rates=(1, 2))


def _random_variables(model, x, seed=0):
  """Random variables of `model` (shapes only from `init`: nothing is
  compiled op by op); BatchNorm far from the identity."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  return models.with_batch_stats(
      random_like(shapes, np.random.RandomState(seed)))


def _num_checkpoints(jaxpr) -> int:
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name in ('checkpoint', 'remat2')
    for sub in jax.core.jaxprs_in_params(eqn.params):
      count += _num_checkpoints(sub)
  return count


@pytest.mark.parametrize('kind,mode,checkpoints,bn_trainable', [
    ('basic', 'blocks', 4, False), ('bottleneck', 'blocks', 4, True),
    ('vgg16', 'blocks', 7, False),
    # 9 blocks in runs of 1 | 2, 2 | 2, 1 | 1 (block_groups): 6 runs + 9
    ('deep', 'groups', 15, True)])
def test_remat_gives_the_plain_models_values_and_gradients(kind, mode,
                                                           checkpoints,
                                                           bn_trainable):
  plain, remat = _make(kind, 'none', bn_trainable), _make(kind, mode,
                                                          bn_trainable)
  x = jnp.asarray(np.random.RandomState(0).randn(2, 32, 40, 3), jnp.float32)
  variables = _random_variables(plain, x)
  # same parameter tree (paths, shapes): checkpoints load either way
  assert (jax.tree.structure(jax.eval_shape(remat.init, jax.random.PRNGKey(0),
                                            x))
          == jax.tree.structure(jax.eval_shape(plain.init,
                                               jax.random.PRNGKey(0), x)))

  def loss(model):
    def fn(params):
      out, updates = model.apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, x,
          train=True, mutable=['batch_stats'])
      out = out['logits'] if isinstance(out, dict) else out
      weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(
          out.shape)
      return jnp.sum(out * weights), (out, updates)
    return fn

  results = [jax.jit(jax.value_and_grad(loss(m), has_aux=True),
                     compiler_options=FAST_COMPILE)(variables['params'])
             for m in (plain, remat)]
  ((value, (out, updates)), grads), ((value_r, (out_r, updates_r)),
                                     grads_r) = results
  np.testing.assert_allclose(out_r, out, rtol=1e-5, atol=1e-5)
  assert float(value_r) == pytest.approx(float(value), rel=1e-5, abs=1e-4)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
  assert scale > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-6 * scale), grads_r, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               updates_r, updates)
  # the remat model's forward holds one checkpoint per block (and per run
  # of blocks), the plain none
  counts = [_num_checkpoints(jax.make_jaxpr(
      lambda p, m=m: m.apply({'params': p,
                              'batch_stats': variables['batch_stats']}, x,
                             train=False))(variables['params']).jaxpr)
            for m in (plain, remat)]
  assert counts == [0, checkpoints]


def test_config_remat_reaches_every_backbone():
  from configs import default  # pylint: disable=g-import-not-at-top
  from spcl_jax.models import from_config  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.remat = 'blocks'
  for name in models.MODELS:
    config.model.name = name
    assert from_config.model_for_stage(config, False).backbone.remat == 'blocks'


def test_unknown_remat_is_refused():
  with pytest.raises(ValueError, match=r"model.remat: 'layers', expected "
                     r"one of \('none', 'blocks', 'groups'\)"):
    models.create_model('deeplabv2_resnet18', 3, remat='layers')
  with pytest.raises(ValueError, match="model.remat = 'groups' but model "
                     "'deeplabv2_vgg16' has no stages of repeated blocks to "
                     "group; use 'blocks'"):
    models.create_model('deeplabv2_vgg16', 3, remat='groups')


@pytest.mark.parametrize('blocks,runs', [
    (1, [1]), (2, [2]), (3, [2, 1]), (4, [2, 2]), (6, [3, 3]),
    (23, [5, 5, 5, 5, 3])])
def test_groups_are_runs_of_about_sqrt_n_blocks(blocks, runs):
  groups = layers.block_groups(blocks)
  assert [len(g) for g in groups] == runs
  assert [i for g in groups for i in g] == list(range(blocks))


def _kept_for_backward(model, x) -> int:
  """Elements of what the forward pass of `model` keeps for the backward
  pass (the residuals `jax.vjp` closes over, parameters included)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)

  def backward_of(variables):
    def loss(params):
      return jnp.sum(model.apply({'params': params,
                                  'batch_stats': variables['batch_stats']},
                                 x) ** 2)
    return jax.vjp(loss, variables['params'])[1]

  return sum(int(np.prod(leaf.shape)) for leaf in
             jax.tree.leaves(jax.eval_shape(backward_of, shapes)))


def test_groups_keep_only_each_runs_input_for_the_backward_pass():
  """layer3 of 9 blocks at 8x8 (64 x 64 input, output stride 8), 64
  channels: 'blocks' keeps the 9 blocks' inputs, 'groups' the inputs of its
  3 runs of 3; every other stage has one block (a run of one)."""
  x = jnp.zeros((1, 64, 64, 3), jnp.float32)
  kept = {remat: _kept_for_backward(resnet.ResNet(
      (1, 1, 9, 1), resnet.Bottleneck, base_width=4, remat=remat), x)
          for remat in ('none', 'blocks', 'groups')}
  assert kept['none'] > kept['blocks']
  assert kept['blocks'] - kept['groups'] == (9 - 3) * 8 * 8 * 64
