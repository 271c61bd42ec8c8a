"""Device meshes, sharding of batches and parameters, multi-host helpers."""

from xmodal_jax.parallel.mesh import DATA_AXIS, make_mesh, replicate, shard_batch  # noqa: F401
