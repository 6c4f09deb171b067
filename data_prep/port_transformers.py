r"""Converts a `transformers` SegFormer / MiT checkpoint directory into
spcl_jax encoder weights.

  python -m data_prep.port_transformers --src mit-b5 --dst weights/mit_b5

--src is a directory as `save_pretrained` writes it (config.json, and
model.safetensors, a sharded model.safetensors.index.json, or
pytorch_model.bin): an ImageNet MiT (`SegformerForImageClassification`,
e.g. the hub's nvidia/mit-b5), a `SegformerModel`, or a whole
`SegformerForSemanticSegmentation`. Key names of transformers 4.x (the
hub's files) and 5.x are both read. Only the encoder is converted; a
classifier or decode head in the checkpoint is listed in metadata.json's
"not_loaded" (a run's head starts fresh). --arch (mit_b0 ... mit_b5)
defaults to the variant config.json describes. Then
`--config.model.pretrained_dir=DST` with a `segformer_mit_*` model.

Errors name the file and the mismatching parameter in one line, and
nothing is written at --dst. Reading a .bin needs PyTorch
(`pip install -r requirements-dev.txt`); .safetensors needs `safetensors`.
"""

import json
import os
import re
import sys

from absl import app
from absl import flags

from spcl_jax.models import mit
from spcl_jax.models import porting

MIT_ARCHS = sorted(a for a, b in porting.BACKBONES.items()
                   if b.source == 'transformers')

# config.json fields -> the MiTVariant field each must equal.
CONFIG_FIELDS = {'hidden_sizes': 'widths', 'depths': 'depths',
                 'num_attention_heads': 'heads', 'sr_ratios': 'reductions',
                 'patch_sizes': 'patch_sizes', 'strides': 'strides'}
# Prefixes of the encoder keys in the checkpoints' models.
_MODEL_PREFIXES = ('segformer.',)


class CheckpointError(ValueError):
  """A directory that is not the checkpoint asked for; one line."""


def read_config(src: str) -> dict:
  path = os.path.join(src, 'config.json')
  if not os.path.isfile(path):
    raise CheckpointError(f'{path}: not found; --src must be a transformers '
                          'checkpoint directory (as save_pretrained writes '
                          'it)')
  try:
    with open(path) as f:
      config = json.load(f)
  except ValueError as e:
    raise CheckpointError(f'{path}: not JSON ({e})') from e
  if not isinstance(config, dict) or config.get('model_type') != 'segformer':
    found = config.get('model_type') if isinstance(config, dict) else config
    raise CheckpointError(f'{path}: model_type is {found!r}, expected '
                          "'segformer' (a SegFormer / MiT checkpoint)")
  return config


def variant_fields(config: dict) -> dict:
  """{MiTVariant field: tuple} of a config.json (mlp_ratios: one ratio)."""
  fields = {ours: tuple(config.get(theirs, ()))
            for theirs, ours in CONFIG_FIELDS.items()}
  ratios = set(config.get('mlp_ratios', ()))
  fields['mlp_ratio'] = ratios.pop() if len(ratios) == 1 else tuple(
      config.get('mlp_ratios', ()))
  return fields


def config_mismatch(config: dict, arch: str) -> str | None:
  """The first config.json parameter that differs from `arch`'s, as
  'depths (2, 2, 2, 2), mit_b5 has (3, 6, 40, 3)'; None when all match."""
  variant = mit.MIT_VARIANTS[arch[len('mit_'):]]
  theirs = variant_fields(config)
  names = {v: k for k, v in CONFIG_FIELDS.items()}
  for field, value in theirs.items():
    if value != getattr(variant, field):
      return (f'{names.get(field, "mlp_ratios")} {value}, {arch} has '
              f'{getattr(variant, field)}')
  return None


def infer_arch(config: dict, where: str) -> str:
  for arch in MIT_ARCHS:
    if arch != 'mit_demo' and config_mismatch(config, arch) is None:
      return arch
  fields = variant_fields(config)
  described = ', '.join(f'{theirs} {fields[ours]}'
                        for theirs, ours in CONFIG_FIELDS.items())
  raise CheckpointError(f'{where}: {described} match no MiT variant (B0 ... '
                        'B5); pass --arch to name the one meant')


