"""Reading a manifest: a JSONL of records (or lines naming webdataset shards) and the
`--modalities` flag that maps its keys to kinds."""

import json
import re

import tensorflow as tf

from xmodal_jax.data import webdataset
from xmodal_jax.data.encoding import KINDS, absolute, leaves_folder


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
  with tf.io.gfile.GFile(path, "rb") as f:
    for line_number, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{line_number}: not UTF-8 (byte 0x{raw[e.start]:02x} at "
                         f"byte {e.start + 1} of the line)") from e
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


def expand_shards(manifest, line_number, line, modalities, base_dir, confine=True):
  """A manifest line naming webdataset tar shards -> [(where, record)] of their samples.
  `confine`: refuse relative shard paths that leave `base_dir` (as media paths are)."""
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
    for name in webdataset.expand_braces(pattern):
      path = absolute(name, base_dir)
      if confine and leaves_folder(name, path, base_dir):
        raise ValueError(f"{where}: shard {name!r} leads outside the manifest's folder "
                         f"(through '..' or a symlink); build with --noconfine to allow it")
      out.extend(webdataset.shard_records(path, line["split"], fields, where))
  return out
