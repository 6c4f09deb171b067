"""spcl_jax: SPCL (semantic prototype-based contrastive learning) for domain
adaptive semantic segmentation, in JAX/Flax."""

# XLA reads XLA_FLAGS when its first backend starts: add our defaults first.
from spcl_jax.infra import xla_flags as _xla_flags  # pylint: disable=g-import-not-at-top

_xla_flags.add_defaults()

# TensorFlow's GCS file system reads its settings when it is first used:
# before that, make a gs:// workdir's reads see this process's own writes.
from spcl_jax.infra import storage as _storage  # pylint: disable=g-import-not-at-top

_storage.add_environment_defaults()

# JAX picks its platforms when it is imported: where libtpu is installed
# only to compile for a TPU topology (requirements-tpu-compile.txt) and this
# machine has no TPU, keep JAX from starting libtpu's TPU backend.
from spcl_jax.infra import platforms as _platforms  # pylint: disable=g-import-not-at-top

_platforms.skip_absent_tpu()
