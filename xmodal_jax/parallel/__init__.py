"""Device meshes, sharding of batches and parameters, multi-host helpers."""

from xmodal_jax.parallel.mesh import DATA_AXIS, make_mesh, shard_batch  # noqa: F401
