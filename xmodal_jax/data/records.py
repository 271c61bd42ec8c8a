"""Datasets given as records -> TFDS datasets with per-modality presence masks.

A record is one item: {"id": ..., "split": ..., <modality>: value, ...}. Values are file
paths for image, audio, video and features (.npy) modalities, a string or a list of strings
for text; a features value may also be the numbers themselves (a list, nested for more
axes). The JSONL manifest builder (`xmodal_jax.data.build`) and the standard
benchmark adapters (`xmodal_jax.data.builders.benchmarks`) both produce records; this module
validates and encodes them. Stored features, per modality `m`:
  m        image: the file's encoded bytes (decoded in the pipeline);
           audio: int16 mono samples at the build's sample rate;
           video: the build's `video_frames` frames sampled uniformly, JPEG, shorter side
                  resized to `frame_size`;
           text:  the captions (a sequence of strings);
           features: float32 of the shape the manifest's first such value has.
  has_m    the item has modality m (docs/architecture.md, "Batches");
  first_m  this is the first record of the item's split with this id and this value of m:
           evaluation counts each distinct value once when several records share an id
           (e.g. one image with five spoken captions).
Items are numbered in order of first appearance ("id", int64); "key" holds the given id.
A record may name its class, "label" (a string): the dataset then has a "label" text feature
("" for items without one), which zero-shot classification reads.
A bad record (missing, unreadable or undecodable file, empty caption, unknown key, wrong
type, any other error while encoding it) is skipped and reported, or stops the build when
`strict`. Ids are all integers or all strings.
"""

import dataclasses
import io
import json
import os
import re
import sys
import types

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from xmodal_jax.data import media, random_access, webdataset
from xmodal_jax.data.files import is_remote

KINDS = ("image", "audio", "video", "text", "features")
FILE_FORMATS = ("tfrecord", "array_record")
REPORT_FILE = "bad_records.jsonl"
SIDECAR_FILE = "xmodal_dataset.json"


@dataclasses.dataclass(frozen=True)
class BuildOptions:
  """How media are stored; recorded in the dataset folder's xmodal_dataset.json."""
  sample_rate: int = 16_000  # audio is resampled to this at build time
  video_frames: int = 8  # frames kept per video (the pipeline samples from these)
  frame_size: int = 256  # stored video frames' shorter side
  jpeg_quality: int = 90
  strict: bool = False  # a bad record stops the build instead of being skipped


class BadRecord(ValueError):
  """One record that cannot be stored: which item, which file (or field), and why."""

  def __init__(self, item_id, where, reason):
    super().__init__(f"item {item_id!r}: {where}: {reason}")
    self.item_id, self.where, self.reason = item_id, where, reason

  def as_dict(self):
    return {"id": self.item_id, "file": self.where, "reason": self.reason}


def parse_modalities(spec, flag="--modalities"):
  """'photo:image,caption:text' -> {"photo": "image", "caption": "text"}."""
  modalities = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, kind = part.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
      raise ValueError(f"{flag}: {part!r} is not NAME:KIND")
    if kind not in KINDS:
      raise ValueError(f"{flag}: modality {name!r} has kind {kind!r}; expected one of {KINDS}")
    if name in modalities or name in ("id", "key", "split"):
      raise ValueError(f"{flag}: modality name {name!r} is repeated or reserved")
    modalities[name] = kind
  if not modalities:
    raise ValueError(f"{flag}: no modality given (expected NAME:KIND,...)")
  return modalities


def read_manifest(path):
  """[(line number, record dict)] of a JSONL file; not valid JSONL -> ValueError naming the
  line."""
  if not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):
    raise FileNotFoundError(f"{path}: no such manifest file")
  records = []
  with tf.io.gfile.GFile(path) as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_number}: not valid JSON ({e.msg} at column "
                         f"{e.colno})") from e
      if not isinstance(record, dict):
        raise ValueError(f"{path}:{line_number}: expected a JSON object, got "
                         f"{type(record).__name__}")
      records.append((line_number, record))
  return records


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


