"""Exact search over galleries larger than one device: the gallery is sharded over the mesh
and each device streams its shard in chunks, so no device holds all scores.

Order is by descending score, ties by ascending gallery index, as a stable argsort of -score.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "gallery"


def gallery_mesh(devices=None):
  return Mesh(np.array(devices or jax.devices()), (AXIS,))


def merge_topk(scores_a, index_a, scores_b, index_b, k):
  """The k best of two candidate lists [Q, *]: by score descending, then index ascending."""
  scores = jnp.concatenate([scores_a, scores_b], axis=1)
  index = jnp.concatenate([index_a, index_b], axis=1)
  neg, index = jax.lax.sort((-scores, index), dimension=1, num_keys=2)
  return -neg[:, :k], index[:, :k]


def padded_gallery(gallery, mesh, chunk_size):
  """Pads rows to devices x chunks x chunk_size and shards them over the mesh."""
  n, dim = gallery.shape
  devices = mesh.size
  per_device = -(-n // devices)
  chunk = min(chunk_size, per_device)
  per_device = -(-per_device // chunk) * chunk
  padded = np.zeros((devices * per_device, dim), np.float32)
  padded[:n] = gallery
  return jax.device_put(padded, NamedSharding(mesh, P(AXIS))), chunk


def _local_chunks(shard, chunk):
  return shard.reshape(-1, chunk, shard.shape[-1])


@functools.partial(jax.jit, static_argnames=("k", "chunk", "mesh", "size"))
def _topk(queries, gallery, *, k, chunk, mesh, size):
  def per_device(queries, shard):
    offset = jax.lax.axis_index(AXIS) * shard.shape[0]
    q = queries.shape[0]

    def step(carry, inputs):
      best_scores, best_index = carry
      block, start = inputs
      scores = queries @ block.T
      index = offset + start + jnp.arange(block.shape[0])
      scores = jnp.where(index[None] < size, scores, -jnp.inf)
      top_scores, top_pos = jax.lax.top_k(scores, min(k, block.shape[0]))
      return merge_topk(best_scores, best_index, top_scores, index[top_pos], k), None

    init = (jnp.full((q, k), -jnp.inf), jnp.full((q, k), np.iinfo(np.int32).max, jnp.int32))
    blocks = _local_chunks(shard, chunk)
    starts = jnp.arange(blocks.shape[0], dtype=jnp.int32) * chunk
    (scores, index), _ = jax.lax.scan(step, init, (blocks, starts))
    all_scores = jax.lax.all_gather(scores, AXIS, axis=1, tiled=True)
    all_index = jax.lax.all_gather(index, AXIS, axis=1, tiled=True)
    neg, order = jax.lax.sort((-all_scores, all_index), dimension=1, num_keys=2)
    return -neg[:, :k], order[:, :k]

  return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()),
                       check_vma=False)(queries, gallery)


class Gallery:
  """Gallery rows sharded over `mesh` (default: all devices) once, for many searches: each
  device scans its rows in chunks of at most `chunk_size`."""

  def __init__(self, gallery, *, mesh=None, chunk_size=65_536):
    self.size = len(gallery)
    self.mesh = mesh or gallery_mesh()
    self.rows, self.chunk = padded_gallery(np.asarray(gallery, np.float32), self.mesh,
                                           chunk_size)

  def topk(self, queries, k, *, query_block=4096):
    """Exact top-k by inner product: (float32[Q, k] scores, int64[Q, k] gallery indices),
    queries `query_block` at a time."""
    if not 1 <= k <= self.size:
      raise ValueError(f"topk: k={k}; expected 1 to the gallery's {self.size} items")
    queries = np.asarray(queries, np.float32)
    scores, index = [], []
    for start in range(0, len(queries), query_block):
      s, i = _topk(jnp.asarray(queries[start:start + query_block]), self.rows, k=k,
                   chunk=self.chunk, mesh=self.mesh, size=self.size)
      scores.append(np.asarray(s))
      index.append(np.asarray(i).astype(np.int64))
    return np.concatenate(scores), np.concatenate(index)


def topk(queries, gallery, k, *, mesh=None, chunk_size=65_536, query_block=4096):
  """Exact top-k inner-product search of `queries` in `gallery` (a Gallery made for them):
  (float32[Q, k] scores, int64[Q, k] gallery indices)."""
  if k > len(gallery):
    raise ValueError(f"topk: k={k} is larger than the gallery ({len(gallery)} items)")
  return Gallery(gallery, mesh=mesh, chunk_size=chunk_size).topk(queries, k,
                                                                 query_block=query_block)


@functools.partial(jax.jit, static_argnames=("chunk", "mesh"))
def _ranks(queries, query_ids, gallery, gallery_ids, *, chunk, mesh):
  def per_device(queries, query_ids, shard, shard_ids):
    blocks = _local_chunks(shard, chunk)
    block_ids = shard_ids.reshape(-1, chunk)

    def best_positive(best, inputs):
      block, ids = inputs
      scores = queries @ block.T
      positive = query_ids[:, None] == ids[None]
      return jnp.maximum(best, jnp.where(positive, scores, -jnp.inf).max(axis=1)), None

    best, _ = jax.lax.scan(best_positive, jnp.full(queries.shape[0], -jnp.inf),
                           (blocks, block_ids))
    best = jax.lax.pmax(best, AXIS)

    def count_above(count, inputs):
      block, ids = inputs
      above = (queries @ block.T > best[:, None]) & (ids[None] >= 0)
      return count + above.sum(axis=1), None

    count, _ = jax.lax.scan(count_above, jnp.zeros(queries.shape[0], jnp.int32),
                            (blocks, block_ids))
    count = jax.lax.psum(count, AXIS)
    return jnp.where(jnp.isfinite(best), 1 + count, 0)

  return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)),
                       out_specs=P(), check_vma=False)(queries, query_ids, gallery,
                                                       gallery_ids)


def ranks(queries, gallery, query_ids, gallery_ids, *, mesh=None, chunk_size=65_536,
          query_block=4096):
  """int64[Q]: 1 + the number of gallery items scoring strictly above the query's best
  positive (same id); 0 where the gallery has no positive. Sharded and streamed as `topk`.
  """
  # Ids as dense int32 codes (ids may be any integers; -1 marks padding on device).
  codes = np.unique(np.concatenate([np.asarray(query_ids), np.asarray(gallery_ids)]))
  query_ids = np.searchsorted(codes, np.asarray(query_ids))
  gallery_ids = np.searchsorted(codes, np.asarray(gallery_ids))
  mesh = mesh or gallery_mesh()
  sharded, chunk = padded_gallery(np.asarray(gallery, np.float32), mesh, chunk_size)
  ids = np.full(sharded.shape[0], -1, np.int64)
  ids[:len(gallery_ids)] = gallery_ids
  ids = jax.device_put(ids.astype(np.int32), NamedSharding(mesh, P(AXIS)))
  queries = np.asarray(queries, np.float32)
  query_ids = np.asarray(query_ids).astype(np.int32)
  out = [np.asarray(_ranks(jnp.asarray(queries[s:s + query_block]),
                           jnp.asarray(query_ids[s:s + query_block]), sharded, ids,
                           chunk=chunk, mesh=mesh))
         for s in range(0, len(queries), query_block)]
  return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)
