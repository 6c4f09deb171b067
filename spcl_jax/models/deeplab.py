"""DeepLab-v2: a dilated backbone followed by the ASPP v2 classifier."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from spcl_jax.models.layers import conv, torch_conv_init

Dtype = Any


class ASPPv2(nn.Module):
  """Four parallel 3x3 convolutions N -> C with dilation = padding = each rate,
  outputs **summed** (all four; AdaptSegNet's early return after two branches
  is a bug we do not reproduce). Weights N(0, 0.01); bias 0, or with
  `layer_init='torch'` PyTorch's default Conv2d bias U(±1/sqrt(fan_in)),
  fan_in = 9 N (the released classifier sets only the weights)."""
  num_classes: int
  rates: Sequence[int] = (6, 12, 18, 24)
  dtype: Dtype = jnp.float32
  layer_init: str = 'flax'   # 'flax' or 'torch' (layers.LAYER_INITS)

  @nn.compact
  def __call__(self, x):
    bias_init = {'flax': {}, 'torch': {
        'bias_init': torch_conv_init(9 * x.shape[-1])['bias_init']}}
    if self.layer_init not in bias_init:
      raise ValueError(f'layer_init: {self.layer_init!r}, expected one of '
                       f'{sorted(bias_init)}')
    out = None
    for i, rate in enumerate(self.rates):
      y = conv(self.num_classes, 3, dilation=rate, use_bias=True,
               dtype=self.dtype, name=f'branch{i}',
               kernel_init=nn.initializers.normal(stddev=0.01),
               **bias_init[self.layer_init])(x)
      out = y if out is None else out + y
    return out


class DeepLabV2(nn.Module):
  """`apply(variables, images, train=False)` with images [B, H, W, 3] returns
  {"features": [B, h, w, N] (backbone output, before the classifier),
   "logits": [B, h, w, C]}, both float32, at output stride 8."""
  backbone: nn.Module
  num_classes: int
  aspp_rates: Sequence[int] = (6, 12, 18, 24)
  dtype: Dtype = jnp.float32
  layer_init: str = 'flax'   # of the ASPP biases (ASPPv2)

  @property
  def num_features(self) -> int:
    return self.backbone.num_features

  @nn.compact
  def __call__(self, images, train: bool = False):
    features = self.backbone(images, train)
    logits = ASPPv2(self.num_classes, self.aspp_rates, self.dtype,
                    self.layer_init, name='classifier')(features)
    return {'features': features.astype(jnp.float32),
            'logits': logits.astype(jnp.float32)}
