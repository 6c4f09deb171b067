"""DeepLab-v2 VGG-16 trunk against torchvision's modified vgg16().features."""

import jax
import numpy as np
import torch
import torchvision

from benchmarks import torch_reference as ref
from spcl_jax.models import porting
from spcl_jax.models import vgg


def test_vgg16_trunk_matches_modified_torchvision_features():
  torch.manual_seed(0)
  model = torchvision.models.vgg16(weights=None).eval()
  variables = porting.port_state_dict('vgg16', ref.state_dict_numpy(model))
  x = np.random.RandomState(0).randn(1, 97, 129, 3).astype(np.float32)
  with torch.no_grad():
    expected = ref.nhwc(ref.deeplab_vgg16_trunk(model)(ref.nchw(x)))
  trunk_variables = {'params': variables['params']['trunk']}
  ours = jax.jit(vgg.VGG16Trunk().apply)(trunk_variables, x)
  assert ours.shape == expected.shape == (1, 12, 16, 512)  # floor(H / 8)
  assert ref.relative_error(ours, expected) <= 1e-4


def test_vgg16_fc6_fc7_are_dilated_3x3_and_fresh():
  module = vgg.VGG16()
  x = np.zeros((1, 40, 48, 3), np.float32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)['params']
  assert shapes['fc6']['kernel'].shape == (3, 3, 512, 1024)
  assert shapes['fc7']['kernel'].shape == (3, 3, 1024, 1024)
  assert jax.eval_shape(module.apply, {'params': shapes}, x).shape == (
      1, 5, 6, 1024)
  # fc6 / fc7 are not among the leaves taken from torchvision.
  torch_leaves = porting._ported_leaves('vgg16')  # pylint: disable=protected-access
  assert not [p for p in torch_leaves if p[-2] in ('fc6', 'fc7')]
  assert len(torch_leaves) == 26  # 13 convolutions x (kernel, bias)
