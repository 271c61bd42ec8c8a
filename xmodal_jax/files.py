"""The file layer for what a run reads and writes beside its data (workdir, exports, reports):
tf.io.gfile, as the data builders use, so a local path and any scheme TensorFlow has (gs://,
ram://, s3:// and hdfs:// with their plugins) take the same code. TensorFlow is imported only
when a file is touched, so the packages that use this layer (train/, eval/) import without
it. Orbax checkpoints go through etils epath and TensorStore, which know local paths, gs://
and s3://."""

import io
import os

import numpy as np


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def exists(path):
  return _gfile().exists(path)


def isdir(path):
  return _gfile().isdir(path)


def makedirs(path):
  _gfile().makedirs(path)


def open_file(path, mode="r"):
  """A file object on any scheme; "a" on an object store rewrites the object on close."""
  return _gfile().GFile(path, mode)


def is_remote(path):
  """Whether `path` names a file through a filesystem scheme (gs://, s3://, ram://, ...)."""
  return "://" in str(path)


def absolute(path):
  """A local path made absolute; a scheme path as given (it has no working directory)."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def write_atomically(path, data):
  """Writes `data` (str or bytes) under a temporary name, then renames it over `path`, so a
  reader never sees a partial file (object stores: the object appears once uploaded)."""
  partial = f"{path}.tmp"
  with open_file(partial, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)
  _gfile().rename(partial, path, overwrite=True)


def read_text(path):
  with open_file(path) as f:
    return f.read()


def read_bytes(path):
  with open_file(path, "rb") as f:
    return f.read()


def listdir(path):
  return _gfile().listdir(path)


def walk_files(path):
  """The paths, relative to folder `path`, of every file under it, sorted."""
  found = []
  for folder, _, names in _gfile().walk(path):
    relative = os.path.relpath(folder, path) if not is_remote(path) else (
        folder[len(str(path).rstrip("/")) + 1:] or ".")
    found.extend(os.path.normpath(os.path.join(relative, name)) for name in names)
  return sorted(found)


def save_array(path, array):
  """np.save to any scheme (atomically)."""
  buffer = io.BytesIO()
  np.save(buffer, array)
  write_atomically(path, buffer.getvalue())


def load_arrays(path):
  """np.load from any scheme: the array of an .npy, or {name: array} of an .npz."""
  loaded = np.load(io.BytesIO(read_bytes(path)))
  if isinstance(loaded, np.lib.npyio.NpzFile):
    with loaded:
      return {k: loaded[k] for k in loaded.files}
  return loaded