def load(value, base_dir, item_id, name, what):
  """(source, where) of one modality's media: a local file's path, which decoders read, or
  the bytes of a tar shard's member; `where` names it in errors."""
  if webdataset.is_member(value):
    where = f"{value['tar']}:{value['member']}"
    try:
      return webdataset.read_member(value), where
    except (ValueError, tf.errors.OpError) as e:
      raise BadRecord(item_id, where, f"cannot read the shard member ({e})") from e
  path = resolve_path(value, base_dir, item_id, name)
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
  del options
  if isinstance(source, str):
    with open(source, "rb") as f:  # a local path (`load` reads other filesystems)
      source = f.read()
  try:
    tf.io.decode_image(source, channels=3, expand_animations=False)
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
    message = re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:\w+\]", "", e.message).strip()
    raise BadRecord(item_id, where, f"cannot decode image ({message})") from e
  return source


def encode_audio(source, where, item_id, options):
  try:
    return media.decode_audio(source, options.sample_rate)
  except ValueError as e:
    raise BadRecord(item_id, where, f"cannot decode audio ({e})") from e


def encode_video(source, where, item_id, options):
  try:
    frames = media.decode_video(source, options.video_frames)
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
  if not captions:
    raise BadRecord(item_id, name, "empty caption list")
  return captions


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

  def __call__(self, where, record, number, home_split, split):
    """`number`: the item's int id; `home_split`: the split where its id first appears."""
    try:
      self._check(where, record, home_split, split)
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
      data, _ = load(value, self.base_dir, record["id"], "label", "label")
      value = webdataset.member_text(value, data)
    if value is None:
      return ""
    if not isinstance(value, str) or not value.strip():
      raise BadRecord(record["id"], "label", f"expected a class name (non-empty string), got "
                      f"{type(value).__name__} {value!r}"[:200])
    return value.strip()

  def _check(self, where, record, home_split, split):
    item_id = record.get("id")
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool) or item_id == "":
      raise BadRecord(item_id, where, "'id' must be a non-empty string or an integer")
    allowed = {"id", "split"} | set(self.modalities) | ({"label"} if self.labels else set())
    unknown = sorted(set(record) - allowed)
    if unknown:
      raise BadRecord(item_id, where, f"unknown modality key(s) {unknown}; this dataset has "
                      f"{sorted(self.modalities)}")
    if home_split != split:
      raise BadRecord(item_id, where, f"id also appears in split {home_split!r}")
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
          data, where = load(value, self.base_dir, item_id, name, kind)
          value = webdataset.member_text(value, data)
        out[name] = encode_text(value, item_id, name)
        continue
      if kind == "features" and isinstance(value, list):
        out[name] = encode_features(value, name, item_id, self.feature_shapes[name])
        continue
      source, where = load(value, self.base_dir, item_id, name, kind)
      if kind == "features":
        out[name] = encode_features(source, where, item_id, self.feature_shapes[name])
      else:
        encode = {"image": encode_image, "audio": encode_audio, "video": encode_video}[kind]
        out[name] = encode(source, where, item_id, self.options)
    return out


class RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Builds a TFDS dataset from records. Subclasses set MODALITIES ({name: kind}) and
  implement `split_records(dl_manager)` -> {split: [(where, record)]}, where `where` names
  the record's source (a manifest line) and relative paths are resolved against
  `base_dir(dl_manager)`. With `beam=True` the records are encoded by an Apache Beam
  pipeline (the runner and its options come with download_and_prepare's DownloadConfig),
  giving the same examples and the same bad-record report (`xmodal_jax.data.beam_build`)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MODALITIES = {}
  FEATURE_SHAPES = {}  # {name: shape} for features modalities
  LABELS = False  # whether items carry a class name ("label": a Text feature)

  def __init__(self, *, options=BuildOptions(), beam=False, **kwargs):
    self.options = options
    self.beam = beam
    self.bad_records = []
    self._beam_temp_dir = None
    super().__init__(**kwargs)

  def split_records(self, dl_manager):
    raise NotImplementedError

  def base_dir(self, dl_manager):
    return dl_manager.manual_dir

  def _info(self):
    features = {"id": np.int64, "key": tfds.features.Text()}
    if self.LABELS:
      features["label"] = tfds.features.Text()
    for name, kind in self.MODALITIES.items():
      features[name] = feature_spec(kind, self.FEATURE_SHAPES.get(name))
      features[f"has_{name}"] = np.bool_
      features[f"first_{name}"] = np.bool_
    return self.dataset_info_from_configs(
        description=(self.__doc__ or "").strip(),
        features=tfds.features.FeaturesDict(features), supervised_keys=None)

  def _split_generators(self, dl_manager):
    splits = self.split_records(dl_manager)
    check_id_types(splits)
    numbers, split_of = {}, {}  # given id -> int id, split
    for split, records in splits.items():
      for _, record in records:
        key = str(record.get("id"))
        numbers.setdefault(key, len(numbers))
        split_of.setdefault(key, split)
    encoder = Encoder(dict(self.MODALITIES), dict(self.FEATURE_SHAPES), self.options,
                      str(self.base_dir(dl_manager)), self.LABELS)
    plans = {split: [(str(where), record, numbers[str(record.get("id"))],
                      split_of[str(record.get("id"))]) for where, record in records]
             for split, records in splits.items()}
    if self.beam:
      from xmodal_jax.data import beam_build  # pylint: disable=g-import-not-at-top
      self._beam_temp_dir = os.path.join(os.fspath(self.data_dir_root),
                                         f".{self.name}-beam-{os.getpid()}")
      return {split: beam_build.examples(encoder, split, plan, self._beam_temp_dir)
              for split, plan in plans.items()}
    return {split: self._examples(encoder, split, plan) for split, plan in plans.items()}

  def _generate_examples(self, *args, **kwargs):  # Generators come from _split_generators.
    raise NotImplementedError

  def _examples(self, encoder, split, plan):
    seen = set()  # markers already stored
    for where, record, number, home_split in plan:
      try:
        example, markers = encoder(where, record, number, home_split, split)
      except BadRecord as e:
        if self.options.strict:
          raise
        self.bad_records.append(bad_record_entry(e, where, split))
        continue
      for name in self.MODALITIES:
        example[f"first_{name}"] = name in markers and markers[name] not in seen
      seen.update(markers.values())
      yield where, example

  def download_and_prepare(self, *args, **kwargs):
    """Builds (if not built yet), then writes the bad-record report and the sidecar."""
    if self.is_prepared():
      return
    try:
      super().download_and_prepare(*args, **kwargs)
    finally:
      if self._beam_temp_dir and not self.is_prepared():  # failed: nothing to gather
        tf.io.gfile.rmtree(self._beam_temp_dir)
    if self._beam_temp_dir:
      from xmodal_jax.data import beam_build  # pylint: disable=g-import-not-at-top
      self.bad_records = beam_build.collect_bad_records(self._beam_temp_dir)
    for split in self.info.splits:
      random_access.write_copy(self, split)
    report = os.path.join(self.data_dir, REPORT_FILE)
    with open(report, "w", encoding="utf-8") as f:
      for bad in self.bad_records:
        f.write(json.dumps(bad) + "\n")
    with open(os.path.join(self.data_dir, SIDECAR_FILE), "w", encoding="utf-8") as f:
      json.dump({"modalities": self.MODALITIES, "options": dataclasses.asdict(self.options),
                 "bad_records": len(self.bad_records)}, f, indent=1)
    total = sum(s.num_examples for s in self.info.splits.values())
    print(f"{self.name}: {total} examples written to {self.data_dir}; "
          f"{len(self.bad_records)} bad records skipped"
          + (f" (listed in {report})" if self.bad_records else ""), file=sys.stderr)
    for bad in self.bad_records[:20]:
      print(f"  skipped item {bad['id']!r} ({bad['source']}): {bad['file']}: {bad['reason']}",
            file=sys.stderr)
    if len(self.bad_records) > 20:
      print(f"  ... and {len(self.bad_records) - 20} more", file=sys.stderr)


def bad_record_entry(error, where, split):
  """A bad-record report line."""
  return error.as_dict() | {"source": str(where), "split": split}


def read_sidecar(data_dir):
  """The dataset's xmodal_dataset.json ({} for datasets not built from records)."""
  path = os.path.join(data_dir, SIDECAR_FILE)
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def expand_shards(manifest, line_number, line, modalities, base_dir):
  """A manifest line naming webdataset tar shards -> [(where, record)] of their samples."""
  where = f"{manifest}:{line_number}"
  unknown = sorted(set(line) - {"split", "tar", "label"} - set(modalities))
  if unknown:
    raise ValueError(f"{where}: a shard line takes \"split\", \"tar\", \"label\" and "
                     f"modality names ({sorted(modalities)}); got {unknown}")
  fields = {}
  for name in list(modalities) + ["label"]:
    if name in line:
      if not isinstance(line[name], str) or not line[name]:
        raise ValueError(f"{where}: {name!r} of a shard line is the extension of that "
                         f"modality's files in each sample (e.g. \"flac\"), got {line[name]!r}")
      fields[name] = line[name].lstrip(".")
  if not set(fields) - {"label"}:
    raise ValueError(f"{where}: the shard line names no modality's extension")
  patterns = line["tar"] if isinstance(line["tar"], list) else [line["tar"]]
  out = []
  for pattern in patterns:
    if not isinstance(pattern, str) or not pattern:
      raise ValueError(f"{where}: \"tar\" is a shard path or a list of them, got {pattern!r}")
    for path in webdataset.expand_braces(pattern):
      path = absolute(path, base_dir)
      out.extend(webdataset.shard_records(path, line["split"], fields, where))
  return out


def manifest_builder(name, manifest, modalities, *, options=BuildOptions(), data_dir=None,
                     beam=False, file_format="tfrecord"):
  """A builder for the JSONL `manifest` (paths relative to its folder) as dataset `name`.
  A line is one item, or (with "tar") every sample of some webdataset shards
  (`webdataset`); `file_format` "tfrecord" or "array_record" (random access, no copy)."""
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"--name={name!r}: expected lower_snake_case (letters, digits, _)")
  lines = read_manifest(manifest)
  base_dir = folder_of(manifest)
  records = []
  for line_number, record in lines:
    if not isinstance(record.get("split"), str) or not record.get("split"):
      raise ValueError(f"{manifest}:{line_number}: missing \"split\" (a string such as "
                       f"\"train\")")
    if "tar" in record:
      records.extend(expand_shards(manifest, line_number, record, modalities, base_dir))
    else:
      records.append((f"{manifest}:{line_number}", record))
  shapes = {m: features_shape(records, m, base_dir)
            for m, kind in modalities.items() if kind == "features"}
  splits = {}
  for where, record in records:
    splits.setdefault(record["split"], []).append((where, record))

  def body(namespace):
    namespace.update(
        __module__=__name__, name=name, MODALITIES=dict(modalities), FEATURE_SHAPES=shapes,
        LABELS=any("label" in record for _, record in records),
        __doc__=f"Built by xmodal_jax.data.build from {absolute(manifest, os.getcwd())}.",
        split_records=lambda self, dl_manager: splits,
        base_dir=lambda self, dl_manager: base_dir)
  cls = types.new_class(f"Manifest_{name}", (RecordBuilder,), {"skip_registration": True},
                        body)
  if file_format not in FILE_FORMATS:
    raise ValueError(f"--file_format={file_format!r}: expected one of {FILE_FORMATS}")
  return cls(options=options, data_dir=data_dir, beam=beam, file_format=file_format)
