"""Random access to a TFDS split, read by example index, so that training can start at any
position without reading the records before it (docs/architecture.md, "Input position").

A dataset built as ArrayRecord is read directly. One built as TFRecord on a local disk gets
an ArrayRecord copy in `{dataset folder}/random_access/`, one file per TFRecord shard holding
the same serialized records in the same order. One built as TFRecord under a filesystem
scheme (gs://, ...), which ArrayRecord's reader cannot open, gets an index instead: the byte
offset of each record of a shard (`random_access/{shard}.offsets.npy`), and a record is one
ranged read of its shard through tf.io.gfile. Either way, position i of a split is the i-th
record of its shards read one after another (for TFRecord: what `builder.as_dataset(split,
shuffle_files=False)` yields with `tfds.ReadConfig(interleave_cycle_length=1)`; by default
TFDS interleaves blocks of 16 records of up to 16 shards).
"""

import concurrent.futures
import os
import struct
import sys

import numpy as np
import tensorflow as tf

from xmodal_jax import files

FOLDER = "random_access"
# A TFRecord record: uint64 length, uint32 CRC of the length, the data, uint32 CRC of the data.
_HEADER, _FOOTER = 12, 4
_BLOCK = 16 << 20
# Concurrent ranged reads of one process from remote shards: each waits on the network.
_REMOTE_READERS = 32


def is_array_record(builder):
  return builder.info.file_format.value == "array_record"


def _offset_indexed(builder):
  """Whether positions are read through offset indexes: a TFRecord build in a bucket."""
  return not is_array_record(builder) and files.is_remote(builder.data_dir)


def _copy_path(builder, shard_path):
  """The file that gives random access to `shard_path`: itself (ArrayRecord), its ArrayRecord
  copy (local TFRecord) or its offset index (remote TFRecord)."""
  if is_array_record(builder):
    return shard_path
  folder, name = os.path.split(shard_path)
  suffix = ".offsets.npy" if _offset_indexed(builder) else ".array_record"
  return os.path.join(folder, FOLDER, name + suffix)


def _instructions(builder, split):
  if builder.info.file_format.value not in ("tfrecord", "array_record"):
    raise ValueError(f"{builder.data_dir}: stored as {builder.info.file_format.value}; "
                     "random access reads ArrayRecord files or TFRecord shards")
  if is_array_record(builder) and files.is_remote(builder.data_dir):
    raise ValueError(f"{builder.data_dir}: ArrayRecord files are read by position from local "
                     "files only; build the dataset as TFRecord (read by position through "
                     "an offset index) or mount the bucket (e.g. Cloud Storage FUSE) and set "
                     "config.data.data_dir to the mount point")
  return builder.info.splits[split].file_instructions


def has_copy(builder, split):
  return all(tf.io.gfile.exists(_copy_path(builder, i.filename))
             for i in _instructions(builder, split))


def record_offsets(path):
  """The byte offset of each record of a TFRecord file, read in one pass over it in large
  blocks (a read per record would be a request per record on a bucket)."""
  offsets, position = [], 0
  with tf.io.gfile.GFile(path, "rb") as f:
    size, data, base = f.size(), b"", 0  # `data` holds the file's bytes from `base` on
    while position < size:
      if position + _HEADER > base + len(data):
        if position > base + len(data):  # a record longer than a block: skip its rest
          f.seek(position)
          data, base = b"", position
        data, base = data[position - base:] + f.read(_BLOCK), position
        if position + _HEADER > base + len(data):
          raise ValueError(f"{path}: truncated record header at byte {position}")
      offsets.append(position)
      position += _HEADER + struct.unpack_from("<Q", data, position - base)[0] + _FOOTER
    if position != size:
      raise ValueError(f"{path}: truncated record at byte {offsets[-1]}")
  return np.array(offsets + [position], np.int64)  # the end closes the last record


