"""Random access to a TFDS split: an ArrayRecord copy of its TFRecord shards, read by example
index, so that training can start at any position without reading the records before it
(docs/architecture.md, "Input position").

The copy sits in `{dataset folder}/random_access/`, one ArrayRecord file per TFRecord shard
holding the same serialized records in the same order; position i of a split is the i-th
record `builder.as_dataset(split, shuffle_files=False)` yields.
"""

import os
import sys

import numpy as np
import tensorflow as tf

FOLDER = "random_access"


def _copy_path(tfrecord_path):
  folder, name = os.path.split(tfrecord_path)
  return os.path.join(folder, FOLDER, name + ".array_record")


def _instructions(builder, split):
  instructions = builder.info.splits[split].file_instructions
  if builder.info.file_format.value != "tfrecord":
    raise ValueError(f"{builder.data_dir}: stored as {builder.info.file_format.value}; the "
                     "random-access copy is made from TFRecord shards")
  return instructions


def has_copy(builder, split):
  return all(os.path.isfile(_copy_path(i.filename)) for i in _instructions(builder, split))


def write_copy(builder, split):
  """Writes the ArrayRecord copy of the shards `split` reads (once; each file is written
  under a temporary name and renamed, so a killed copy leaves no partial file)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  todo = [i.filename for i in _instructions(builder, split)
          if not os.path.isfile(_copy_path(i.filename))]
  if todo:
    print(f"Writing a random-access copy of {builder.name} {split!r} ({len(todo)} shards, "
          f"once) in {os.path.join(builder.data_dir, FOLDER)}...", file=sys.stderr, flush=True)
  for tfrecord_path in dict.fromkeys(todo):
    path = _copy_path(tfrecord_path)
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
        [_copy_path(f) for f in files])
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
