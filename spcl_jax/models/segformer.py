"""SegFormer: the Mix Transformer encoder and the all-MLP decode head.

The head projects each of the encoder's four maps to `decoder_width`
channels (a linear layer), upsamples them bilinearly (half-pixel centres,
PyTorch's `align_corners=False`) to the stride-4 map's size, concatenates
them deepest first, fuses them (1x1 convolution without bias, BatchNorm,
ReLU) and classifies (dropout, 1x1 convolution). SPCL's features are the
fused map (after the ReLU, before the dropout), as SePiCo takes them on
DAFormer; the logits are at stride 4.

BatchNorm: the encoder has none (LayerNorm only); the head's one BatchNorm
follows the stage's `bn_trainable` like DeepLab's: frozen (running
statistics, no gradient to its scale and bias) in the stages that freeze
BatchNorm, batch statistics over the global batch where BN trains.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spcl_jax.models.layers import BN_EPSILON, BatchNorm, conv
from spcl_jax.models.mit import MixTransformer, conv_fan_out_init, dense

Dtype = Any


def upsample_bilinear(x, height: int, width: int):
  """[B, h, w, C] -> [B, height, width, C], bilinear with half-pixel centres
  (PyTorch's `interpolate(..., align_corners=False)` when enlarging)."""
  if x.shape[1:3] == (height, width):
    return x
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]),
                          'bilinear', antialias=False)


class SegFormerHead(nn.Module):
  """maps (four [B, h_i, w_i, C_i]) -> (features [B, h_1, w_1, D],
  logits [B, h_1, w_1, num_classes])."""
  num_classes: int
  width: int
  dropout_rate: float = 0.1
  bn_trainable: bool = False
  frozen_bn_epsilon: float = BN_EPSILON
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, maps, train: bool = False):
    height, width = maps[0].shape[1:3]
    projected = [upsample_bilinear(dense(self.width, self.dtype,
                                         f'linear_c{i + 1}')(m),
                                   height, width)
                 for i, m in enumerate(maps)]
    x = jnp.concatenate(projected[::-1], axis=-1)
    x = conv(self.width, 1, dtype=self.dtype, name='fuse',
             kernel_init=conv_fan_out_init())(x)
    x = BatchNorm(self.bn_trainable, dtype=self.dtype,
                  frozen_epsilon=self.frozen_bn_epsilon,
                  name='fuse_bn')(x, train)
    features = nn.relu(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
    logits = conv(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                  name='logits', kernel_init=conv_fan_out_init())(x)
    return features, logits


class SegFormer(nn.Module):
  """`apply(variables, images, train=False)` with images [B, H, W, 3]
  returns {"features": [B, h, w, D] (the head's fused map), "logits":
  [B, h, w, C]}, both float32, at stride 4 (h = ceil(H / 4)). Parameters:
  {"backbone": the encoder, "classifier": the whole decode head}. Under
  `train` stochastic depth and the head's dropout draw from the rng stream
  'dropout'."""
  backbone: MixTransformer
  num_classes: int
  head_dropout: float = 0.1
  bn_trainable: bool = False
  frozen_bn_epsilon: float = BN_EPSILON
  dtype: Dtype = jnp.float32

  @property
  def num_features(self) -> int:
    return self.backbone.variant.decoder_width

  @nn.compact
  def __call__(self, images, train: bool = False):
    maps = self.backbone(images, train)
    features, logits = SegFormerHead(
        self.num_classes, self.num_features, self.head_dropout,
        self.bn_trainable, self.frozen_bn_epsilon, self.dtype,
        name='classifier')(maps, train)
    return {'features': features.astype(jnp.float32),
            'logits': logits.astype(jnp.float32)}
