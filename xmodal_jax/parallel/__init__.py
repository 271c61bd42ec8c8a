"""Device meshes, sharding of batches and parameters, multi-host helpers."""

from xmodal_jax.parallel.mesh import (  # noqa: F401
    BATCH_AXES, DATA_AXIS, FSDP_AXIS, batch_shards, make_mesh, mesh_shape, shard_batch)
