"""Records -> encoded examples: each modality's value checked and stored as the dataset
holds it (docs of the stored features: data/records.py), and the error a bad record raises.
The single-process build and the Beam build run the same Encoder."""

import dataclasses
import io
import json
import os
import re

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from xmodal_jax.data import media, webdataset
from xmodal_jax.files import is_remote

KINDS = ("image", "audio", "video", "text", "features")


@dataclasses.dataclass(frozen=True)
class BuildOptions:
  """How media are stored; recorded in the dataset folder's xmodal_dataset.json."""
  sample_rate: int = 16_000  # audio is resampled to this at build time
  video_frames: int = 8  # frames kept per video (the pipeline samples from these)
  frame_size: int = 256  # stored video frames' shorter side
  jpeg_quality: int = 90
  strict: bool = False  # a bad record stops the build instead of being skipped
  # Relative media paths may not leave the manifest's folder (through ".." or a symlink);
  # absolute paths and other filesystems are taken as written.
  confine: bool = True
  max_audio_seconds: float = 600.0  # longer audio is a bad record (decoding stops there)
  max_pixels: int = media.MAX_PIXELS  # larger images and video frames are bad records
  max_video_frames: int = media.MAX_VIDEO_FRAMES  # longer videos are bad records


class BadRecord(ValueError):
  """One record that cannot be stored: which item, which file (or field), and why."""

  def __init__(self, item_id, where, reason):
    super().__init__(f"item {item_id!r}: {where}: {reason}")
    self.item_id, self.where, self.reason = item_id, where, reason

  def as_dict(self):
    return {"id": self.item_id, "file": self.where, "reason": self.reason}


def feature_spec(kind, shape=None):
  """The TFDS feature storing one modality of `kind`."""
  if kind == "image":
    return tfds.features.Tensor(shape=(), dtype=np.str_)  # encoded bytes, any format TF reads
  if kind == "audio":
    return tfds.features.Tensor(shape=(None,), dtype=np.int16,
                                encoding=tfds.features.Encoding.BYTES)
  if kind == "video":
    return tfds.features.Tensor(shape=(None,), dtype=np.str_)  # JPEG frames
  if kind == "text":
    return tfds.features.Sequence(tfds.features.Text())
  if kind == "features":
    return tfds.features.Tensor(shape=tuple(shape), dtype=np.float32,
                                encoding=tfds.features.Encoding.BYTES)
  raise ValueError(f"unknown modality kind {kind!r}; expected one of {KINDS}")


def empty_value(kind, shape=None):
  """What an item lacking the modality stores (its has_ flag is False)."""
  if kind == "features":
    return np.zeros(shape, np.float32)
  return {"image": b"", "audio": np.zeros([0], np.int16), "video": np.zeros([0], object),
          "text": []}[kind]


def resolve_path(value, base_dir, item_id, name):
  if not isinstance(value, str) or not value:
    raise BadRecord(item_id, name, f"expected a file path (string), got "
                    f"{type(value).__name__} {value!r}"[:200])
  return absolute(value, base_dir)


def absolute(path, base_dir):
  """`path` as given when absolute or on a filesystem scheme, else relative to `base_dir`."""
  return path if is_remote(path) or os.path.isabs(path) else os.path.join(base_dir, path)


def folder_of(path):
  """The folder of a local file (made absolute) or of a scheme path."""
  return path.rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(os.path.abspath(path))


def leaves_folder(value, path, base_dir):
  """Whether relative path `value` (resolved: `path`) leads outside `base_dir`, through ".."
  or a symlink (absolute and scheme paths are the user's explicit choice)."""
  if is_remote(path) or os.path.isabs(value):
    return False
  base = os.path.realpath(base_dir)
  return os.path.commonpath([os.path.realpath(path), base]) != base


def check_confined(value, path, base_dir, item_id):
  """BadRecord when relative media path `value` (resolved: `path`) leaves `base_dir`."""
  if leaves_folder(value, path, base_dir):
    raise BadRecord(item_id, path, f"{value!r} leads outside the manifest's folder "
                    f"{os.path.realpath(base_dir)} (through '..' or a symlink); build with "
                    "--noconfine to allow it")