def read_weights(src: str) -> dict:
  """{key: numpy array} of the checkpoint's weights file(s)."""
  single = os.path.join(src, 'model.safetensors')
  index = os.path.join(src, 'model.safetensors.index.json')
  binary = os.path.join(src, 'pytorch_model.bin')
  if os.path.isfile(single) or os.path.isfile(index):
    try:
      from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise CheckpointError(f'reading {src} needs safetensors: pip install '
                            '-r requirements-dev.txt') from e
    path = single if os.path.isfile(single) else index
    try:
      if path == single:
        return st_numpy.load_file(single)
      with open(index) as f:
        shards = sorted(set(json.load(f)['weight_map'].values()))
      weights = {}
      for shard in shards:
        path = os.path.join(src, shard)
        weights.update(st_numpy.load_file(path))
      return weights
    except Exception as e:  # pylint: disable=broad-except
      # OSError, a bad index (ValueError, KeyError), SafetensorError
      raise CheckpointError(f'{path}: not readable as safetensors weights '
                            f'({type(e).__name__}: {e})') from e
  if os.path.isfile(binary):
    from data_prep import port_torchvision  # pylint: disable=g-import-not-at-top
    try:
      return port_torchvision.read_state_dict(binary)
    except SystemExit as e:   # its messages name the file already
      raise CheckpointError(str(e)) from None
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'{binary}: not readable as a PyTorch state '
                            f'dict ({type(e).__name__}: {e})') from e
  raise CheckpointError(f'{src}: no model.safetensors, '
                        'model.safetensors.index.json or pytorch_model.bin')


def encoder_state_dict(weights: dict) -> tuple[dict, dict, list]:
  """(the encoder's weights by key in transformers 5.x naming without the
  model prefix, {that key: the file's own key}, the other keys of the file:
  heads, not loaded)."""
  encoder, names, others = {}, {}, []
  for key, value in weights.items():
    bare = key
    for prefix in _MODEL_PREFIXES:
      if bare.startswith(prefix):
        bare = bare[len(prefix):]
    bare = mit.modern_key(bare)
    if re.match(r'stages\.\d+\.', bare):
      encoder[bare], names[bare] = value, key
    else:
      others.append(key)
  return encoder, names, sorted(others)


def one_line(error: porting.PortingError, names: dict) -> str:
  """The first problem of a PortingError, under the file's own key names,
  and how many more there are."""
  problems = ([f'{names.get(key, key)} has shape {got}, expected {want}'
               for key, got, want in error.mismatched]
              + [f'missing key {key}' for key in error.missing]
              + [f'unexpected key {names.get(key, key)}'
                 for key in error.unexpected])
  more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
  return problems[0] + more


def convert(src: str, dst: str, arch: str | None = None,
            overwrite: bool = False) -> str:
  """Writes `dst`; returns the arch. Raises CheckpointError (one line)."""
  problem = porting.output_problem(dst, overwrite)
  if problem:
    raise CheckpointError(problem)
  if not os.path.isdir(src):
    raise CheckpointError(f'--src {src}: no such directory')
  config = read_config(src)
  where = os.path.join(src, 'config.json')
  if arch is None:
    arch = infer_arch(config, where)
  elif arch not in MIT_ARCHS:
    raise CheckpointError(f'--arch {arch!r}: expected one of {MIT_ARCHS}')
  mismatch = config_mismatch(config, arch)
  if mismatch:
    raise CheckpointError(f'{where}: {mismatch}; nothing was written at '
                          f'{dst}')
  encoder, names, others = encoder_state_dict(read_weights(src))
  try:
    variables = porting.port_state_dict(arch, encoder)
  except porting.PortingError as e:
    raise CheckpointError(f'{src}: {one_line(e, names)} for {arch}; '
                          f'nothing was written at {dst}') from e
  porting.write_ported(dst, arch, variables, {
      'source': os.path.abspath(src), 'source_format': 'transformers',
      'not_loaded': others}, overwrite)
  return arch


def define_flags() -> dict:
  """The command's flags (defined when it runs, so that importing this
  module beside data_prep.port_torchvision defines no flag twice)."""
  return {
      'src': flags.DEFINE_string('src', None, 'transformers checkpoint '
                                 'directory.', required=True),
      'dst': flags.DEFINE_string('dst', None, 'output directory (must not '
                                 'exist unless --overwrite).', required=True),
      'arch': flags.DEFINE_enum('arch', None, MIT_ARCHS, 'the MiT variant '
                                '(default: the one config.json describes).'),
      'overwrite': flags.DEFINE_bool('overwrite', False,
                                     'replace an existing --dst.')}


def main(values: dict) -> None:
  try:
    arch = convert(values['src'].value, values['dst'].value,
                   values['arch'].value, values['overwrite'].value)
  except CheckpointError as e:
    raise SystemExit(f'error: {e}') from None
  print(f'wrote {arch} encoder weights to {values["dst"].value}',
        file=sys.stderr)


if __name__ == '__main__':
  _FLAGS = define_flags()
  app.run(lambda argv: main(_FLAGS))
