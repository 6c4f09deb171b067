"""The one device mesh and its shardings.

A 1-D mesh ('data',) over every device of every process: parameters,
optimiser state and the prototype bank are replicated, batches are split
along their leading axis. Axes are `Auto` so that XLA (GSPMD) inserts the
cross-device reductions of batch statistics, class sums and confusion
matrices by itself.
"""

import jax
from jax.sharding import NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """('data',) mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
