"""DeepLab-v2 VGG-16: torchvision's `vgg16().features` without pool4 and
pool5, conv5_x dilated by 2, then fc6 / fc7 as dilated 3x3 convolutions.

Pooling is torchvision's 2x2/2 max-pool (rounds down), so an H x W input
gives floor(H / 8) x floor(W / 8) features.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from spcl_jax.models.layers import BN_EPSILON, conv, conv_init, remat_blocks

Dtype = Any

# (name, out channels, dilation, torchvision `features` index), in order;
# 'pool' entries are 2x2/2 max-pools.
VGG16_TRUNK = (
    ('conv1_1', 64, 1, 0), ('conv1_2', 64, 1, 2), 'pool',
    ('conv2_1', 128, 1, 5), ('conv2_2', 128, 1, 7), 'pool',
    ('conv3_1', 256, 1, 10), ('conv3_2', 256, 1, 12), ('conv3_3', 256, 1, 14),
    'pool',
    ('conv4_1', 512, 1, 17), ('conv4_2', 512, 1, 19), ('conv4_3', 512, 1, 21),
    # pool4 removed
    ('conv5_1', 512, 2, 24), ('conv5_2', 512, 2, 26), ('conv5_3', 512, 2, 28),
    # pool5 removed
)


def _conv_relu_block(module, x, layers, base_width, dtype):
  """The convolutions (+ReLU) of one VGG block, created in `module`'s scope
  (so their parameter paths do not depend on the block grouping)."""
  del module  # the scope the convolutions are created in
  for name, channels, dilation, _ in layers:
    x = nn.relu(conv(channels * base_width // 64, 3, dilation=dilation,
                     use_bias=True, dtype=dtype, name=name)(x))
  return x


class VGG16Trunk(nn.Module):
  """The convolutional trunk up to conv5_3 (+ReLU), output stride 8; every
  width scaled by base_width / 64 (64: the ImageNet layout). Its blocks are
  the conv<i>_x groups (conv1_1-conv1_2, ..., conv5_1-conv5_3); remat='blocks'
  rematerialises each."""
  dtype: Dtype = jnp.float32
  base_width: int = 64
  remat: str = 'none'

  @nn.compact
  def __call__(self, x):
    x = x.astype(self.dtype)
    # layers, base width and dtype (arguments 2-4) are static
    block = remat_blocks(_conv_relu_block, self.remat,
                         static_argnums=(2, 3, 4))
    run = []  # the current block: convolutions of one conv<i>_x group
    for layer in (*VGG16_TRUNK, 'end'):
      if run and (layer in ('pool', 'end') or layer[0][:5] != run[0][0][:5]):
        x = block(self, x, tuple(run), self.base_width, self.dtype)
        run = []
      if layer == 'pool':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      elif layer != 'end':
        run.append(layer)
    return x


class VGG16(nn.Module):
  """Trunk + fc6 (3x3, 512->1024, dilation 4) + fc7 (3x3, 1024->1024,
  dilation 4), ReLU after each; fc6/fc7 are always freshly initialised.
  base_width (default 64, the ImageNet layout) scales every width (fc6/fc7:
  16 x base_width); smaller values make tests cheaper."""
  fc_dilation: int = 4
  base_width: int = 64
  bn_trainable: bool = False  # VGG-16 has no BatchNorm; accepted for symmetry.
  dtype: Dtype = jnp.float32
  frozen_bn_epsilon: float = BN_EPSILON  # no BatchNorm; accepted for symmetry
  layer_init: str = 'flax'  # of fc6/fc7: 'flax' or 'torch' (layers.conv_init)
  remat: str = 'none'  # 'blocks': each trunk block and fc6, fc7 rematerialised

  @property
  def fc_width(self) -> int:
    return 16 * self.base_width

  @property
  def num_features(self) -> int:
    return self.fc_width

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no BatchNorm, no dropout
    x = VGG16Trunk(self.dtype, self.base_width, self.remat, name='trunk')(x)
    block = remat_blocks(_fc_block, self.remat, static_argnums=(2, 3, 4, 5, 6))
    for name in ('fc6', 'fc7'):
      x = block(self, x, name, self.fc_width, self.fc_dilation,
                self.layer_init, self.dtype)
    return x


def _fc_block(module, x, name, width, dilation, layer_init, dtype):
  """fc6 or fc7 (+ReLU), created in `module`'s scope."""
  del module
  init = conv_init(layer_init, 9 * x.shape[-1])
  return nn.relu(conv(width, 3, dilation=dilation, **init, use_bias=True,
                      dtype=dtype, name=name)(x))


def torch_prefix(path: Sequence[str]) -> str:
  """torchvision state-dict prefix of a flax module path of `VGG16`:
  ('trunk', 'conv5_3') -> 'features.28'."""
  if len(path) != 2 or path[0] != 'trunk':
    raise KeyError(f'no torchvision counterpart for VGG16 module {path}')
  index = {layer[0]: layer[3] for layer in VGG16_TRUNK if layer != 'pool'}
  return f'features.{index[path[1]]}'


# torchvision keys the backbone deliberately does not load: the classifier
# (fc6 / fc7 here are dilated convolutions of other shapes, freshly initialised).
TORCH_KEYS_NOT_LOADED = tuple(f'classifier.{i}.{leaf}' for i in (0, 3, 6)
                              for leaf in ('weight', 'bias'))
