"""A 1-D data-parallel mesh over all devices and the shardings used with it."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None):
  """A mesh with one axis, "data", over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices).reshape(-1), (DATA_AXIS,))


def shard_batch(batch, mesh):
  """Turns this process's numpy batch into global arrays split over "data" on axis 0.

  Each process passes its own rows (global batch / process count); leading dims must divide
  by the number of local devices.
  """
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
