"""Mapping PyTorch state dicts onto our Flax backbones: torchvision's
ImageNet ResNets and VGG-16, and `transformers`' Mix Transformer (MiT)
encoders (their keys in transformers 5.x naming, `mit.modern_key`).

`port_state_dict(arch, state_dict)` returns `{"params": ..., "batch_stats":
...}` for the backbone of `arch` (see `BACKBONES`) or raises `PortingError`
listing every missing, unexpected or mis-shaped key. `save_ported` /
`restore_ported` hold the on-disk layout of converted weights:

  DIR/metadata.json   {"arch", "source", "source_sha256", "not_loaded", ...}
  DIR/weights/        orbax StandardCheckpointer tree of the backbone
"""

import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable, Mapping, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from spcl_jax.infra import storage
from spcl_jax.models import mit as mit_lib
from spcl_jax.models import resnet as resnet_lib
from spcl_jax.models import vgg as vgg_lib

METADATA_FILE = 'metadata.json'
WEIGHTS_DIR = 'weights'


class Backbone(NamedTuple):
  make: Callable[..., flax.linen.Module]     # **kw -> backbone module
  torch_prefix: Callable[[tuple], str]       # flax module path -> torch prefix
  torch_keys_not_loaded: tuple               # torch keys deliberately skipped
  fresh_modules: tuple = ()                  # our modules with no torch source
  takes_base_width: bool = True              # make(base_width=...) narrows it
  source: str = 'torchvision'                # whose state dicts it ports


def _mit(variant: str) -> Backbone:
  return Backbone(
      lambda **kw: mit_lib.MixTransformer(mit_lib.MIT_VARIANTS[variant], **kw),
      mit_lib.hf_prefix, (), takes_base_width=False, source='transformers')


BACKBONES = {
    'resnet18': Backbone(lambda **kw: resnet_lib.resnet(18, **kw),
                         resnet_lib.torch_prefix,
                         resnet_lib.TORCH_KEYS_NOT_LOADED),
    'resnet50': Backbone(lambda **kw: resnet_lib.resnet(50, **kw),
                         resnet_lib.torch_prefix,
                         resnet_lib.TORCH_KEYS_NOT_LOADED),
    'resnet101': Backbone(lambda **kw: resnet_lib.resnet(101, **kw),
                          resnet_lib.torch_prefix,
                          resnet_lib.TORCH_KEYS_NOT_LOADED),
    'vgg16': Backbone(lambda **kw: vgg_lib.VGG16(**kw), vgg_lib.torch_prefix,
                      vgg_lib.TORCH_KEYS_NOT_LOADED,
                      fresh_modules=('fc6', 'fc7')),
    **{f'mit_{variant}': _mit(variant) for variant in mit_lib.MIT_VARIANTS},
}


def _kernel(w: np.ndarray) -> np.ndarray:
  """A torch weight as our kernel: convolutions OIHW -> HWIO, linear layers
  [out, in] -> [in, out]."""
  return np.transpose(w, (2, 3, 1, 0)) if w.ndim == 4 else w.T


# our leaf name -> (torch leaf name, conversion of the torch array)
_LEAVES = {
    'kernel': ('weight', _kernel),
    'bias': ('bias', lambda b: b),
    'scale': ('weight', lambda w: w),
    'mean': ('running_mean', lambda m: m),
    'var': ('running_var', lambda v: v),
}


class PortingError(ValueError):
  """A state dict that does not fit the architecture; lists offending keys."""

  def __init__(self, arch, missing, unexpected, mismatched):
    self.missing, self.unexpected, self.mismatched = (missing, unexpected,
                                                      mismatched)
    lines = [f'the state dict does not fit {BACKBONES[arch].source} {arch}:'
             if arch in BACKBONES else f'the state dict does not fit {arch}:']
    if missing:
      lines.append(f'  missing keys ({len(missing)}): ' + ', '.join(missing))
    if unexpected:
      lines.append(f'  unexpected keys ({len(unexpected)}): '
                   + ', '.join(unexpected))
    for key, got, want in mismatched:
      lines.append(f'  wrong shape for {key}: got {got}, expected {want}')
    super().__init__('\n'.join(lines))


def check_arch(arch: str) -> Backbone:
  if arch not in BACKBONES:
    raise ValueError(f'unknown architecture {arch!r}; known: '
                     f'{", ".join(sorted(BACKBONES))}')
  return BACKBONES[arch]


def backbone_shapes(arch: str, base_width: int = 64):
  """Abstract {"params", "batch_stats"} of the backbone of `arch` (ImageNet
  weights have the default `base_width`; the demo's pretrained ones not)."""
  backbone = check_arch(arch)
  module = (backbone.make(base_width=base_width) if backbone.takes_base_width
            else backbone.make())
  return jax.eval_shape(module.init, jax.random.key(0),
                        jnp.zeros((1, 64, 64, 3), jnp.float32))


