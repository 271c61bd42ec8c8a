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

import collections
import dataclasses
import json
import os
import re
import sys
import types

import numpy as np
import tensorflow_datasets as tfds

from xmodal_jax import files
from xmodal_jax.data import encoding, manifest as manifest_lib, random_access
from xmodal_jax.data.encoding import BadRecord, BuildOptions

FILE_FORMATS = ("tfrecord", "array_record")
REPORT_FILE = "bad_records.jsonl"
SIDECAR_FILE = "xmodal_dataset.json"


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
    self.plan_sizes = {}  # split -> its number of records
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
      features[name] = encoding.feature_spec(kind, self.FEATURE_SHAPES.get(name))
      features[f"has_{name}"] = np.bool_
      features[f"first_{name}"] = np.bool_
    return self.dataset_info_from_configs(
        description=(self.__doc__ or "").strip(),
        features=tfds.features.FeaturesDict(features), supervised_keys=None)

  def records_in_order(self, splits):
    """[(split, where, record)] in the order the source gives them: an id belongs to the
    split of its first record. Here split by split; a manifest gives its line order."""
    return [(split, where, record) for split, records in splits.items()
            for where, record in records]

  def _split_generators(self, dl_manager):
    splits = self.split_records(dl_manager)
    encoding.check_id_types(splits)
    numbers, home = {}, {}  # given id -> int id, (split, where) of its first record
    for split, where, record in self.records_in_order(splits):
      key = str(record.get("id"))
      numbers.setdefault(key, len(numbers))
      home.setdefault(key, (split, str(where)))
    encoder = encoding.Encoder(dict(self.MODALITIES), dict(self.FEATURE_SHAPES), self.options,
                      str(self.base_dir(dl_manager)), self.LABELS)
    plans = {split: [(str(where), record, numbers[str(record.get("id"))],
                      home[str(record.get("id"))]) for where, record in records]
             for split, records in splits.items()}
    self.plan_sizes = {split: len(plan) for split, plan in plans.items()}
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
    seen, kept = set(), 0  # markers already stored, examples yielded
    for where, record, number, home in plan:
      try:
        example, markers = encoder(where, record, number, home, split)
      except BadRecord as e:
        if self.options.strict:
          raise
        self.bad_records.append(encoding.bad_record_entry(e, where, split))
        continue
      for name in self.MODALITIES:
        example[f"first_{name}"] = name in markers and markers[name] not in seen
      seen.update(markers.values())
      kept += 1
      yield where, example
    if plan and not kept:
      raise ValueError(self.all_bad_message(split, len(plan)))

  def all_bad_message(self, split, count):
    return (f"split {split!r}: all {count} of its records are bad; the report lists why: "
            f"{self.failed_report_path()}")

  def collect_beam_bad_records(self):
    """The Beam build's bad records (also of a failed pipeline); removes its temporary
    folder."""
    from xmodal_jax.data import beam_build  # pylint: disable=g-import-not-at-top
    return beam_build.collect_bad_records(self._beam_temp_dir)

  def failed_report_path(self):
    """Where the bad-record report goes when the build fails (its version folder is not
    kept)."""
    return os.path.join(os.fspath(self.data_dir_root), self.name, REPORT_FILE)

  def write_report(self, path):
    files.makedirs(os.path.dirname(path))
    files.write_atomically(path, "".join(json.dumps(bad) + "\n" for bad in self.bad_records))

  def download_and_prepare(self, *args, **kwargs):
    """Builds (if not built yet), then writes the bad-record report and the sidecar."""
    if self.is_prepared():
      return
    try:
      super().download_and_prepare(*args, **kwargs)
    except Exception as e:
      if self._beam_temp_dir and files.exists(self._beam_temp_dir):
        self.bad_records = self.collect_beam_bad_records()
      if self.bad_records:
        self.write_report(self.failed_report_path())
      bad = collections.Counter(b["split"] for b in self.bad_records)
      for split, count in self.plan_sizes.items():  # Beam only fails at the write
        if self.beam and count and bad[split] == count:
          raise ValueError(self.all_bad_message(split, count)) from e
      raise
    if self._beam_temp_dir:
      self.bad_records = self.collect_beam_bad_records()
    for split in self.info.splits:
      random_access.write_copy(self, split)
    report = os.path.join(self.data_dir, REPORT_FILE)
    self.write_report(report)
    files.write_atomically(os.path.join(self.data_dir, SIDECAR_FILE), json.dumps(
        {"modalities": self.MODALITIES, "options": dataclasses.asdict(self.options),
         "bad_records": len(self.bad_records)}, indent=1))
    total = sum(s.num_examples for s in self.info.splits.values())
    print(f"{self.name}: {total} examples written to {self.data_dir}; "
          f"{len(self.bad_records)} bad records skipped"
          + (f" (listed in {report})" if self.bad_records else ""), file=sys.stderr)
    for bad in self.bad_records[:20]:
      print(f"  skipped item {bad['id']!r} ({bad['source']}): {bad['file']}: {bad['reason']}",
            file=sys.stderr)
    if len(self.bad_records) > 20:
      print(f"  ... and {len(self.bad_records) - 20} more", file=sys.stderr)


