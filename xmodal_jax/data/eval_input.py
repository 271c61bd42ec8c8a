"""Evaluation input: every example of a split exactly once, in order, in padded batches
that every process steps through together (batches as in data/pipeline.py)."""

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from xmodal_jax.data import pipeline


def pad_batch(batch, size):
  """Pads a numpy batch to `size` rows; padded rows have every mask False, id -1 and key
  b""."""
  n = len(batch["_id"])
  if n == size:
    return batch

  def pad(path, x):
    value = {"_id": -1, "_key": b""}.get(path[0].key, 0)
    return np.concatenate([x, np.full((size - n,) + x.shape[1:], value, x.dtype)])
  return jax.tree_util.tree_map_with_path(pad, batch)


def keep_items(ds, ids):
  """The examples of `ds` whose "id" is one of `ids`, in their order."""
  wanted = tf.constant(np.asarray(ids, np.int64))
  return ds.filter(lambda ex: tf.reduce_any(tf.equal(tf.cast(ex["id"], tf.int64), wanted)))


def eval_dataset(config, builder, split, ids=None, keys=False):
  ds = pipeline.read_in_order(builder, split)
  if ids is not None:
    ds = keep_items(ds, ids)
  expanded = pipeline.caption_lists(config, builder)
  if expanded:
    ds = pipeline.expand_captions(ds, config.modalities[expanded[0]].feature)
  to_example = pipeline.example_fn(config, False, expanded[0] if expanded else None,
                                   keys=keys)
  return ds.map(lambda ex: to_example(None, ex), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)


def eval_batch_count(config, builder, split, process_count=None):
  """Batches every process yields for `split` (the largest share's, so that all processes
  step together)."""
  _, count = pipeline.host(None, process_count)
  batch_size = pipeline.per_host_batch_size(config.eval_batch_size, count)
  expanded = pipeline.caption_lists(config, builder)
  sizes = []
  for host_split in tfds.even_splits(split, n=count):
    if expanded:
      feature = config.modalities[expanded[0]].feature
      ds = pipeline.read_in_order(builder, host_split)
      sizes.append(int(ds.reduce(np.int64(0), lambda n, ex: n + tf.cast(
          tf.maximum(tf.shape(ex[feature])[0], 1), tf.int64))))
    else:
      sizes.append(builder.info.splits[host_split].num_examples)
  return -(-max(sizes) // batch_size)


def eval_iterator(config, builder, split, *, process_index=None, process_count=None,
                  ids=None, keys=False, start_batch=0):
  """Every example of this process's share of `split` exactly once, in order, in batches
  padded with masked rows (id -1); with several processes, every process yields the same
  number of batches. `ids` (one process only) keeps just those items, in split order;
  `keys` adds each row's item key ("_key", bytes); the first `start_batch` batches are
  skipped unread."""
  index, count = pipeline.host(process_index, process_count)
  if ids is not None and count > 1:
    raise ValueError(f"eval_iterator(ids=...) reads on one process, not {count}")
  batch_size = pipeline.per_host_batch_size(config.eval_batch_size, count)
  host_split = tfds.even_splits(split, n=count)[index]
  ds = eval_dataset(config, builder, host_split, ids, keys).skip(start_batch * batch_size)
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  num_batches = (eval_batch_count(config, builder, split, count) - start_batch
                 if count > 1 else None)
  last = None
  for last in pipeline.numpy_batches(config, ds):
    yield pad_batch(last, batch_size)
    num_batches = num_batches and num_batches - 1
  while num_batches and num_batches > 0:
    if last is None:  # shapes for the padding batches, from the share's first example
      first = eval_dataset(config, builder, host_split, ids, keys).take(1).batch(1)
      last = next(pipeline.numpy_batches(config, first), None)
      if last is None:
        raise ValueError(f"split {host_split!r} is empty on process {index}")
    yield pad_batch(jax.tree.map(lambda x: x[:0], last), batch_size)
    num_batches -= 1
