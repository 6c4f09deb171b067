"""Frozen and trainable BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from spcl_jax.core import mesh as mesh_lib
from spcl_jax.models import create_model, init_variables
from spcl_jax.models.layers import BatchNorm

X = np.random.RandomState(0).randn(4, 5, 6, 3).astype(np.float32) * 2 + 1


def _variables():
  return {'params': {'scale': jnp.array([1.5, 0.5, 2.0]),
                     'bias': jnp.array([0.1, -0.2, 0.3])},
          'batch_stats': {'mean': jnp.array([0.2, -0.1, 0.5]),
                          'var': jnp.array([1.2, 0.8, 2.5])}}


def test_frozen_batchnorm_has_zero_affine_gradient_and_fixed_stats():
  bn = BatchNorm(trainable=False)
  variables = _variables()

  def loss(params):
    out, updates = bn.apply({**variables, 'params': params}, X, train=True,
                            mutable=['batch_stats'])
    return jnp.sum(out ** 2), updates

  grads, updates = jax.grad(loss, has_aux=True)(variables['params'])
  assert np.all(np.asarray(grads['scale']) == 0)
  assert np.all(np.asarray(grads['bias']) == 0)
  for name in ('mean', 'var'):
    np.testing.assert_array_equal(updates['batch_stats'][name],
                                  variables['batch_stats'][name])
  # and it normalises with the running statistics, train or not
  out = bn.apply(variables, X, train=True, mutable=['batch_stats'])[0]
  s = variables['batch_stats']
  expected = ((X - s['mean']) / np.sqrt(s['var'] + 1e-5)
              * variables['params']['scale'] + variables['params']['bias'])
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_trainable_batchnorm_matches_torch_training_mode():
  bn = BatchNorm(trainable=True)
  variables = _variables()
  out, updates = bn.apply(variables, X, train=True, mutable=['batch_stats'])
  torch_bn = torch.nn.BatchNorm2d(3, eps=1e-5, momentum=0.1).train()
  with torch.no_grad():
    torch_bn.weight.copy_(torch.tensor(np.asarray(variables['params']['scale'])))
    torch_bn.bias.copy_(torch.tensor(np.asarray(variables['params']['bias'])))
    torch_bn.running_mean.copy_(
        torch.tensor(np.asarray(variables['batch_stats']['mean'])))
    torch_bn.running_var.copy_(
        torch.tensor(np.asarray(variables['batch_stats']['var'])))
    expected = torch_bn(torch.from_numpy(X).permute(0, 3, 1, 2))
  np.testing.assert_allclose(out, expected.permute(0, 2, 3, 1).numpy(),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['mean'],
                             torch_bn.running_mean.numpy(), rtol=1e-6)
  np.testing.assert_allclose(updates['batch_stats']['var'],
                             torch_bn.running_var.numpy(), rtol=1e-6)
  # affine parameters get gradients in trainable mode
  grads = jax.grad(lambda p: jnp.sum(bn.apply(
      {**variables, 'params': p}, X, train=True,
      mutable=['batch_stats'])[0] ** 3))(variables['params'])
  assert np.abs(np.asarray(grads['scale'])).min() > 0


def test_trainable_batchnorm_uses_global_batch_when_sharded():
  """8 devices, batch sharded: the statistics equal the one-device ones."""
  model = create_model('deeplabv2_resnet18', 5, bn_trainable=True,
                       base_width=8)
  variables = init_variables(model, jax.random.key(0))
  images = np.random.RandomState(0).randn(8, 32, 40, 3).astype(np.float32)
  images[:4] += 3.0  # make the per-shard statistics differ from the global

  def step(variables, images):
    out, updates = model.apply(variables, images, train=True,
                               mutable=['batch_stats'])
    return out['logits'], updates['batch_stats']

  single_logits, single_stats = jax.jit(step)(variables, images)
  mesh = mesh_lib.make_mesh()
  sharded = jax.device_put(images, mesh_lib.batch_sharding(mesh))
  replicated = jax.device_put(variables, mesh_lib.replicated(mesh))
  multi_logits, multi_stats = jax.jit(step)(replicated, sharded)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(multi_logits, single_logits, rtol=1e-4,
                             atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               multi_stats, single_stats)


def test_frozen_batchnorm_epsilon_zero_is_the_released_frozen_bn():
  """model.frozen_bn_epsilon = 0: (x - mean) / sqrt(var) * scale + bias."""
  v = _variables()
  stats, params = v['batch_stats'], v['params']
  by_hand = {eps: (X - stats['mean']) / np.sqrt(stats['var'] + eps)
             * params['scale'] + params['bias'] for eps in (0.0, 1e-5)}
  released = BatchNorm(frozen_epsilon=0.0).apply(v, X, train=True)
  default = BatchNorm().apply(v, X, train=True)
  np.testing.assert_allclose(released, by_hand[0.0], rtol=1e-6)
  np.testing.assert_allclose(default, by_hand[1e-5], rtol=1e-6)
  assert not np.allclose(released, default, rtol=1e-7, atol=0)
  # the trainable mode's ε is not the frozen one
  trainable = BatchNorm(True, frozen_epsilon=0.0).apply(v, X, train=False)
  np.testing.assert_allclose(trainable, by_hand[1e-5], rtol=1e-6)


def test_resnet_threads_frozen_bn_epsilon_to_every_batchnorm():
  model = create_model('deeplabv2_resnet18', 3, base_width=8,
                       frozen_bn_epsilon=0.0)
  variables = init_variables(model, jax.random.key(0), (16, 16))
  other = create_model('deeplabv2_resnet18', 3, base_width=8)
  x = jnp.asarray(X[:1, :, :, :])
  # zero running variance of one channel: no ε -> inf/nan, ε -> finite
  flat = jax.tree_util.tree_map(lambda a: a, variables)
  flat['batch_stats']['backbone']['bn1']['var'] = (
      flat['batch_stats']['backbone']['bn1']['var'].at[0].set(0.0))
  assert np.isfinite(other.apply(flat, x)['logits']).all()
  assert not np.isfinite(model.apply(flat, x)['logits']).all()


@pytest.mark.parametrize('module', ['discriminator', 'vgg_fc6'])
def test_torch_layer_init_is_pytorch_default(module):
  """layer_init='torch': kernel U(+-1/sqrt(fan_in)) (kaiming-uniform with
  a = sqrt(5)) and bias U(+-1/sqrt(fan_in)), as torch.nn.Conv2d."""
  from spcl_jax.models import Discriminator  # pylint: disable=g-import-not-at-top
  from spcl_jax.models import vgg  # pylint: disable=g-import-not-at-top
  if module == 'discriminator':
    make = lambda init: Discriminator((32, 16, 8, 8), layer_init=init)
    x, path, fan_in = jnp.zeros((1, 64, 64, 19)), ('conv1',), 19 * 16
  else:
    make = lambda init: vgg.VGG16(base_width=8, layer_init=init)
    x, path, fan_in = jnp.zeros((1, 32, 32, 3)), ('fc6',), 64 * 9
  params = {init: make(init).init(jax.random.key(0), x)['params']
            for init in ('flax', 'torch')}
  layer = {k: p[path[0]] for k, p in params.items()}
  kernel, bias = (np.asarray(layer['torch']['kernel']),
                  np.asarray(layer['torch']['bias']))
  bound = 1 / np.sqrt(fan_in)
  torch_conv = torch.nn.Conv2d(kernel.shape[2], kernel.shape[3],
                               kernel.shape[0])
  assert torch_conv.weight.abs().max().item() <= bound
  assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
  assert kernel.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)
  assert torch_conv.weight.std().item() == pytest.approx(bound / np.sqrt(3),
                                                         rel=0.05)
  assert np.abs(bias).min() > 0 and np.abs(bias).max() > bound / 2
  assert not np.asarray(layer['flax']['bias']).any()  # flax: zero bias
  assert np.asarray(layer['flax']['kernel']).std() == pytest.approx(
      np.sqrt(2 / fan_in), rel=0.05)  # flax: kaiming-normal


def test_torch_layer_init_gives_the_aspp_pytorch_default_biases():
  """The released classifier sets only its weights (N(0, 0.01)); its biases
  keep nn.Conv2d's default U(+-1/sqrt(9 N)). layer_init='flax': bias 0."""
  x = jnp.zeros((1, 32, 32, 3))
  params = {init: create_model('deeplabv2_vgg16', 5, base_width=8,
                               layer_init=init).init(jax.random.key(0), x)
            ['params']['classifier'] for init in ('flax', 'torch')}
  features = params['torch']['branch0']['kernel'].shape[2]   # N of fc7
  bound = 1 / np.sqrt(9 * features)
  torch_biases = np.concatenate([np.asarray(params['torch'][f'branch{i}']
                                            ['bias']) for i in range(4)])
  assert np.abs(torch_biases).max() <= bound
  assert np.abs(torch_biases).min() > 0
  assert np.abs(torch_biases).max() > bound / 2
  assert len(set(torch_biases.tolist())) == 20   # four independent draws
  for init in ('flax', 'torch'):
    kernel = np.asarray(params[init]['branch0']['kernel'])
    assert kernel.std() == pytest.approx(0.01, rel=0.05)
  assert not any(np.asarray(params['flax'][f'branch{i}']['bias']).any()
                 for i in range(4))