def read_sidecar(data_dir):
  """The dataset's xmodal_dataset.json ({} for datasets not built from records)."""
  path = os.path.join(data_dir, SIDECAR_FILE)
  return json.loads(files.read_text(path)) if files.exists(path) else {}


SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")


def manifest_builder(name, manifest, modalities, *, options=BuildOptions(), data_dir=None,
                     beam=False, file_format="tfrecord"):
  """A builder for the JSONL `manifest` (paths relative to its folder) as dataset `name`.
  A line is one item, or (with "tar") every sample of some webdataset shards
  (`webdataset`); `file_format` "tfrecord" or "array_record" (random access, no copy)."""
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"--name={name!r}: expected lower_snake_case (letters, digits, _)")
  if name in tfds.list_builders(with_community_datasets=False):
    raise ValueError(f"--name={name!r} is a registered TFDS dataset (ours or TFDS's): it "
                     "would be read with that dataset's code, not from your manifest; "
                     "choose another name")
  lines = manifest_lib.read_manifest(manifest)
  base_dir = encoding.folder_of(manifest)
  records = []
  for line_number, record in lines:
    if not isinstance(record.get("split"), str) or not record.get("split"):
      raise ValueError(f"{manifest}:{line_number}: missing \"split\" (a string such as "
                       f"\"train\")")
    if not SPLIT_NAME.fullmatch(record["split"]):
      raise ValueError(f"{manifest}:{line_number}: \"split\": {record['split']!r}: expected "
                       "ASCII letters, digits and _ (the split names the dataset's files)")
    if "tar" in record:
      records.extend(manifest_lib.expand_shards(manifest, line_number, record, modalities,
                                                  base_dir, options.confine))
    else:
      records.append((f"{manifest}:{line_number}", record))
  shapes = {m: encoding.features_shape(records, m, base_dir)
            for m, kind in modalities.items() if kind == "features"}
  splits = {}
  for where, record in records:
    splits.setdefault(record["split"], []).append((where, record))

  def body(namespace):
    namespace.update(
        __module__=__name__, name=name, MODALITIES=dict(modalities), FEATURE_SHAPES=shapes,
        LABELS=any("label" in record for _, record in records),
        __doc__=f"Built by xmodal_jax.data.build from {encoding.absolute(manifest, os.getcwd())}.",
        split_records=lambda self, dl_manager: splits,
        records_in_order=lambda self, splits: [(r["split"], w, r) for w, r in records],
        base_dir=lambda self, dl_manager: base_dir)
  cls = types.new_class(f"Manifest_{name}", (RecordBuilder,), {"skip_registration": True},
                        body)
  if file_format not in FILE_FORMATS:
    raise ValueError(f"--file_format={file_format!r}: expected one of {FILE_FORMATS}")
  return cls(options=options, data_dir=data_dir, beam=beam, file_format=file_format)