def load(value, base_dir, item_id, name, what, confine=False):
  """(source, where) of one modality's media: a local file's path, which decoders read, or
  the bytes of a tar shard's member; `where` names it in errors. `confine`: refuse relative
  paths that leave `base_dir`."""
  if webdataset.is_member(value):
    where = f"{value['tar']}:{value['member']}"
    try:
      return webdataset.read_member(value), where
    except (ValueError, tf.errors.OpError) as e:
      raise BadRecord(item_id, where, f"cannot read the shard member ({e})") from e
  path = resolve_path(value, base_dir, item_id, name)
  if confine:
    check_confined(value, path, base_dir, item_id)
  if not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):
    raise BadRecord(item_id, path, f"missing {what} file")
  if is_remote(path):  # Decoders open local paths; any other filesystem goes through gfile.
    try:
      with tf.io.gfile.GFile(path, "rb") as f:
        return f.read(), path
    except tf.errors.OpError as e:
      raise BadRecord(item_id, path, f"cannot read the file ({e.message})") from e
  return path, path


def encode_image(source, where, item_id, options):
  """The image file's bytes, once they decode; None `options`: the default pixel bound."""
  if isinstance(source, str):
    with open(source, "rb") as f:  # a local path (`load` reads other filesystems)
      source = f.read()
  size = media.image_size(source)
  if size:
    try:
      media.check_pixels(where, *size, options.max_pixels if options else media.MAX_PIXELS)
    except ValueError as e:
      raise BadRecord(item_id, where, str(e).split(": ", 1)[1]) from e
  try:
    tf.io.decode_image(source, channels=3, expand_animations=False)
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
    message = re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:\w+\]", "", e.message).strip()
    raise BadRecord(item_id, where, f"cannot decode image ({message})") from e
  return source


def encode_audio(source, where, item_id, options):
  try:
    return media.decode_audio(source, options.sample_rate, options.max_audio_seconds)
  except ValueError as e:
    raise BadRecord(item_id, where, f"cannot decode audio ({e})") from e


def encode_video(source, where, item_id, options):
  try:
    frames = media.decode_video(source, options.video_frames, max_pixels=options.max_pixels,
                                max_frames=options.max_video_frames)
  except ValueError as e:
    raise BadRecord(item_id, where, f"cannot decode video ({e})") from e
  height, width = frames.shape[1:3]
  scale = options.frame_size / min(height, width)
  if scale < 1:
    frames = media.resize_frames(frames, max(1, round(height * scale)),
                                 max(1, round(width * scale)))
  return np.array([tf.io.encode_jpeg(f, quality=options.jpeg_quality).numpy()
                   for f in frames], dtype=object)


def encode_features(source, where, item_id, shape):
  """A .npy file (a path or its bytes), or numbers written in the record (a list) ->
  float32 of this dataset's `shape`."""
  try:
    if isinstance(source, list):
      x = np.asarray(source)
    else:
      x = np.load(io.BytesIO(source) if isinstance(source, bytes) else source,
                  allow_pickle=False)
  except (ValueError, OSError) as e:
    what = "a list of numbers" if isinstance(source, list) else ".npy"
    raise BadRecord(item_id, where, f"cannot read {what} ({e})") from e
  if x.shape != tuple(shape):
    raise BadRecord(item_id, where, f"features of shape {x.shape}; this dataset's are "
                    f"{tuple(shape)} (from its first features file)")
  if not np.issubdtype(x.dtype, np.number):
    raise BadRecord(item_id, where, f"features of dtype {x.dtype}; expected numbers")
  return x.astype(np.float32)


def encode_text(value, item_id, name):
  captions = [value] if isinstance(value, str) else value
  if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
    raise BadRecord(item_id, name, f"expected a string or a list of strings, got "
                    f"{type(value).__name__} {value!r}"[:200])
  for i, caption in enumerate(captions):
    if not caption.strip():
      raise BadRecord(item_id, name, "empty caption" if len(captions) == 1 else
                      f"caption {i} is empty")
    check_utf8(caption, item_id, name if len(captions) == 1 else f"{name}[{i}]")
  if not captions:
    raise BadRecord(item_id, name, "empty caption list")
  return captions


