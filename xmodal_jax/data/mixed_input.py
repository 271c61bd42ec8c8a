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
  """(source index, the source's own position) of stream positions `g` (int64, any shape):
  a seeded permutation of g's block puts g on a slot, and the source owning that slot reads
  its next position (data/mixture.py)."""
  quotas = tf.constant(quotas, tf.int64)
  ends = tf.cumsum(quotas)
  block, offset = g // mixture.BLOCK, g % mixture.BLOCK
  slot = pipeline.index_shuffle(offset, seed, -1 - block,  # apart from epoch streams
                                tf.constant(mixture.BLOCK - 1, tf.int64))
  source = tf.reduce_sum(tf.cast(slot[..., None] >= ends, tf.int64), axis=-1)
  local = block * tf.gather(quotas, source) + slot - (tf.gather(ends, source)
                                                      - tf.gather(quotas, source))
  return source, local


def example_position(local, source, size, seed, num_sources):
  """The example a source's own position `local` reads (int64, any shape; `size` the
  source's example count, of the same shape): epoch local // size of the source is a seeded
  permutation of its split, as for a single dataset."""
  return pipeline.index_shuffle(local % size, seed, (local // size) * num_sources + source,
                                size - 1)


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
  pipeline.train_iterator.
  """
  index, count = pipeline.host(process_index, process_count)
  batch_size = pipeline.per_host_batch_size(config.batch_size, count)
  weights = [options.weight for options in mixture.active(config.data).values()]
  quotas, num_sources = mixture.quotas(weights), len(sources)
  readers = [pipeline.random_access_reader(builder, split, count)
             for builder, split, _ in sources]
  sizes = tf.constant([reader.size for reader in readers], tf.int64)
  seed = config.seed

  def positions(step):  # this process's batch `step` -> (g, source, example position)[B]
    i = step * batch_size + tf.range(batch_size, dtype=tf.int64)
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

  preparations, preparation_of = _preparations(config, sources)
  prepare = pipeline.prepare_rows(preparations)
  one_hot = tf.eye(num_sources, dtype=tf.int32) > 0

  def batch(step):
    g, s, records = read(*positions(step))
    return (prepare(g, records, tf.gather(preparation_of, s))
            | {"_source": tf.gather(one_hot, s)})

  ds = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max // batch_size).map(
      batch, num_parallel_calls=tf.data.AUTOTUNE)
  return pipeline.numpy_batches(config, ds.prefetch(tf.data.AUTOTUNE))


def _preparations(config, sources):
  """[(builder, pipeline.example_fn)] that prepare the mixture's rows, and the index of
  each source's: sources of one dataset that provide the same features share one (each
  preparation prepares its rows of a batch apart; branching per row on the source cost 65%
  of the input rate)."""
  shapes = {}
  for builder, _, provided in sources:
    for name, feature in provided.items():
      if config.modalities[name].kind == "features":
        shapes.setdefault(name, tuple(builder.info.features[feature].shape))
  preparations, preparation_of = {}, []
  for builder, _, provided in sources:
    key = (builder.data_dir, tuple(sorted(provided.items())))
    if key not in preparations:
      preparations[key] = (builder, pipeline.example_fn(config, True, provided=provided,
                                                        missing_shapes=shapes))
    preparation_of.append(list(preparations).index(key))
  return list(preparations.values()), tf.constant(preparation_of, tf.int64)