def _torch_shape(leaf: str, shape: tuple) -> tuple:
  """The torch shape of one of our leaves (convolution kernels are HWIO
  here, linear kernels [in, out])."""
  if leaf == 'kernel' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == 'kernel' and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _ported_leaves(arch: str, base_width: int = 64):
  """{flat path: abstract leaf} of the backbone leaves that come from torch."""
  fresh = check_arch(arch).fresh_modules
  flat = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(backbone_shapes(arch, base_width)))
  return {path: leaf for path, leaf in flat.items() if path[-2] not in fresh}


def port_state_dict(arch: str, state_dict: Mapping[str, np.ndarray]):
  """torchvision state dict (numpy values) -> our backbone variables."""
  backbone = check_arch(arch)
  ported, expected = {}, set()
  missing, mismatched = [], []
  for path, abstract in _ported_leaves(arch).items():
    module_path, leaf = path[1:-1], path[-1]
    torch_leaf, convert = _LEAVES[leaf]
    key = f'{backbone.torch_prefix(module_path)}.{torch_leaf}'
    expected.add(key)
    if key not in state_dict:
      missing.append(key)
      continue
    value = convert(np.asarray(state_dict[key], np.float32))
    if value.shape != abstract.shape:
      mismatched.append((key, tuple(np.shape(state_dict[key])),
                         _torch_shape(leaf, abstract.shape)))
      continue
    ported[path] = value
  ignored = set(backbone.torch_keys_not_loaded)
  unexpected = sorted(k for k in state_dict
                      if k not in expected and k not in ignored
                      and not k.endswith('num_batches_tracked'))
  if missing or unexpected or mismatched:
    raise PortingError(arch, sorted(missing), unexpected, mismatched)
  return flax.traverse_util.unflatten_dict(ported)


def check_local_output(dst: str) -> None:
  """Refuses a URL as where weights are written (they are written to a
  temporary folder and renamed), naming how to put them in a bucket."""
  if storage.is_remote(dst):
    raise ValueError(f'{dst}: ported or pretrained weights are written to a '
                     'local directory; write them there and copy it up: '
                     f'gsutil -m cp -r LOCAL_DIR/* {dst.rstrip("/")}/')


def output_problem(dst: str, overwrite: bool) -> str | None:
  """Why weights cannot be written at `dst` (a URL; an existing directory
  without `overwrite`), or None."""
  try:
    check_local_output(dst)
  except ValueError as e:
    return str(e)
  if os.path.exists(dst) and not overwrite:
    return f'{dst} exists; pass --overwrite to replace it'
  return None


def save_ported(dst: str, arch: str, variables, metadata: dict) -> None:
  """Writes DIR/{metadata.json, weights/} atomically: everything goes to a
  temporary sibling directory first, renamed onto `dst` only when complete.
  Local only: a `gs://` `dst` is refused (write it locally and copy it
  up; a run reads it from the bucket)."""
  check_local_output(dst)
  dst = os.path.abspath(os.path.expanduser(dst))
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(dst)}.tmp-', dir=parent)
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, WEIGHTS_DIR), variables)
    checkpointer.wait_until_finished()
    with open(os.path.join(tmp, METADATA_FILE), 'w') as f:
      json.dump({'arch': arch, **metadata}, f, indent=2, sort_keys=True)
    os.rename(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_ported(dst: str, arch: str, variables, metadata: dict,
                 overwrite: bool = False) -> None:
  """`save_ported`, replacing an existing `dst` when `overwrite`: the new
  tree is complete before the old one goes (restored if writing fails)."""
  if not os.path.exists(dst):
    save_ported(dst, arch, variables, metadata)
    return
  if not overwrite:
    raise FileExistsError(f'{dst} exists; pass --overwrite to replace it')
  backup = f'{dst}.old-{os.getpid()}'
  os.rename(dst, backup)
  try:
    save_ported(dst, arch, variables, metadata)
  except BaseException:
    os.rename(backup, dst)
    raise
  shutil.rmtree(backup)


def restore_ported(directory: str):
  """(metadata, {"params", "batch_stats"}) of a directory made by the porter
  (local, or copied up to a `gs://` URL)."""
  directory = storage.resolve(directory)
  meta_path = os.path.join(directory, METADATA_FILE)
  if not storage.isfile(meta_path):
    raise FileNotFoundError(
        f'{meta_path} not found: {directory} is not a directory written by '
        '`python -m data_prep.port_torchvision --arch ARCH --src FILE.pth '
        '--dst DIR` (or data_prep.port_transformers for a MiT)')
  metadata = json.loads(storage.read_bytes(meta_path))
  abstract = flax.traverse_util.unflatten_dict(_ported_leaves(
      check_arch_of(metadata, meta_path), metadata.get('base_width', 64)))
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(directory, WEIGHTS_DIR), abstract)
  return metadata, restored


def check_arch_of(metadata: dict, where: str) -> str:
  arch = metadata.get('arch')
  if arch not in BACKBONES:
    raise ValueError(f'{where}: field "arch" is {arch!r}; expected one of '
                     f'{", ".join(sorted(BACKBONES))}')
  return arch


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()
