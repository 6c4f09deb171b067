r"""Converts a torchvision ImageNet state dict into spcl_jax backbone weights.

  python -m data_prep.port_torchvision --arch resnet101 \
      --src resnet101-63fe2227.pth --dst weights/resnet101

Then `spcl_jax.models.load_pretrained(DST, "deeplabv2_resnet101", 19, rng)`.
Reading a .pth file needs PyTorch (`pip install -r requirements-dev.txt`).
On a state dict of the wrong architecture it exits non-zero listing the
missing, unexpected and mis-shaped keys, and writes nothing at --dst.
"""

import os
import sys

from absl import app
from absl import flags

from spcl_jax.models import porting

TORCHVISION_ARCHS = sorted(a for a, b in porting.BACKBONES.items()
                           if b.source == 'torchvision')
_ARCH = flags.DEFINE_enum('arch', None, TORCHVISION_ARCHS,
                          'torchvision architecture of the state dict.')
_SRC = flags.DEFINE_string('src', None, 'torchvision state dict (.pth).')
_DST = flags.DEFINE_string('dst', None, 'output directory (must not exist '
                           'unless --overwrite).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'replace an existing --dst.')


def read_state_dict(path: str):
  """{key: float32 numpy array} of a torch state dict file."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(f'reading {path} needs PyTorch: pip install '
                     '-r requirements-dev.txt') from e
  obj = torch.load(path, map_location='cpu', weights_only=True)
  if isinstance(obj, dict) and 'state_dict' in obj and isinstance(
      obj['state_dict'], dict):
    obj = obj['state_dict']
  if not isinstance(obj, dict):
    raise SystemExit(f'{path}: expected a state dict (a mapping of names to '
                     f'tensors), found {type(obj).__name__}')
  return {k: v.detach().cpu().numpy() for k, v in obj.items()
          if hasattr(v, 'detach')}


def convert(arch: str, src: str, dst: str, overwrite: bool = False) -> None:
  problem = porting.output_problem(dst, overwrite)
  if problem:
    raise SystemExit(problem)
  if not os.path.isfile(src):
    raise SystemExit(f'--src {src}: no such file')
  state_dict = read_state_dict(src)
  try:
    variables = porting.port_state_dict(arch, state_dict)
  except porting.PortingError as e:
    raise SystemExit(f'{src}: {e}\nnothing was written at {dst}') from e
  metadata = {'source': os.path.abspath(src),
              'source_sha256': porting.sha256_of(src),
              'not_loaded': sorted(
                  k for k in state_dict
                  if k in porting.BACKBONES[arch].torch_keys_not_loaded
                  or k.endswith('num_batches_tracked')),
              'fresh_modules': list(porting.BACKBONES[arch].fresh_modules)}
  porting.write_ported(dst, arch, variables, metadata, overwrite)
  print(f'wrote {arch} backbone weights to {dst}', file=sys.stderr)


def main(argv):
  del argv
  convert(_ARCH.value, _SRC.value, _DST.value, _OVERWRITE.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['arch', 'src', 'dst'])
  app.run(main)
