"""Which JAX platforms a process of spcl_jax starts: no TPU backend on a
machine without a TPU, even where libtpu is installed.

libtpu is installed beside the runtime only to compile for a TPU topology
that is not attached (`requirements-tpu-compile.txt`,
`spcl_jax/run/aot_compile.py`). Where JAX finds it, its first `jax.devices()`
tries a TPU backend before the CPU one, even on a machine with no TPU: it
loads libtpu (+220 MB of resident memory) and libtpu prints five lines of
warnings about `TPU_WORKER_HOSTNAMES` and `TPU_ACCELERATOR_TYPE` on stderr
before JAX falls back to the CPU. The TPU compiler does not need that
backend: `jax.experimental.topologies` loads the plugin by itself.

So when `spcl_jax` is imported (before any of its commands, benchmarks or
tests touches a device), `skip_absent_tpu` sets `JAX_PLATFORMS=cpu` where
- the user has not set `JAX_PLATFORMS` (an empty value counts as set),
- libtpu is importable, and
- the machine shows no accelerator JAX could use: no PCI device of
  Google's (a TPU chip; a GCE VM's gVNIC counts too, to be safe), no
  `/dev/accel*` or `/dev/vfio/<group>` (TPU VMs), no NVIDIA or AMD GPU
  device file.
There JAX would end on the CPU anyway, so a run computes, prints and
resumes as it does without libtpu. Anywhere else nothing changes.
"""

import glob
import importlib.util
import os
import sys
from typing import Callable, MutableMapping

_GOOGLE_PCI_VENDOR = '0x1ae0'
_DEVICE_PATTERNS = ('/dev/accel*', '/dev/vfio/[0-9]*', '/dev/nvidia0',
                    '/dev/nvidiactl', '/dev/dxg', '/dev/kfd')


def accelerator_present() -> bool:
  """Whether this machine shows a device that JAX could use beside the CPU
  (or might: any PCI device of Google's counts as a TPU)."""
  if any(glob.glob(pattern) for pattern in _DEVICE_PATTERNS):
    return True
  for vendor_path in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(vendor_path, encoding='ascii') as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      return True   # cannot tell: leave JAX to decide
  return False


def libtpu_installed() -> bool:
  """Whether JAX would find libtpu (the `libtpu` package) in this
  environment."""
  return importlib.util.find_spec('libtpu') is not None


def skip_absent_tpu(
    environ: MutableMapping[str, str] = os.environ,
    installed: Callable[[], bool] = libtpu_installed,
    present: Callable[[], bool] = accelerator_present) -> bool:
  """Sets `JAX_PLATFORMS=cpu` in `environ` (and JAX's config if JAX is
  imported already) under the conditions of the module docstring; returns
  whether it did."""
  if 'JAX_PLATFORMS' in environ or not installed() or present():
    return False
  environ['JAX_PLATFORMS'] = 'cpu'
  # JAX reads the variable when it is imported
  config = getattr(sys.modules.get('jax'), 'config', None)
  if (environ is os.environ and config is not None
      and config.jax_platforms is None):
    config.update('jax_platforms', 'cpu')
  return True
