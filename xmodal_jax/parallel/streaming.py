"""Reductions over (local rows) x (all columns) that never hold more than one column tile.

A "gallery" is a pytree of arrays whose leading axis is the column axis. Three ways to see
every column from inside `shard_map` (or on one device, axis_name=None):
  dense:     the whole (gathered) gallery as one tile;
  blockwise: the whole (gathered) gallery, scanned in tiles of `block_size` columns;
  ring:      only the local shard; shards travel around the devices with `ppermute`, each
             scanned in tiles. No device ever holds the global gallery.
Tile bodies are rematerialized, so reverse-mode autodiff keeps O(rows x block_size) memory.
"""

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("dense", "blockwise", "ring")


def gather(tree, axis_name):
  """All-gathers the leading axis over `axis_name` (identity when None); differentiable:
  gradients flow back to each row's owner."""
  if axis_name is None:
    return tree
  return jax.tree.map(lambda x: jax.lax.all_gather(x, axis_name, tiled=True), tree)


def axis_size_and_index(axis_name):
  if axis_name is None:
    return 1, 0
  return jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)


def _tiles(gallery, col_index, block_size):
  """Pads the columns to a multiple of block_size (index -1) and splits them into tiles."""
  n = col_index.shape[0]
  num_tiles = -(-n // block_size)
  pad = num_tiles * block_size - n

  def split(x, fill):
    x = jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], fill, x.dtype)]) if pad else x
    return x.reshape((num_tiles, block_size) + x.shape[1:])
  return jax.tree.map(lambda x: split(x, 0), gallery), split(col_index, -1)


def fold_columns(body, carry, gallery, *, impl, block_size=None, axis_name=None):
  """Folds `body(carry, tile, col_index) -> carry` over every column of the global gallery.

  `gallery` is this device's shard (all of it on one device); `col_index` passed to `body`
  holds the global column indices of the tile, -1 for padding columns (which `body` must
  ignore). The columns are visited in an unspecified order. Differentiable: tile bodies are
  rematerialized in the backward pass.
  """
  stateful = lambda c, tile, state, index: (body(c, tile, index), state)
  carry, _ = fold_columns_with_state(stateful, carry, gallery, None, impl=impl,
                                     block_size=block_size, axis_name=axis_name, remat=True)
  return carry


def fold_columns_with_state(body, carry, gallery, column_state, *, impl, block_size=None,
                            axis_name=None, merge=None, remat=False):
  """Like fold_columns, with a per-column state that ends with the columns' owner.

  `body(carry, tile, state_tile, col_index) -> (carry, state_tile)`; `column_state` is a
  pytree of arrays [local columns, ...] initialized to the identity of the reduction `body`
  applies. In the ring each shard's state travels with it and comes home after a full
  circle; otherwise every device folds a full-size copy (starting from gathered
  identities) and `merge(full_state, axis_name) -> local_state` combines them across devices
  (required with axis_name). Returns (carry, this device's columns' state).
  """
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
  size, index = axis_size_and_index(axis_name)
  local = jax.tree.leaves(gallery)[0].shape[0]
  carry = to_varying(carry, axis_name)  # The body's output differs per device.
  if impl in ("dense", "blockwise"):
    gallery = gather(gallery, axis_name)
    state = to_varying(gather(column_state, axis_name), axis_name)
    col_index = jnp.arange(size * local)
    if impl == "dense":
      carry, state = body(carry, gallery, state, col_index)
    else:
      carry, state = _scan_tiles(body, carry, gallery, state, col_index, block_size, remat)
    if axis_name is not None and column_state is not None:
      state = merge(state, axis_name)
    return carry, state
  # ring: at hop k this device holds the shard (and state) of device (index - k) mod size.
  perm = [(i, (i + 1) % size) for i in range(size)]
  shift = lambda tree: jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, perm), tree)
  state = to_varying(column_state, axis_name)
  for hop in range(size):
    source = (index - hop) % size
    col_index = source * local + jnp.arange(local)
    carry, state = _scan_tiles(body, carry, gallery, state, col_index, block_size, remat)
    if hop + 1 < size:
      gallery = shift(gallery)
    if size > 1:
      state = shift(state)  # After the last hop this brings each state home.
  return carry, state


def _scan_tiles(body, carry, gallery, state, col_index, block_size, remat):
  block_size = min(block_size or col_index.shape[0], col_index.shape[0])
  tiles, tile_index = _tiles(gallery, col_index, block_size)
  state_tiles = _tiles(state, col_index, block_size)[0]

  def step(carry, xs):
    tile, state_tile, index = xs
    carry, state_tile = body(carry, tile, state_tile, index)
    return carry, state_tile
  if remat:
    step = jax.checkpoint(step)
  carry, state_tiles = jax.lax.scan(step, carry, (tiles, state_tiles, tile_index))
  n = col_index.shape[0]
  return carry, jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:n], state_tiles)


def to_varying(tree, axis_name):
  """Marks values as differing across `axis_name` (a mesh axis or a tuple of them;
  shard_map's types require it of carries)."""
  if axis_name is None:
    return tree

  def cast(x):
    aval = jax.typeof(x)
    varying = getattr(aval, "vma", None)
    if varying is None:  # Newer JAX keeps it under the array's manual-axis type.
      varying = getattr(getattr(aval, "mat", None), "varying", ())
    axes = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
    missing = tuple(a for a in axes if a not in varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x
  return jax.tree.map(cast, tree)


def psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def row_offset(num_rows, axis_name):
  """Global index of this device's first row."""
  _, index = axis_size_and_index(axis_name)
  return index * num_rows


def neg_fill(dtype):
  """A finite stand-in for -inf: keeps rows without valid columns free of NaN."""
  return jnp.asarray(-1e9 if np.dtype(dtype).itemsize >= 4 else -3e4, dtype)
