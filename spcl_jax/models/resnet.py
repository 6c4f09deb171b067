"""Dilated ResNets in torchvision's layout (stride on the 3x3 convolution).

`ResNet(stage_sizes, block, strides_to_dilation=(False, True, True))` follows
torchvision's `replace_stride_with_dilation` rule exactly: when a stage trades
its stride for dilation, its first block keeps the previous dilation and the
remaining blocks use the new one (layer3: 1, 2, 2, ...; layer4: 2, 4, 4).
With the rule (False, True, True) the output stride is 8 and an input of
H x W gives ceil(H / 8) x ceil(W / 8) features (each stride-2 step rounds up:
7x7/2 pad 3, 3x3/2 max-pool pad 1, 3x3/2 conv pad 1).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from spcl_jax.models.layers import (BN_EPSILON, BatchNorm, block_groups, conv,
                                    remat_blocks)

Dtype = Any


class _Block(nn.Module):
  """Fields shared by the residual blocks."""
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  bn_trainable: bool = False
  dtype: Dtype = jnp.float32
  frozen_bn_epsilon: float = BN_EPSILON

  def bn(self, name):
    return BatchNorm(self.bn_trainable, dtype=self.dtype,
                     frozen_epsilon=self.frozen_bn_epsilon, name=name)


class BasicBlock(_Block):
  """ResNet-18/34 block. torchvision refuses dilation here; we dilate both 3x3
  convolutions the way the bottleneck dilates its single 3x3: the first block
  of a dilated stage uses the previous dilation, later blocks the new one."""
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = self.bn
    out = conv(self.planes, 3, self.stride, self.dilation, dtype=self.dtype,
               name='conv1')(x)
    out = nn.relu(bn('bn1')(out, train))
    out = conv(self.planes, 3, 1, self.dilation, dtype=self.dtype,
               name='conv2')(out)
    out = bn('bn2')(out, train)
    if self.downsample:
      x = conv(self.planes, 1, self.stride, dtype=self.dtype,
               name='downsample_conv')(x)
      x = bn('downsample_bn')(x, train)
    return nn.relu(out + x)


class Bottleneck(_Block):
  """ResNet-50/101 block, torchvision v1.5 (stride on the 3x3 conv)."""
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = self.bn
    out = conv(self.planes, 1, dtype=self.dtype, name='conv1')(x)
    out = nn.relu(bn('bn1')(out, train))
    out = conv(self.planes, 3, self.stride, self.dilation, dtype=self.dtype,
               name='conv2')(out)
    out = nn.relu(bn('bn2')(out, train))
    out = conv(self.planes * 4, 1, dtype=self.dtype, name='conv3')(out)
    out = bn('bn3')(out, train)
    if self.downsample:
      x = conv(self.planes * 4, 1, self.stride, dtype=self.dtype,
               name='downsample_conv')(x)
      x = bn('downsample_bn')(x, train)
    return nn.relu(out + x)


def block_dilations(stage_sizes: Sequence[int],
                    strides_to_dilation: Sequence[bool]):
  """(stride, dilation) of every block, stage by stage, by torchvision's rule."""
  dilation, plan = 1, []
  for stage, blocks in enumerate(stage_sizes):
    stride = 1 if stage == 0 else 2
    previous = dilation
    if stage > 0 and strides_to_dilation[stage - 1]:
      dilation *= stride
      stride = 1
    plan.append([(stride, previous)] + [(1, dilation)] * (blocks - 1))
  return plan


class ResNet(nn.Module):
  """Backbone only (no pooling, no fc): returns layer4's output."""
  stage_sizes: Sequence[int]
  block: Any
  strides_to_dilation: Sequence[bool] = (False, True, True)
  base_width: int = 64
  bn_trainable: bool = False
  dtype: Dtype = jnp.float32
  frozen_bn_epsilon: float = BN_EPSILON  # 0: the released frozen BatchNorm
  layer_init: str = 'flax'  # accepted for symmetry: every layer is ported
  # 'blocks': every residual block rematerialised; 'groups': and runs of
  # blocks too (layers.REMAT_MODES)
  remat: str = 'none'

  @property
  def num_features(self) -> int:
    return self.base_width * 8 * self.block.expansion

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    x = conv(self.base_width, 7, 2, padding=3, dtype=self.dtype,
             name='conv1')(x)
    x = BatchNorm(self.bn_trainable, dtype=self.dtype,
                  frozen_epsilon=self.frozen_bn_epsilon, name='bn1')(x, train)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    # `train` and the blocks (arguments 2, 3 after the module and x) are
    # static; 'groups': each run of blocks rematerialised as one as well
    run = _run_blocks if self.remat != 'groups' else nn.remat(
        _run_blocks, static_argnums=(2, 3))
    in_channels = self.base_width
    for stage, plan in enumerate(block_dilations(self.stage_sizes,
                                                 self.strides_to_dilation)):
      planes, blocks = self.base_width * 2 ** stage, []
      for index, (stride, dilation) in enumerate(plan):
        downsample = (stride != 1 or
                      in_channels != planes * self.block.expansion)
        blocks.append((f'layer{stage + 1}_{index}', planes, stride, dilation,
                       downsample))
        in_channels = planes * self.block.expansion
      runs = (block_groups(len(blocks)) if self.remat == 'groups'
              else [range(len(blocks))])
      for indices in runs:
        x = run(self, x, train, tuple(blocks[i] for i in indices))
    return x


def _run_blocks(module: ResNet, x, train: bool, blocks: tuple):
  """`blocks` ((name, planes, stride, dilation, downsample) each) of
  `module` applied in order, created in its scope (so their parameter paths
  do not depend on how they are grouped), each rematerialised unless
  `module.remat == 'none'`."""
  # `train` (argument 2, after the module and x) is a Python bool
  block = remat_blocks(module.block, module.remat, static_argnums=(2,))
  for name, planes, stride, dilation, downsample in blocks:
    x = block(planes, stride, dilation, downsample, module.bn_trainable,
              module.dtype, module.frozen_bn_epsilon, name=name)(x, train)
  return x


RESNET_STAGES = {18: ((2, 2, 2, 2), BasicBlock),
                 50: ((3, 4, 6, 3), Bottleneck),
                 101: ((3, 4, 23, 3), Bottleneck)}


def resnet(depth: int, **kw) -> ResNet:
  stages, block = RESNET_STAGES[depth]
  return ResNet(stages, block, **kw)


def torch_prefix(path: Sequence[str]) -> str:
  """torchvision state-dict prefix of a flax module path of `ResNet`:
  ('layer3_5', 'downsample_bn') -> 'layer3.5.downsample.1'."""
  parts = []
  for name in path:
    if name.startswith('layer'):
      parts.extend(name.split('_'))
    elif name == 'downsample_conv':
      parts.append('downsample.0')
    elif name == 'downsample_bn':
      parts.append('downsample.1')
    else:
      parts.append(name)
  return '.'.join(parts)


# torchvision keys the backbone deliberately does not load.
TORCH_KEYS_NOT_LOADED = ('fc.weight', 'fc.bias')
