"""AdaptSegNet's output-space discriminator."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from spcl_jax.models.layers import conv, conv_init

Dtype = Any


class Discriminator(nn.Module):
  """Five 4x4 stride-2 convolutions (padding 1) C -> 64 -> 128 -> 256 -> 512
  -> 1 with LeakyReLU(0.2) between them. Input: the softmax of the
  full-resolution segmentation output [B, H, W, C]; output: one logit per
  location [B, ~H/32, ~W/32, 1] (float32). Source = 0, target = 1."""
  widths: Sequence[int] = (64, 128, 256, 512)
  negative_slope: float = 0.2
  dtype: Dtype = jnp.float32
  layer_init: str = 'flax'  # 'torch': PyTorch's defaults (layers.conv_init)

  @nn.compact
  def __call__(self, probabilities):
    x = probabilities.astype(self.dtype)
    for i, width in enumerate(self.widths):
      x = conv(width, 4, 2, padding=1, use_bias=True, dtype=self.dtype,
               name=f'conv{i + 1}',
               **conv_init(self.layer_init, 16 * x.shape[-1]))(x)
      x = nn.leaky_relu(x, self.negative_slope)
    x = conv(1, 4, 2, padding=1, use_bias=True, dtype=self.dtype,
             name='classifier',
             **conv_init(self.layer_init, 16 * x.shape[-1]))(x)
    return x.astype(jnp.float32)
