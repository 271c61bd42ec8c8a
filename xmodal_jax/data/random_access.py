"""Random access to a TFDS split, read by example index, so that training can start at any
position without reading the records before it (docs/architecture.md, "Input position").

A dataset built as ArrayRecord is read directly. One built as TFRecord gets an ArrayRecord
copy in `{dataset folder}/random_access/`, one file per TFRecord shard holding the same
serialized records in the same order. Either way, position i of a split is the i-th record
of its shards in order (for TFRecord: what `builder.as_dataset(split, shuffle_files=False)`
yields).
"""

import os
import sys

import numpy as np
import tensorflow as tf

FOLDER = "random_access"


def is_array_record(builder):
  return builder.info.file_format.value == "array_record"


def _copy_path(builder, shard_path):
  if is_array_record(builder):
    return shard_path
  folder, name = os.path.split(shard_path)
  return os.path.join(folder, FOLDER, name + ".array_record")


def _instructions(builder, split):
  if "://" in builder.data_dir:
    raise ValueError(f"{builder.data_dir}: examples are read by position from local files "
                     "only; mount the bucket (e.g. Cloud Storage FUSE) and set "
                     "config.data.data_dir to the mount point")
  instructions = builder.info.splits[split].file_instructions
  if builder.info.file_format.value not in ("tfrecord", "array_record"):
    raise ValueError(f"{builder.data_dir}: stored as {builder.info.file_format.value}; "
                     "random access reads ArrayRecord files or a copy of TFRecord shards")
  return instructions


def has_copy(builder, split):
  return all(os.path.isfile(_copy_path(builder, i.filename))
             for i in _instructions(builder, split))


def write_copy(builder, split):
  """Writes the ArrayRecord copy of the shards `split` reads (once; each file is written
  under a temporary name and renamed, so a killed copy leaves no partial file). Nothing to
  do for a dataset built as ArrayRecord."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  todo = [i.filename for i in _instructions(builder, split)
          if not os.path.isfile(_copy_path(builder, i.filename))]
  if todo:
    print(f"Writing a random-access copy of {builder.name} {split!r} ({len(todo)} shards, "
          f"once) in {os.path.join(builder.data_dir, FOLDER)}...", file=sys.stderr, flush=True)
  for tfrecord_path in dict.fromkeys(todo):
    path = _copy_path(builder, tfrecord_path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.partial-{os.getpid()}"
    writer = array_record_module.ArrayRecordWriter(partial, "group_size:1")
    for record in tf.data.TFRecordDataset(tfrecord_path).as_numpy_iterator():
      writer.write(record)
    writer.close()
    os.replace(partial, path)


class Reader:
  """Serialized records of a split by position (0 .. size - 1), through its copy."""

  def __init__(self, builder, split):
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    instructions = _instructions(builder, split)
    if not has_copy(builder, split):
      raise FileNotFoundError(f"{builder.data_dir}: split {split!r} has no random-access copy "
                              f"(python -m xmodal_jax.data.build --random_access_copy "
                              f"--name={builder.name} writes it)")
    files = list(dict.fromkeys(i.filename for i in instructions))
    shard_sizes = {i.filename: i.examples_in_shard for i in instructions}
    file_starts = dict(zip(files, np.cumsum([0] + [shard_sizes[f] for f in files])))
    self._source = array_record_data_source.ArrayRecordDataSource(
        [_copy_path(builder, f) for f in files])
    takes = [i.take for i in instructions]
    self._starts = np.cumsum([0] + takes)[:-1]  # split position where each piece begins
    self._offsets = np.array([file_starts[i.filename] + i.skip for i in instructions])
    self.size = int(sum(takes))

  def read(self, positions):
    """object array of serialized records at split `positions` (int64 [n])."""
    positions = np.asarray(positions, np.int64)
    piece = np.searchsorted(self._starts, positions, side="right") - 1
    indices = self._offsets[piece] + positions - self._starts[piece]
    return np.array(self._source.__getitems__(indices.tolist()), dtype=object)

  def dataset(self, batch=256):
    """tf.data of the serialized records in split order."""
    def read(positions):
      return tf.ensure_shape(tf.numpy_function(self.read, [positions], tf.string,
                                               stateful=False), positions.shape)
    return tf.data.Dataset.range(self.size).batch(batch).map(read).unbatch()
