"""DeepLab-v2 assembly: ASPP v2, the public contract, bf16, bad names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import torch_reference as ref
from spcl_jax.models import ASPPv2, create_model, init_variables, MODELS


def test_aspp_v2_sums_four_dilated_convs_like_torch():
  module = ASPPv2(num_classes=7)
  x = np.random.RandomState(0).randn(2, 13, 17, 16).astype(np.float32)
  variables = module.init(jax.random.key(1), x)
  ours = module.apply(variables, x)
  expected = 0
  with torch.no_grad():
    for i, rate in enumerate((6, 12, 18, 24)):
      conv = torch.nn.Conv2d(16, 7, 3, padding=rate, dilation=rate)
      p = variables['params'][f'branch{i}']
      conv.weight.copy_(torch.tensor(np.asarray(p['kernel']).transpose(3, 2, 0, 1)))
      conv.bias.copy_(torch.tensor(np.asarray(p['bias'])))
      expected = expected + conv(ref.nchw(x))
  assert ours.shape == (2, 13, 17, 7)
  assert ref.relative_error(ours, ref.nhwc(expected)) <= 1e-5


def test_aspp_init_is_normal_0_01_with_zero_bias():
  module = ASPPv2(num_classes=19)
  params = module.init(jax.random.key(0), jnp.zeros((1, 4, 4, 512)))['params']
  kernels = np.concatenate([np.ravel(params[f'branch{i}']['kernel'])
                            for i in range(4)])
  assert abs(kernels.std() - 0.01) < 5e-4 and abs(kernels.mean()) < 5e-4
  for i in range(4):
    assert not np.any(np.asarray(params[f'branch{i}']['bias']))


@pytest.mark.parametrize('name,size,expected,channels', [
    ('deeplabv2_resnet101', (97, 129), (13, 17), 2048),
    ('deeplabv2_resnet101', (64, 128), (8, 16), 2048),
    ('deeplabv2_resnet50', (65, 127), (9, 16), 2048),
    ('deeplabv2_resnet18', (97, 129), (13, 17), 512),
    ('deeplabv2_vgg16', (97, 129), (12, 16), 1024),
    ('deeplabv2_vgg16', (64, 128), (8, 16), 1024),
])
def test_contract_shapes_at_output_stride_8(name, size, expected, channels):
  model = create_model(name, 19)
  images = jnp.zeros((2, *size, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), shapes,
                       images)
  assert set(out) == {'features', 'logits'}
  assert out['features'].shape == (2, *expected, channels)
  assert out['logits'].shape == (2, *expected, 19)
  assert out['features'].dtype == out['logits'].dtype == jnp.float32


# Documented tolerance of bfloat16 compute (parameters float32): max abs
# difference of the logits <= 5% of their max magnitude.
BF16_TOLERANCE = 0.05


def test_bfloat16_compute_stays_close_to_float32():
  images = np.random.RandomState(0).randn(2, 64, 80, 3).astype(np.float32)
  f32 = create_model('deeplabv2_resnet18', 19)
  bf16 = create_model('deeplabv2_resnet18', 19, dtype=jnp.bfloat16)
  variables = init_variables(f32, jax.random.key(0))
  variables_bf16 = init_variables(bf16, jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables_bf16))
  out32 = jax.jit(f32.apply)(variables, images)
  out16 = jax.jit(bf16.apply)(variables, images)
  assert out16['logits'].dtype == jnp.float32
  error = ref.relative_error(out16['logits'], out32['logits'])
  assert 0 < error <= BF16_TOLERANCE


def test_unknown_model_name_lists_known_names():
  with pytest.raises(ValueError) as e:
    create_model('deeplabv3_resnet101', 19)
  for name in MODELS:
    assert name in str(e.value)


def test_unknown_keyword_is_named():
  with pytest.raises(TypeError, match='bn_trainabel'):
    create_model('deeplabv2_resnet50', 19, bn_trainabel=True)