def check_utf8(text, item_id, what):
  """BadRecord when `text` cannot be stored as UTF-8 (a lone surrogate from JSON's \\ud800)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise BadRecord(item_id, what, f"cannot be stored as UTF-8 ({e.reason} at character "
                    f"{e.start}: {ascii(text[e.start])})") from e


def features_shape(records, name, base_dir):
  """The shape of the first readable .npy file of modality `name` (all must share it)."""
  for _, record in records:
    value = record.get(name)
    try:
      if isinstance(value, list):
        return np.asarray(value, np.float32).shape
      if webdataset.is_member(value):
        return tuple(np.load(io.BytesIO(webdataset.read_member(value)),
                             allow_pickle=False).shape)
      if isinstance(value, str):
        with tf.io.gfile.GFile(absolute(value, base_dir), "rb") as f:
          return tuple(np.load(io.BytesIO(f.read()), allow_pickle=False).shape)
    except (ValueError, OSError, tf.errors.OpError):
      continue
  raise ValueError(f"modality {name!r} (features): no readable .npy file in the manifest")


def check_id_types(splits):
  """Ids are all integers or all strings: 7 and "7" would otherwise be one item."""
  first = {}  # type name -> where it first appears
  for records in splits.values():
    for where, record in records:
      item_id = record.get("id")
      if isinstance(item_id, (int, str)) and not isinstance(item_id, bool):
        first.setdefault(type(item_id).__name__, (where, item_id))
  if len(first) > 1:
    (w1, id1), (w2, id2) = first["int"], first["str"]
    raise ValueError(f"record ids mix integers ({w1}: {id1!r}) and strings ({w2}: {id2!r}); "
                     "use one type for every id")


@dataclasses.dataclass(frozen=True)
class Encoder:
  """One record -> (example without its first_ flags, {modality: marker}), or BadRecord.
  What every build worker runs; it holds only what it needs, so it pickles to Beam workers.
  A marker names the (id, modality, value) an example stores: first_m is set on the first
  good record of the split with its marker."""
  modalities: dict
  feature_shapes: dict
  options: BuildOptions
  base_dir: str
  labels: bool = False  # records may carry a class name, "label" (zero-shot evaluation)

  def __call__(self, where, record, number, home, split):
    """`number`: the item's int id; `home`: (split, where) of the id's first record."""
    try:
      self._check(where, record, home, split)
      encoded = self._encode(record)
    except (BadRecord, KeyboardInterrupt):
      raise
    except Exception as e:  # pylint: disable=broad-except  # e.g. OSError, a codec's
      raise BadRecord(record["id"], where, f"{type(e).__name__}: {e}") from e
    key = str(record["id"])
    example, markers = {"id": number, "key": key}, {}
    for name, kind in self.modalities.items():
      has = name in encoded
      example[name] = encoded[name] if has else empty_value(kind,
                                                            self.feature_shapes.get(name))
      example[f"has_{name}"] = has
      if has:
        markers[name] = json.dumps([key, name, record[name]], sort_keys=True)
    if self.labels:
      example["label"] = self._label(record)
    return example, markers

  def _label(self, record):
    value = record.get("label")
    if webdataset.is_member(value):
      data, _ = load(value, self.base_dir, record["id"], "label", "label", self.options.confine)
      value = webdataset.member_text(value, data)
    if value is None:
      return ""
    if not isinstance(value, str) or not value.strip():
      raise BadRecord(record["id"], "label", f"expected a class name (non-empty string), got "
                      f"{type(value).__name__} {value!r}"[:200])
    check_utf8(value, record["id"], "label")
    return value.strip()

  def _check(self, where, record, home, split):
    item_id = record.get("id")
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool) or item_id == "":
      raise BadRecord(item_id, where, "'id' must be a non-empty string or an integer")
    if isinstance(item_id, str):
      check_utf8(item_id, item_id, "id")
    allowed = {"id", "split"} | set(self.modalities) | ({"label"} if self.labels else set())
    unknown = sorted(set(record) - allowed)
    if unknown:
      raise BadRecord(item_id, where, f"unknown modality key(s) {unknown}; this dataset has "
                      f"{sorted(self.modalities)}")
    home_split, home_where = home
    if home_split != split:
      raise BadRecord(item_id, where, f"the id's first record is in split {home_split!r} "
                      f"({home_where}); an item belongs to one split, so this one is skipped")
    if not any(record.get(name) is not None for name in self.modalities):
      raise BadRecord(item_id, where, "the record has none of the dataset's modalities")

  def _encode(self, record):
    item_id = record["id"]
    out = {}
    for name, kind in self.modalities.items():
      if name not in record or record[name] is None:
        continue
      value = record[name]
      if kind == "text":
        if webdataset.is_member(value):
          data, where = load(value, self.base_dir, item_id, name, kind, self.options.confine)
          value = webdataset.member_text(value, data)
        out[name] = encode_text(value, item_id, name)
        continue
      if kind == "features" and isinstance(value, list):
        out[name] = encode_features(value, name, item_id, self.feature_shapes[name])
        continue
      source, where = load(value, self.base_dir, item_id, name, kind, self.options.confine)
      if kind == "features":
        out[name] = encode_features(source, where, item_id, self.feature_shapes[name])
      else:
        encode = {"image": encode_image, "audio": encode_audio, "video": encode_video}[kind]
        out[name] = encode(source, where, item_id, self.options)
    return out


def bad_record_entry(error, where, split):
  """A bad-record report line."""
  return error.as_dict() | {"source": str(where), "split": split}
