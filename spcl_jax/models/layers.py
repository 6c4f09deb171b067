"""Building blocks shared by the backbones: convolution with torch-style
explicit padding, and a BatchNorm with a frozen and a trainable mode."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# PyTorch's BatchNorm2d defaults: eps 1e-5, running-average momentum 0.1
# (flax convention: new = momentum * old + (1 - momentum) * batch).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


def conv(features: int, kernel: int, stride: int = 1, dilation: int = 1,
         padding: int | None = None, use_bias: bool = False,
         dtype: Dtype = jnp.float32, name: str | None = None,
         kernel_init=nn.initializers.kaiming_normal(),
         bias_init=nn.initializers.zeros) -> nn.Conv:
  """A 2-D convolution with PyTorch's explicit symmetric padding.

  The default padding `dilation * (kernel - 1) // 2` is torchvision's rule for
  odd kernels ("same" at stride 1); parameters are always float32.
  """
  if padding is None:
    padding = dilation * (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)),
                 kernel_dilation=(dilation, dilation), use_bias=use_bias,
                 dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
                 bias_init=bias_init, name=name)


def torch_conv_init(fan_in: int) -> dict:
  """PyTorch's default Conv2d initialisation as `conv` keyword arguments:
  kernel kaiming-uniform with a = sqrt(5) (U(+-1/sqrt(fan_in))), bias
  U(+-1/sqrt(fan_in)); fan_in = in_channels * kernel_h * kernel_w."""
  bound = fan_in ** -0.5

  def bias_init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return {'kernel_init': nn.initializers.variance_scaling(
      1 / 3, 'fan_in', 'uniform'), 'bias_init': bias_init}


# `model.layer_init`: the initialisations conv_init knows.
LAYER_INITS = ('flax', 'torch')


def conv_init(layer_init: str, fan_in: int) -> dict:
  """`conv` initialisers of `model.layer_init`: 'flax' (kaiming-normal
  kernel, zero bias: conv's defaults) or 'torch' (torch_conv_init)."""
  if layer_init == 'flax':
    return {}
  if layer_init == 'torch':
    return torch_conv_init(fan_in)
  raise ValueError(f'layer_init: {layer_init!r}, expected one of '
                   f'{LAYER_INITS}')


# `model.remat`: 'none', 'blocks' (every residual block / VGG block is
# rematerialised: only its input is kept for the backward pass, the
# activations inside it are recomputed there) or 'groups' (ResNets: as
# 'blocks', and each stage's blocks also rematerialised in runs of about
# sqrt(n) (`block_groups`): the forward pass keeps only each run's input, the
# backward pass one run's block inputs at a time). Parameter paths unchanged.
REMAT_MODES = ('none', 'blocks', 'groups')


def remat_blocks(target, remat: str, **kw):
  """`target` (a Module class, or a function whose first argument is a
  module) wrapped in `flax.linen.remat` unless `remat == 'none'`, else
  itself; `kw`: remat's keyword arguments (static_argnums counts the module
  as argument 0)."""
  if remat not in REMAT_MODES:
    raise ValueError(f'remat: {remat!r}, expected one of {REMAT_MODES}')
  return target if remat == 'none' else nn.remat(target, **kw)


def block_groups(num_blocks: int) -> list[range]:
  """The runs of consecutive blocks `remat='groups'` rematerialises as one:
  ceil(sqrt(n)) blocks each, the last one shorter (23 -> 5, 5, 5, 5, 3)."""
  size = math.isqrt(num_blocks - 1) + 1 if num_blocks > 1 else 1
  return [range(start, min(start + size, num_blocks))
          for start in range(0, num_blocks, size)]


class BatchNorm(nn.Module):
  """BatchNorm over the channel (last) axis with two modes.

  trainable=False ("frozen", stages 1, 4 of the recipe): running statistics are
    always used, never updated, and the affine parameters receive no gradient
    (`stop_gradient`), whatever `train` says.
  trainable=True: under `train=True` the batch statistics are used and the
    running statistics updated like PyTorch (unbiased variance in the running
    average). Under `jax.jit` with the batch sharded over a mesh, the mean over
    the batch axis is the mean over the *global* batch (XLA inserts the
    cross-device reduction), which is SyncBatchNorm's behaviour.
  Normalisation is computed in float32 and cast back to `dtype`; frozen
  BatchNorm adds `frozen_epsilon` to the variance (0: the released code's
  frozen BatchNorm), trainable BatchNorm `epsilon`.
  """
  trainable: bool = False
  epsilon: float = BN_EPSILON
  frozen_epsilon: float = BN_EPSILON
  momentum: float = BN_MOMENTUM
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean',
                            lambda: jnp.zeros((channels,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var',
                           lambda: jnp.ones((channels,), jnp.float32))
    x32 = x.astype(jnp.float32)
    if self.trainable and train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axis=axes)
      var = jnp.mean(jnp.square(x32 - mean), axis=axes)
      if not self.is_initializing():
        count = x32.size // channels
        unbiased = var * count / max(count - 1, 1)
        ra_mean.value = (self.momentum * ra_mean.value
                         + (1.0 - self.momentum) * jax.lax.stop_gradient(mean))
        ra_var.value = (self.momentum * ra_var.value
                        + (1.0 - self.momentum) * jax.lax.stop_gradient(unbiased))
    else:
      mean, var = ra_mean.value, ra_var.value
      if not self.trainable:
        scale = jax.lax.stop_gradient(scale)
        bias = jax.lax.stop_gradient(bias)
    epsilon = self.epsilon if self.trainable else self.frozen_epsilon
    y = (x32 - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias
    return y.astype(self.dtype)
