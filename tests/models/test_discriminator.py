"""AdaptSegNet discriminator against a torch reference."""

import jax
import numpy as np
import torch

from benchmarks import torch_reference as ref
from spcl_jax.models import Discriminator


def test_discriminator_matches_torch_reference():
  num_classes = 5
  module = Discriminator()
  probs = jax.nn.softmax(np.random.RandomState(0).randn(2, 70, 98, num_classes)
                         .astype(np.float32))
  variables = module.init(jax.random.key(0), probs)
  ours = module.apply(variables, probs)
  layers, widths = [], (num_classes, 64, 128, 256, 512, 1)
  for i in range(5):
    name = f'conv{i + 1}' if i < 4 else 'classifier'
    conv = torch.nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1)
    p = variables['params'][name]
    with torch.no_grad():
      conv.weight.copy_(torch.tensor(np.asarray(p['kernel']).transpose(3, 2, 0, 1)))
      conv.bias.copy_(torch.tensor(np.asarray(p['bias'])))
    layers.append(conv)
    if i < 4:
      layers.append(torch.nn.LeakyReLU(0.2))
  with torch.no_grad():
    expected = ref.nhwc(torch.nn.Sequential(*layers)(ref.nchw(np.asarray(probs))))
  assert ours.shape == expected.shape == (2, 2, 3, 1)
  assert ref.relative_error(ours, expected) <= 1e-5
