"""Dilated ResNet backbones against torchvision itself (random weights)."""

import jax
import numpy as np
import pytest
import torch
import torchvision

from benchmarks import torch_reference as ref
from spcl_jax.models import porting
from spcl_jax.models import resnet

TOLERANCE = 1e-4  # max abs error relative to the output's max magnitude


def _torch_resnet(depth, dilation, seed=0):
  torch.manual_seed(seed)
  model = getattr(torchvision.models, f'resnet{depth}')(
      weights=None, replace_stride_with_dilation=dilation).eval()
  ref.randomize_batchnorm(model, seed)
  return model


@pytest.mark.parametrize('depth', [50, 101])
def test_dilated_resnet_matches_torchvision_layer4(depth):
  model = _torch_resnet(depth, [False, True, True])
  variables = porting.port_state_dict(f'resnet{depth}',
                                      ref.state_dict_numpy(model))
  x = np.random.RandomState(depth).randn(2, 97, 129, 3).astype(np.float32)
  with torch.no_grad():
    expected = ref.nhwc(ref.resnet_trunk(model, ref.nchw(x)))
  ours = jax.jit(resnet.resnet(depth).apply)(variables, x)
  assert ours.shape == expected.shape == (2, 13, 17, 2048)
  assert ref.relative_error(ours, expected) <= TOLERANCE


def test_resnet18_ports_onto_undilated_torchvision():
  # torchvision refuses dilated BasicBlocks; the port itself is checked at
  # output stride 32 where both sides are defined.
  model = _torch_resnet(18, [False, False, False], seed=3)
  variables = porting.port_state_dict('resnet18', ref.state_dict_numpy(model))
  x = np.random.RandomState(1).randn(1, 66, 90, 3).astype(np.float32)
  with torch.no_grad():
    expected = ref.nhwc(ref.resnet_trunk(model, ref.nchw(x)))
  ours = resnet.resnet(18, strides_to_dilation=(False, False, False)).apply(
      variables, x)
  assert ours.shape == expected.shape
  assert ref.relative_error(ours, expected) <= TOLERANCE


def test_block_dilations_follow_torchvision_rule():
  model = torchvision.models.resnet101(
      weights=None, replace_stride_with_dilation=[False, True, True])
  plan = resnet.block_dilations((3, 4, 23, 3), (False, True, True))
  for stage, blocks in enumerate(plan):
    layer = getattr(model, f'layer{stage + 1}')
    for (stride, dilation), block in zip(blocks, layer, strict=True):
      assert block.conv2.stride == (stride, stride)
      assert block.conv2.dilation == (dilation, dilation)
  # layer3: 1 then 2; layer4: 2 then 4.
  assert [d for _, d in plan[2]] == [1] + [2] * 22
  assert [d for _, d in plan[3]] == [2, 4, 4]


@pytest.mark.parametrize('size,expected', [((64, 96), (8, 12)),
                                           ((97, 129), (13, 17)),
                                           ((33, 31), (5, 4))])
def test_output_stride_8_rounds_up(size, expected):
  backbone = resnet.resnet(18, base_width=8)
  shapes = jax.eval_shape(backbone.init, jax.random.key(0),
                          np.zeros((1, *size, 3), np.float32))
  out = jax.eval_shape(backbone.apply, shapes,
                       np.zeros((1, *size, 3), np.float32))
  assert out.shape == (1, *expected, 64)
  assert expected == tuple(-(-s // 8) for s in size)
