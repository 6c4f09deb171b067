"""The Mix Transformer (MiT) encoder of SegFormer (Xie et al., NeurIPS 2021).

Four stages; each one an overlapping patch embedding (a strided convolution
whose kernel overlaps its neighbours', then LayerNorm), a run of transformer
blocks (efficient self-attention whose keys and values come from a
sequence reduced by a strided convolution, and a Mix-FFN: linear, depth-wise
3x3 convolution, GELU, linear), and a LayerNorm. An input of H x W gives
maps at strides 4, 8, 16, 32 (each stride-s step rounds up: kernel 7 / 3,
padding kernel // 2). Activations are NHWC; every parameter is float32.

`MIT_VARIANTS` holds the published B0 ... B5 sizes and the CPU demo's
narrow member. Parameter paths and how `transformers`' checkpoint keys map
onto them: `hf_prefix`.
"""

import re
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from spcl_jax.models.layers import remat_blocks

Dtype = Any

# torch.nn.LayerNorm's default, as transformers' SegFormer (NVlabs' and
# DAFormer's mit_b* use 1e-6 in the blocks: a negligible difference)
LAYER_NORM_EPSILON = 1e-5


class MiTVariant(NamedTuple):
  widths: tuple          # hidden size of each stage
  depths: tuple          # transformer blocks of each stage
  heads: tuple           # attention heads of each stage
  reductions: tuple      # sequence-reduction ratio of each stage
  decoder_width: int     # the SegFormer head's width for this encoder
  mlp_ratio: int = 4
  patch_sizes: tuple = (7, 3, 3, 3)
  strides: tuple = (4, 2, 2, 2)


_HEADS, _REDUCTIONS = (1, 2, 5, 8), (8, 4, 2, 1)
MIT_VARIANTS = {
    'b0': MiTVariant((32, 64, 160, 256), (2, 2, 2, 2), _HEADS, _REDUCTIONS,
                     256),
    'b1': MiTVariant((64, 128, 320, 512), (2, 2, 2, 2), _HEADS, _REDUCTIONS,
                     256),
    'b2': MiTVariant((64, 128, 320, 512), (3, 4, 6, 3), _HEADS, _REDUCTIONS,
                     768),
    'b3': MiTVariant((64, 128, 320, 512), (3, 4, 18, 3), _HEADS, _REDUCTIONS,
                     768),
    'b4': MiTVariant((64, 128, 320, 512), (3, 8, 27, 3), _HEADS, _REDUCTIONS,
                     768),
    'b5': MiTVariant((64, 128, 320, 512), (3, 6, 40, 3), _HEADS, _REDUCTIONS,
                     768),
    # The CPU demo's member: B0's shape at half its widths, one block a
    # stage (0.48 M encoder parameters, 0.1 M in its 19-class head).
    'demo': MiTVariant((16, 32, 80, 128), (1, 1, 1, 1), _HEADS, _REDUCTIONS,
                       128),
}


def linear_init():
  """SegFormer's initialisation of linear layers: truncated normal, std
  0.02 (bias zero)."""
  return nn.initializers.truncated_normal(stddev=0.02)


def conv_fan_out_init(groups: int = 1):
  """SegFormer's initialisation of convolutions: N(0, 2 / fan_out),
  fan_out = kernel_h * kernel_w * out_channels / groups."""
  def init(key, shape, dtype=jnp.float32):
    kh, kw, _, out = shape
    std = (2.0 / (kh * kw * out / groups)) ** 0.5
    return std * jax.random.normal(key, shape, dtype)
  return init


def dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=linear_init(), name=name)


def layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


def patch_conv(features: int, kernel: int, stride: int, padding: int,
               dtype: Dtype, name: str, groups: int = 1) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)),
                 feature_group_count=groups, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=conv_fan_out_init(groups),
                 name=name)


