"""Training batches of a mixture (config.data.sources): the stream positions of
data/mixture.py, each read from its source's random-access copy and prepared with the
modalities that source provides (the others masked).

Batches are those of pipeline.train_iterator plus "_source": bool[B, S], row i's source as
a one-hot over the active sources (mixture.active's order).
"""

import numpy as np
import tensorflow as tf

from xmodal_jax.data import mixture, pipeline


def mixture_position(g, seed, quotas):
  """(source index, the source's own position) of stream position `g` (int64 scalars):
  a seeded permutation of g's block puts g on a slot, and the source owning that slot reads
  its next position (data/mixture.py)."""
  quotas = tf.constant(quotas, tf.int64)
  ends = tf.cumsum(quotas)
  block, offset = g // mixture.BLOCK, g % mixture.BLOCK
  block_seed = tf.stack([tf.constant(seed, tf.int64), -1 - block])  # apart from epoch seeds
  slot = tf.random.experimental.index_shuffle(offset, block_seed, mixture.BLOCK - 1)
  source = tf.reduce_sum(tf.cast(slot >= ends, tf.int64))
  local = block * tf.gather(quotas, source) + slot - (tf.gather(ends, source)
                                                      - tf.gather(quotas, source))
  return source, local


def example_position(local, source, size, seed, num_sources):
  """The example a source's own position `local` reads: epoch local // size of the source is
  a seeded permutation of its split (`size` examples), as for a single dataset."""
  epoch_seed = tf.stack([tf.constant(seed, tf.int64), (local // size) * num_sources + source])
  return tf.random.experimental.index_shuffle(local % size, epoch_seed, size - 1)


class MixedReader:
  """Serialized records of several splits by (source index, position)."""

  def __init__(self, readers):
    self.readers = readers

  def read(self, sources, positions):
    records = np.empty(len(positions), object)
    for s, reader in enumerate(self.readers):
      rows = np.flatnonzero(sources == s)
      if len(rows):
        records[rows] = reader.read(positions[rows])
    return records


def train_iterator(config, sources, *, start_step=0, process_index=None, process_count=None):
  """Endless batches of this process's share of each global batch of the mixture, from step
  `start_step` on. `sources`: [(builder, split, {modality: feature})] in mixture.active
  order. Exact on resume and independent of the process count, as
  pipeline.train_iterator."""
  index, count = pipeline.host(process_index, process_count)
  batch_size = pipeline.per_host_batch_size(config.batch_size, count)
  weights = [options.weight for options in mixture.active(config.data).values()]
  quotas, num_sources = mixture.quotas(weights), len(sources)
  readers = [pipeline.random_access_reader(builder, split, count)
             for builder, split, _ in sources]
  sizes = tf.constant([reader.size for reader in readers], tf.int64)
  seed = config.seed

  def position(i):
    g = pipeline.global_position(i, batch_size, config.batch_size, index)
    source, local = mixture_position(g, seed, quotas)
    return g, source, example_position(local, source, tf.gather(sizes, source), seed,
                                       num_sources)

  if config.data.cache:  # every source's records in memory, one after another
    records = tf.constant(np.concatenate([r.read(np.arange(r.size)) for r in readers]))
    starts = tf.constant(np.cumsum([0] + [r.size for r in readers])[:-1], tf.int64)
    read = lambda g, s, p: (g, s, tf.gather(records, tf.gather(starts, s) + p))
  else:
    mixed = MixedReader(readers)

    def read(g, s, p):
      records = tf.numpy_function(mixed.read, [s, p], tf.string, stateful=False)
      return g, s, tf.ensure_shape(records, p.shape)

  shapes = {}
  for builder, _, provided in sources:
    for name, feature in provided.items():
      if config.modalities[name].kind == "features":
        shapes.setdefault(name, tuple(builder.info.features[feature].shape))
  branches = [(builder, pipeline.example_fn(config, True, provided=provided,
                                            missing_shapes=shapes))
              for builder, _, provided in sources]

  def to_example(g, s, record):
    example = tf.switch_case(tf.cast(s, tf.int32), [
        lambda b=builder, fn=fn: fn(g, b.info.features.deserialize_example(record))
        for builder, fn in branches])
    return example | {"_source": tf.one_hot(s, num_sources, dtype=tf.int32) > 0}

  ds = tf.data.Dataset.range(start_step * batch_size, np.iinfo(np.int64).max).map(position)
  ds = ds.batch(batch_size).map(read, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
  ds = ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return pipeline.numpy_batches(config, ds)
