"""The device mesh, (data, fsdp), and how batches are split over it.

The batch is split over both axes (BATCH_AXES); the fsdp axis also splits the state
(parallel/sharding.py), so that data=D x fsdp=F holds 1/F of the params and optimizer
moments per device, gathered layer by layer as the step needs them.
"""

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def mesh_shape(shape, num_devices, where="config.mesh"):
  """{data, fsdp} sizes from `shape` (a dict; one size may be -1: the devices left)."""
  shape = dict(shape or {})
  unknown = sorted(set(shape) - set(BATCH_AXES))
  if unknown:
    raise ValueError(f"{where}: unknown axes {unknown}; the mesh's axes are {BATCH_AXES}")
  sizes = {axis: int(shape.get(axis, -1 if axis == DATA_AXIS else 1)) for axis in BATCH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1 or any(size < 1 and size != -1 for size in sizes.values()):
    raise ValueError(f"{where}={sizes}: sizes must be positive, at most one of them -1")
  known = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % known:
      raise ValueError(f"{where}={sizes}: {num_devices} devices do not divide by {known}")
    sizes[free[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"{where}={sizes}: {math.prod(sizes.values())} devices, but there are "
                     f"{num_devices}")
  return sizes


def make_mesh(devices=None, shape=None):
  """A (data, fsdp) mesh over `devices` (default: every device of every process) of `shape`
  (default: all data). Devices are laid out by the topology (mesh_utils): the fsdp axis,
  whose all-gathers are the most frequent, on the nearest chips; with several slices, data
  spans the slices (DCN) and fsdp stays within one."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(shape, len(devices))
  dims = tuple(sizes[axis] for axis in BATCH_AXES)
  slices = {getattr(d, "slice_index", 0) for d in devices}
  try:
    if len(slices) > 1:
      if sizes[DATA_AXIS] % len(slices):
        raise ValueError(f"config.mesh={sizes}: data must divide by the {len(slices)} slices")
      array = mesh_utils.create_hybrid_device_mesh(
          (sizes[DATA_AXIS] // len(slices), sizes[FSDP_AXIS]), (len(slices), 1), devices)
    else:
      array = mesh_utils.create_device_mesh(dims, devices, allow_split_physical_axes=True)
  except (NotImplementedError, AssertionError):  # No topology to follow (e.g. CPU).
    array = np.asarray(devices).reshape(dims)
  return Mesh(array, BATCH_AXES)


def batch_shards(mesh):
  """How many parts a batch is split into (every device holds one)."""
  return mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]


def shard_batch(batch, mesh):
  """Turns this process's numpy batch into global arrays split over the batch axes on axis 0.

  Each process passes its own rows (global batch / process count); leading dims must divide
  by the number of local devices.
  """
  sharding = NamedSharding(mesh, P(BATCH_AXES))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