def drop_path(x, rate: float, module: nn.Module, train: bool):
  """Stochastic depth: each image's residual branch zeroed with probability
  `rate` and the rest scaled by 1 / (1 - rate), under `train` (rng stream
  'dropout')."""
  if not train or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng('dropout'), keep,
                              (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class EfficientSelfAttention(nn.Module):
  """Multi-head self-attention whose keys and values are computed from the
  sequence reduced `reduction` times along each side (a `reduction` x
  `reduction` convolution of stride `reduction`, then LayerNorm).
  x: [B, h, w, C] -> [B, h, w, C]; softmax in float32."""
  width: int
  heads: int
  reduction: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    head_dim = c // self.heads
    queries = dense(c, self.dtype, 'query')(x).reshape(b, h * w, self.heads,
                                                        head_dim)
    source = x
    if self.reduction > 1:
      source = patch_conv(c, self.reduction, self.reduction, 0, self.dtype,
                          'reduction')(x)
      source = layer_norm(self.dtype, 'reduction_norm')(source)
    source = source.reshape(b, -1, c)
    keys = dense(c, self.dtype, 'key')(source).reshape(b, -1, self.heads,
                                                       head_dim)
    values = dense(c, self.dtype, 'value')(source).reshape(b, -1, self.heads,
                                                           head_dim)
    scores = jnp.einsum('bqhd,bkhd->bhqk', queries, keys) * head_dim ** -0.5
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(self.dtype), values)
    return dense(c, self.dtype, 'out')(out.reshape(b, h, w, c))


class MixFFN(nn.Module):
  """Linear (C -> ratio C), depth-wise 3x3 convolution, GELU (exact),
  linear (ratio C -> C). x: [B, h, w, C]."""
  width: int
  ratio: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    hidden = self.width * self.ratio
    x = dense(hidden, self.dtype, 'fc1')(x)
    x = patch_conv(hidden, 3, 1, 1, self.dtype, 'dwconv', groups=hidden)(x)
    x = nn.gelu(x, approximate=False)
    return dense(self.width, self.dtype, 'fc2')(x)


class MiTBlock(nn.Module):
  """x + drop_path(attention(LN(x))), then + drop_path(MixFFN(LN(x)))."""
  width: int
  heads: int
  reduction: int
  mlp_ratio: int
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = layer_norm(self.dtype, 'norm1')(x)
    y = EfficientSelfAttention(self.width, self.heads, self.reduction,
                               self.dtype, name='attention')(y)
    x = x + drop_path(y, self.drop_path_rate, self, train)
    y = layer_norm(self.dtype, 'norm2')(x)
    y = MixFFN(self.width, self.mlp_ratio, self.dtype, name='ffn')(y)
    return x + drop_path(y, self.drop_path_rate, self, train)


def drop_path_rates(depths: Sequence[int], rate: float) -> list[float]:
  """Each block's stochastic-depth rate: rising linearly from 0 at the
  first block to `rate` at the last, over all stages (SegFormer's rule)."""
  total = sum(depths)
  return [rate * i / max(total - 1, 1) for i in range(total)]


class MixTransformer(nn.Module):
  """The MiT encoder: images [B, H, W, 3] -> its four stages' maps
  [B, ceil(H / 4), ceil(W / 4), C1], ... at strides 4, 8, 16, 32.
  `train` switches stochastic depth on (rng stream 'dropout');
  `remat='blocks'` rematerialises every transformer block."""
  variant: MiTVariant
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  remat: str = 'none'

  @nn.compact
  def __call__(self, x, train: bool = False):
    v = self.variant
    x = x.astype(self.dtype)
    rates = iter(drop_path_rates(v.depths, self.drop_path_rate))
    # `train` (argument 2 after the module and x) is a Python bool
    block = remat_blocks(MiTBlock, self.remat, static_argnums=(2,))
    maps = []
    for stage in range(len(v.widths)):
      x = patch_conv(v.widths[stage], v.patch_sizes[stage], v.strides[stage],
                     v.patch_sizes[stage] // 2, self.dtype,
                     f'patch_embed{stage + 1}')(x)
      x = layer_norm(self.dtype, f'patch_norm{stage + 1}')(x)
      for index in range(v.depths[stage]):
        x = block(v.widths[stage], v.heads[stage], v.reductions[stage],
                  v.mlp_ratio, next(rates), self.dtype,
                  name=f'stage{stage + 1}_{index}')(x, train)
      x = layer_norm(self.dtype, f'norm{stage + 1}')(x)
      maps.append(x)
    return maps


