"""Model registry: `create_model(name, num_classes, **kw)` and
`load_pretrained(directory, name, num_classes, rng)`.

Two families: DeepLab-v2 (`deeplabv2_*`: a dilated ResNet or VGG-16, the
ASPP v2 classifier, output stride 8) and SegFormer (`segformer_mit_*`: a
Mix Transformer encoder, the all-MLP head, output stride 4). Both return
{"features", "logits"} and expose `num_features`.

Keyword arguments of `create_model` (`FAMILY_KW` says which family takes
which):
  bn_trainable: False (default) freezes BatchNorm (statistics and affine);
    True uses batch statistics under train=True (global over a sharded batch).
  dtype: compute dtype, jnp.float32 (default) or jnp.bfloat16; parameters
    stay float32 and the outputs are float32.
  aspp_rates: ASPP v2 dilation rates, default (6, 12, 18, 24).
  frozen_bn_epsilon: ε of frozen BatchNorm (default 1e-5; 0 = released).
  layer_init: 'flax' (default) or 'torch': PyTorch's default initialisation
    of VGG-16's fresh fc6/fc7 (layers.conv_init) and of the ASPP biases
    (their weights are N(0, 0.01) either way).
  base_width: ResNet stem width / VGG-16 conv1 width (default 64); smaller
    values make the CPU demo model cheaper (and are incompatible with
    ImageNet weights).
  remat: 'none' (default), 'blocks' or 'groups'. 'blocks': `flax.linen.remat`
    around every residual block (ResNet) / conv<i>_x block and fc6, fc7
    (VGG-16), which keeps only each block's input for the backward pass and
    recomputes the rest there (less memory, about one more forward pass of
    compute). 'groups' (ResNets): as 'blocks', and each stage's blocks
    rematerialised again in runs of about sqrt(n) (`layers.block_groups`),
    which keeps only each run's input during the forward pass (less memory
    again, about two more forward passes). Same parameters, same values,
    same gradients. Only for models with blocks (`ModelSpec.has_blocks`),
    'groups' only for those with stages of them (`ModelSpec.has_stages`).
    SegFormer: 'blocks' rematerialises every transformer block.
  drop_path_rate (SegFormer): stochastic depth of the last encoder block,
    rising linearly from 0 at the first (default 0).
  head_dropout (SegFormer): dropout before the head's classifier (default 0).
SegFormer's layers always take SegFormer's initialisation (`layer_init`
changes nothing in them; a config's `model.layer_init` still initialises
the discriminator); its BatchNorm keyword arguments are its head's.
"""

from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp

from spcl_jax.models.deeplab import ASPPv2, DeepLabV2
from spcl_jax.models.discriminator import Discriminator
from spcl_jax.models.layers import REMAT_MODES, BatchNorm
from spcl_jax.models import mit
from spcl_jax.models import porting
from spcl_jax.models.segformer import SegFormer


class ModelSpec(NamedTuple):
  arch: str            # key of porting.BACKBONES (the ImageNet weights it takes)
  backbone_kw: tuple   # fixed keyword arguments of the backbone
  has_blocks: bool = True  # blocks to rematerialise (`remat='blocks'`)
  has_stages: bool = True  # stages of blocks to group (`remat='groups'`)
  family: str = 'deeplab'  # 'deeplab' or 'segformer' (FAMILY_KW)


MODELS = {
    'deeplabv2_resnet101': ModelSpec('resnet101', ()),
    'deeplabv2_resnet50': ModelSpec('resnet50', ()),
    # The CPU demo member: dilated ResNet-18 (BasicBlocks), 512 features.
    # At 128x256 input and base_width 64 it costs ~14 GFLOPs per image forward
    # (layer4 runs at stride 8); base_width=16 cuts that ~16x.
    'deeplabv2_resnet18': ModelSpec('resnet18', ()),
    'deeplabv2_vgg16': ModelSpec('vgg16', (), has_stages=False),
    # SegFormer on MiT-B0 ... B5, and the CPU demo's narrow MiT
    # (mit.MIT_VARIANTS).
    **{f'segformer_mit_{v}': ModelSpec(f'mit_{v}', (), has_stages=False,
                                       family='segformer')
       for v in mit.MIT_VARIANTS},
}

_BACKBONE_KW = ('bn_trainable', 'dtype', 'base_width', 'frozen_bn_epsilon',
                'layer_init', 'remat')
_HEAD_KW = ('aspp_rates', 'layer_init')   # layer_init: the backbone's too
# The keyword arguments each family takes.
FAMILY_KW = {
    'deeplab': tuple(dict.fromkeys(_BACKBONE_KW + _HEAD_KW)),
    'segformer': ('bn_trainable', 'dtype', 'frozen_bn_epsilon', 'layer_init',
                  'remat', 'drop_path_rate', 'head_dropout'),
}


def check_name(name: str) -> ModelSpec:
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; known models: '
                     f'{", ".join(sorted(MODELS))}')
  return MODELS[name]


def remat_problem(name: str, remat: str) -> str | None:
  """Why `remat` does not suit model `name` (None: it does)."""
  if remat not in REMAT_MODES:
    return f'model.remat: {remat!r}, expected one of {REMAT_MODES}'
  if remat != 'none' and name in MODELS and not MODELS[name].has_blocks:
    return (f'model.remat = {remat!r} but model {name!r} has no blocks to '
            "rematerialise; use 'none'")
  if remat == 'groups' and name in MODELS and not MODELS[name].has_stages:
    return (f"model.remat = 'groups' but model {name!r} has no stages of "
            "repeated blocks to group; use 'blocks'")
  return None


