"""The XLA flags spcl_jax sets by default, in one place.

XLA reads `XLA_FLAGS` once, when its first backend starts, so the defaults
are added to the environment when `spcl_jax` is imported (before any of its
commands, benchmarks or tests touches a device). A flag the user already
names in `XLA_FLAGS` is left as the user set it, so any default can be
turned off from the command line, e.g.

  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python -m spcl_jax.main ...

The defaults are added only under the jaxlib versions they were measured
and tested with (`TESTED_JAXLIB`): XLA aborts the process on a flag it does
not know, and experimental flags come and go between releases.

`--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce` (XLA:CPU only; GPU
and TPU backends ignore it): elementwise ops and reductions run in YNNPACK
fusions beside the convolutions. Without it XLA:CPU's loop fusion copies the
whole chain of residual additions and ReLUs of a ResNet stage into each
transposing copy that a weight gradient reads (349 such copies in the SPCL
step of DeepLab-v2 ResNet-101: 1.5 s of a 5.9 s step at 128x256 on one
core; with the flag 0.3 s of 4.5 s). Gradients equal the plain build's
within float tolerance (the step-parity tests against PyTorch pass either
way). It slows a bfloat16 step on a CPU without bfloat16 instructions (3.75
-> 4.82 s): turn it off there. Measure: `python -m
benchmarks.xla_flag_ablation [--dtype=bfloat16]`.
"""

import importlib.metadata
import os
import re
from typing import Mapping, MutableMapping, Optional

# flag name -> value, added unless XLA_FLAGS names the flag
DEFAULTS = {'xla_cpu_experimental_ynn_fusion_type': 'eltwise,reduce'}
TESTED_JAXLIB = ('0.10.2',)


def _jaxlib_version() -> Optional[str]:
  try:
    return importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return None


def named_flags(xla_flags: str) -> set:
  """The flag names `xla_flags` sets (`--name=value` or `--name`)."""
  return set(re.findall(r'(?:^|\s)--?([A-Za-z0-9_]+)', xla_flags))


def without(xla_flags: str, name: str) -> str:
  """`xla_flags` less every setting of the flag `name`."""
  return ' '.join(part for part in xla_flags.split()
                  if named_flags(part) != {name})


def with_defaults(xla_flags: str,
                  defaults: Mapping[str, str] = DEFAULTS) -> str:
  """`xla_flags` followed by every default flag it does not name."""
  named = named_flags(xla_flags)
  added = [f'--{name}={value}' for name, value in defaults.items()
           if name not in named]
  return ' '.join(part for part in [xla_flags.strip(), *added] if part)


def add_defaults(environ: MutableMapping[str, str] = os.environ,
                 jaxlib_version: Optional[str] = None) -> None:
  """Adds `DEFAULTS` to `environ['XLA_FLAGS']` (see the module docstring);
  nothing under a jaxlib not in `TESTED_JAXLIB`."""
  version = jaxlib_version or _jaxlib_version()
  if version not in TESTED_JAXLIB:
    return
  environ['XLA_FLAGS'] = with_defaults(environ.get('XLA_FLAGS', ''))