def write_copy(builder, split):
  """Writes the ArrayRecord copy (or, in a bucket, the offset index) of the shards `split`
  reads (once; each file is written under a temporary name and renamed, so a killed copy
  leaves no partial file). Nothing to do for a dataset built as ArrayRecord."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  todo = [i.filename for i in _instructions(builder, split)
          if not tf.io.gfile.exists(_copy_path(builder, i.filename))]
  if todo:
    what = "an offset index" if _offset_indexed(builder) else "a random-access copy"
    print(f"Writing {what} of {builder.name} {split!r} ({len(todo)} shards, once) in "
          f"{os.path.join(builder.data_dir, FOLDER)}...", file=sys.stderr, flush=True)
  for tfrecord_path in dict.fromkeys(todo):
    path = _copy_path(builder, tfrecord_path)
    if _offset_indexed(builder):
      files.save_array(path, record_offsets(tfrecord_path))
      continue
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.partial-{os.getpid()}"
    writer = array_record_module.ArrayRecordWriter(partial, "group_size:1")
    try:
      for record in tf.data.TFRecordDataset(tfrecord_path).as_numpy_iterator():
        writer.write(record)
    except tf.errors.OpError as e:
      writer.close()
      os.remove(partial)
      raise ValueError(f"{tfrecord_path}: {e.message}; the shard is damaged: rebuild the "
                       "dataset (or restore the file)") from e
    writer.close()
    os.replace(partial, path)


class Reader:
  """Serialized records of a split by position (0 .. size - 1), through its copy (or
  offset index)."""

  def __init__(self, builder, split):
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    instructions = _instructions(builder, split)
    if not has_copy(builder, split):
      raise FileNotFoundError(f"{builder.data_dir}: split {split!r} has no random-access copy "
                              f"(python -m xmodal_jax.data.build --random_access_copy "
                              f"--name={builder.name} writes it)")
    shards = list(dict.fromkeys(i.filename for i in instructions))
    shard_sizes = {i.filename: i.examples_in_shard for i in instructions}
    file_starts = dict(zip(shards, np.cumsum([0] + [shard_sizes[f] for f in shards])))
    copies = [_copy_path(builder, f) for f in shards]
    if _offset_indexed(builder):
      self._source = _IndexedTFRecords(shards, copies)
    else:
      self._source = array_record_data_source.ArrayRecordDataSource(copies)
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


class _IndexedTFRecords:
  """Records of TFRecord shards by index (shards in order), read through tf.io.gfile at the
  offsets their indexes give: one ranged read per run of consecutive records, so reading a
  whole split (config.data.cache) is a read per shard and a shuffled batch one per record."""

  def __init__(self, shards, offset_files):
    self._shards = shards
    self._offsets = [files.load_arrays(f) for f in offset_files]
    self._starts = np.cumsum([0] + [len(o) - 1 for o in self._offsets])[:-1]
    self._pool = concurrent.futures.ThreadPoolExecutor(_REMOTE_READERS)

  def _read_run(self, shard, records):
    """The records (sorted, consecutive, repeats allowed) of shard `shard`."""
    offsets = self._offsets[shard]
    start, end = int(offsets[records[0]]), int(offsets[records[-1] + 1])
    with tf.io.gfile.GFile(self._shards[shard], "rb") as f:
      f.seek(start)
      data = f.read(end - start)
    if len(data) != end - start:
      raise ValueError(f"{self._shards[shard]}: ends before byte {end}: the shard changed "
                       "since its offset index was written")
    return [data[offsets[r] - start + _HEADER:offsets[r + 1] - start - _FOOTER]
            for r in records]

  def __getitems__(self, indices):
    indices = np.asarray(indices, np.int64)
    order = np.argsort(indices, kind="stable")
    ordered = indices[order]
    shard = np.searchsorted(self._starts, ordered, side="right") - 1
    runs = np.split(np.arange(len(ordered)), np.flatnonzero(
        (np.diff(ordered) > 1) | (np.diff(shard) != 0)) + 1)
    runs = [run for run in runs if len(run)]
    read = lambda run: self._read_run(shard[run[0]], ordered[run] - self._starts[shard[run[0]]])
    records = [None] * len(indices)
    for run, run_records in zip(runs, self._pool.map(read, runs)):
      for k, record in zip(run, run_records):
        records[order[k]] = record
    return records
