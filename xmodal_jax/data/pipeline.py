"""split -> per-host shard -> preprocess -> batch -> prefetch -> numpy batches.

Batches follow DESIGN.md's contract: {modality: {input: array}, "_mask": {modality: bool[B]},
"_id": int64[B]}.
"""

import os
import sys

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from xmodal_jax.data import preprocess
from xmodal_jax.data.builders import digit_sequences

tf.config.set_visible_devices([], "GPU")  # tf.data only: keep accelerators for JAX.

# Datasets whose builder needs no download: built in place on first use.
EMBEDDED_BUILDERS = {"digit_sequences": digit_sequences.DigitSequences}


def get_builder(data_config):
  """The TFDS builder `config.data` names, prepared; embedded datasets are built if missing."""
  data_dir = data_config.data_dir
  if data_dir is not None:
    data_dir = os.path.expanduser(data_dir)
    if not os.path.isdir(data_dir):
      raise FileNotFoundError(f"config.data.data_dir={data_config.data_dir!r}: no such folder")
  name = data_config.name
  if name in EMBEDDED_BUILDERS:
    builder = EMBEDDED_BUILDERS[name](data_dir=data_dir)
    if not builder.is_prepared():
      print(f"Building the embedded dataset {name!r} in {builder.data_dir} (once)...",
            file=sys.stderr, flush=True)
      builder.download_and_prepare()
    return builder
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"config.data.name={name!r}: no such TFDS dataset ({e})") from e
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"config.data.name={name!r} is not prepared in {builder.data_dir}; build it first "
        f"(tfds build or python -m xmodal_jax.data.build) or set config.data.data_dir")
  return builder


def check_modalities(config, builder):
  """Every configured modality must name a feature the dataset has."""
  features = builder.info.features
  for name, modality in config.modalities.items():
    if modality.feature not in features:
      raise ValueError(
          f"config.modalities.{name}.feature={modality.feature!r}: dataset "
          f"{config.data.name!r} has no such feature; it has {sorted(features.keys())}")


def _example_fn(config, train):
  ops = {name: preprocess.get_op(name, m, train) for name, m in config.modalities.items()}
  features = {name: m.feature for name, m in config.modalities.items()}

  def fn(example):
    out = {name: ops[name](example[features[name]]) for name in ops}
    out["_mask"] = {name: tf.constant(True) for name in ops}
    out["_id"] = tf.cast(example["id"], tf.int64)
    return out
  return fn


def _numpy_batches(config, ds):
  """Iterates `ds` as numpy, applying each modality's batch op (e.g. tokenization)."""
  batch_ops = {name: preprocess.get_batch_op(name, m) for name, m in config.modalities.items()}
  batch_ops = {name: op for name, op in batch_ops.items() if op}
  for batch in ds.as_numpy_iterator():
    for name, op in batch_ops.items():
      batch[name] = op(batch[name])
    yield batch


def per_host_batch_size(global_batch_size):
  count = jax.process_count()
  if global_batch_size % count:
    raise ValueError(f"batch_size={global_batch_size} does not divide by the "
                     f"{count} processes")
  return global_batch_size // count


def train_iterator(config, builder, *, start_step=0):
  """Endless shuffled batches of this process's share, resuming after `start_step` batches."""
  batch_size = per_host_batch_size(config.batch_size)
  split = tfds.even_splits(config.data.train_split, n=jax.process_count(),
                           drop_remainder=True)[jax.process_index()]
  read_config = tfds.ReadConfig(shuffle_seed=config.seed, try_autocache=False)
  ds = builder.as_dataset(split=split, shuffle_files=True, read_config=read_config)
  if config.data.cache:
    ds = ds.cache()
  ds = ds.shuffle(config.data.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True)
  ds = ds.repeat().skip(start_step * batch_size)
  ds = ds.map(_example_fn(config, train=True), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _numpy_batches(config, ds)


def pad_batch(batch, size):
  """Pads a numpy batch to `size` rows; padded rows have every mask False and id -1."""
  n = len(batch["_id"])
  if n == size:
    return batch

  def pad(path, x):
    value = -1 if path[0].key == "_id" else 0
    return np.concatenate([x, np.full((size - n,) + x.shape[1:], value, x.dtype)])
  return jax.tree_util.tree_map_with_path(pad, batch)


def eval_iterator(config, builder, split):
  """Every item of this process's share of `split` exactly once, in order, padded batches."""
  batch_size = per_host_batch_size(config.eval_batch_size)
  host_split = tfds.even_splits(split, n=jax.process_count())[jax.process_index()]
  ds = builder.as_dataset(split=host_split, shuffle_files=False)
  ds = ds.map(_example_fn(config, train=False), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  for batch in _numpy_batches(config, ds):
    yield pad_batch(batch, batch_size)