def create_model(name: str, num_classes: int, **kw) -> DeepLabV2 | SegFormer:
  """The Flax module `name` with a `num_classes`-way classifier (ASPP v2,
  or SegFormer's head)."""
  spec = check_name(name)
  problem = remat_problem(name, kw.get('remat', 'none'))
  if problem:
    raise ValueError(problem)
  unknown = sorted(set(kw) - set(FAMILY_KW[spec.family]))
  if unknown:
    accepted = sorted(FAMILY_KW[spec.family])
    raise TypeError(f'create_model({name!r}): unknown keyword arguments '
                    f'{unknown}; accepted: {accepted}')
  if spec.family == 'segformer':
    return _segformer(spec, num_classes, **kw)
  backbone_kw = {k: v for k, v in kw.items() if k in _BACKBONE_KW}
  head_kw = {k: v for k, v in kw.items() if k in _HEAD_KW}
  dtype = kw.get('dtype', jnp.float32)
  backbone = porting.BACKBONES[spec.arch].make(**dict(spec.backbone_kw),
                                               **backbone_kw)
  return DeepLabV2(backbone, num_classes, dtype=dtype, **head_kw)


def _segformer(spec: ModelSpec, num_classes: int, dtype=jnp.float32,
               bn_trainable: bool = False, frozen_bn_epsilon: float = 1e-5,
               layer_init: str = 'flax', remat: str = 'none',
               drop_path_rate: float = 0.0, head_dropout: float = 0.0
               ) -> SegFormer:
  del layer_init  # SegFormer's layers have SegFormer's initialisation
  backbone = porting.BACKBONES[spec.arch].make(
      drop_path_rate=drop_path_rate, dtype=dtype, remat=remat)
  return SegFormer(backbone, num_classes, head_dropout, bn_trainable,
                   frozen_bn_epsilon, dtype)


def with_batch_stats(variables: dict) -> dict:
  """`variables` with a `batch_stats` collection, empty for a model without
  BatchNorm (VGG-16), so that every stage reads the same two collections."""
  return {'batch_stats': {}, **variables}


def init_variables(model: DeepLabV2 | SegFormer, rng: jax.Array, image_size=(64, 64)):
  """Fresh variables {"params", "batch_stats"} (float32) of `model`
  (`batch_stats` empty for a model without BatchNorm)."""
  images = jnp.zeros((1, *image_size, 3), jnp.float32)
  return with_batch_stats(flax.core.unfreeze(jax.jit(
      model.init, static_argnames='train')(rng, images, train=False)))


def load_pretrained(directory: str, name: str, num_classes: int,
                    rng: jax.Array, **kw):
  """Variables of `create_model(name, num_classes, **kw)` whose backbone holds
  the weights converted by `python -m data_prep.port_torchvision` (or
  `data_prep.port_transformers`) into `directory`, and whose head (ASPP;
  VGG's fc6/fc7; SegFormer's decode head) is freshly initialised."""
  spec = check_name(name)
  metadata, ported = porting.restore_ported(directory)
  if metadata['arch'] != spec.arch:
    raise ValueError(f'{directory} holds {metadata["arch"]} weights but '
                     f'{name} needs {spec.arch}; convert them with '
                     f'{port_command(spec.arch)}')
  model = create_model(name, num_classes, **kw)
  shapes = flax.traverse_util.flatten_dict(jax.eval_shape(
      lambda: init_variables(model, rng)))  # checked before the real init
  ported = {(path[0], 'backbone', *path[1:]): value for path, value in
            flax.traverse_util.flatten_dict(ported).items()}
  for target, value in ported.items():
    if target not in shapes or shapes[target].shape != value.shape:
      path = (target[0], *target[2:])
      if not porting.BACKBONES[spec.arch].takes_base_width:
        raise ValueError(f'{directory}: ported leaf {"/".join(path)} of '
                         f'shape {value.shape} does not fit {name}')
      raise ValueError(f'{directory}: ported leaf {"/".join(path)} of shape '
                       f'{value.shape} does not fit {name} at base_width '
                       f'{kw.get("base_width", 64)}; the weights were made '
                       f'at base_width {metadata.get("base_width", 64)} '
                       '(ImageNet weights: 64)')
  fresh = flax.traverse_util.flatten_dict(init_variables(model, rng))
  for target, value in ported.items():
    fresh[target] = jnp.asarray(value, jnp.float32)
  return with_batch_stats(flax.traverse_util.unflatten_dict(fresh))


def port_command(arch: str) -> str:
  """The command that writes `arch`'s weights directory."""
  if porting.BACKBONES[arch].source == 'transformers':
    return ('`python -m data_prep.port_transformers --arch '
            f'{arch} --src CHECKPOINT_DIR --dst DIR`')
  return (f'`python -m data_prep.port_torchvision --arch {arch} '
          '--src FILE.pth --dst DIR`')


__all__ = ['ASPPv2', 'BatchNorm', 'DeepLabV2', 'Discriminator', 'FAMILY_KW',
           'MODELS', 'REMAT_MODES', 'SegFormer', 'create_model',
           'init_variables', 'load_pretrained', 'port_command',
           'remat_problem', 'with_batch_stats']