# ---------------------------------------------- transformers' checkpoints --

# Our module names -> transformers' (5.x) names below a block.
_BLOCK_MODULES = {
    'norm1': 'layernorm_before', 'norm2': 'layernorm_after',
    'attention/query': 'attention.q_proj', 'attention/key': 'attention.k_proj',
    'attention/value': 'attention.v_proj', 'attention/out': 'attention.o_proj',
    'attention/reduction': 'attention.sequence_reduction.sequence_reduction',
    'attention/reduction_norm': 'attention.sequence_reduction.layer_norm',
    'ffn/fc1': 'mlp.fc1', 'ffn/dwconv': 'mlp.dwconv.dwconv',
    'ffn/fc2': 'mlp.fc2',
}


def hf_prefix(path: Sequence[str]) -> str:
  """The key prefix in a transformers (5.x) `SegformerModel` state dict of a
  flax module path of `MixTransformer`:
  ('stage3_7', 'attention', 'query') -> 'stages.2.blocks.7.attention.q_proj'."""
  head, rest = path[0], '/'.join(path[1:])
  match = re.fullmatch(r'(patch_embed|patch_norm|norm)(\d)', head)
  if match:
    stage = int(match.group(2)) - 1
    return {'patch_embed': f'stages.{stage}.patch_embeddings.proj',
            'patch_norm': f'stages.{stage}.patch_embeddings.layer_norm',
            'norm': f'stages.{stage}.layer_norm'}[match.group(1)]
  match = re.fullmatch(r'stage(\d)_(\d+)', head)
  if match and rest in _BLOCK_MODULES:
    return (f'stages.{int(match.group(1)) - 1}.blocks.{match.group(2)}.'
            f'{_BLOCK_MODULES[rest]}')
  raise ValueError(f'no transformers key for MiT module {"/".join(path)}')


# transformers 4.x names (the hub's MiT and SegFormer checkpoints) -> 5.x
# names, applied in order to a key without its model prefix.
HF_LEGACY_RENAMES = (
    (r'^encoder\.patch_embeddings\.(\d+)\.', r'stages.\1.patch_embeddings.'),
    (r'^encoder\.block\.(\d+)\.', r'stages.\1.blocks.'),
    (r'^encoder\.layer_norm\.(\d+)\.', r'stages.\1.layer_norm.'),
    (r'\.attention\.self\.query\.', '.attention.q_proj.'),
    (r'\.attention\.self\.key\.', '.attention.k_proj.'),
    (r'\.attention\.self\.value\.', '.attention.v_proj.'),
    (r'\.attention\.self\.sr\.',
     '.attention.sequence_reduction.sequence_reduction.'),
    (r'\.attention\.self\.layer_norm\.',
     '.attention.sequence_reduction.layer_norm.'),
    (r'\.attention\.output\.dense\.', '.attention.o_proj.'),
    (r'\.mlp\.dense1\.', '.mlp.fc1.'),
    (r'\.mlp\.dense2\.', '.mlp.fc2.'),
    (r'\.layer_norm_1\.', '.layernorm_before.'),
    (r'\.layer_norm_2\.', '.layernorm_after.'),
)


def modern_key(key: str) -> str:
  """A transformers encoder key (model prefix removed) in 5.x naming."""
  for pattern, replacement in HF_LEGACY_RENAMES:
    key = re.sub(pattern, replacement, key)
  return key
