"""webdataset tar shards as manifest records.

A shard is a plain tar file whose members are grouped into samples by key: a member's key is
its path up to the first dot of its file name, the rest is its extension
("train/000123.flac" -> key "train/000123", extension "flac"). A manifest line
{"split": "train", "tar": "shards/train-{000..099}.tar", "audio": "flac", "text": "txt"}
makes one record per sample of every shard it names (brace ranges expand as in webdataset),
with the key as id and, for each modality, a reference to the member with that extension
(the modality is missing where the sample has none). Members are read by byte offset, so a
builder's workers open the shard and read only the bytes of their own sample.
"""

import io
import itertools
import json
import re
import tarfile

import tensorflow as tf

MEMBER_KEYS = ("tar", "member", "offset", "size")


def expand_braces(pattern):
  """"a-{00..02}.tar" -> ["a-00.tar", "a-01.tar", "a-02.tar"]; every {lo..hi} range expands
  (zero padding kept when lo is written with it), combinations in order."""
  parts = re.split(r"\{(\d+)\.\.(\d+)\}", pattern)
  choices = []
  for i in range(1, len(parts), 3):
    lo, hi = parts[i], parts[i + 1]
    if int(hi) < int(lo):
      raise ValueError(f"{pattern!r}: range {{{lo}..{hi}}} is empty")
    width = len(lo) if lo.startswith("0") else 0
    choices.append([str(n).zfill(width) for n in range(int(lo), int(hi) + 1)])
  literals = parts[::3]
  if any("{" in p or "}" in p for p in literals):
    raise ValueError(f"{pattern!r}: braces must hold a range of integers, {{LO..HI}}")
  names = []
  for combo in itertools.product(*choices):
    names.append("".join(itertools.chain.from_iterable(
        itertools.zip_longest(literals, combo, fillvalue=""))))
  return names


def split_name(path):
  """A member's (key, extension): the path up to / after the first dot of its file name."""
  folder, _, name = path.rpartition("/")
  stem, _, extension = name.partition(".")
  return (f"{folder}/{stem}" if folder else stem), extension


def is_member(value):
  return isinstance(value, dict) and set(value) == set(MEMBER_KEYS)


def shard_records(path, split, fields, where):
  """[(where:key, record)] for the samples of the tar shard at `path`, in shard order.
  `fields`: {modality: extension}. A sample with none of the extensions is still a record
  (with no modality), so that the build reports it rather than dropping it silently."""
  samples = {}
  try:
    with tf.io.gfile.GFile(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
      for info in tar:
        if not info.isfile():
          continue
        key, extension = split_name(info.name)
        sample = samples.setdefault(key, {})
        if extension in sample:
          raise ValueError(f"{path}: sample {key!r} has two members with extension "
                           f"{extension!r}")
        sample[extension] = dict(tar=path, member=info.name, offset=info.offset_data,
                                 size=info.size)
  except (tarfile.TarError, tf.errors.OpError) as e:
    raise ValueError(f"{where}: cannot read tar shard {path} ({e})") from e
  out = []
  for key, members in samples.items():
    record = {"id": key, "split": split}
    for modality, extension in fields.items():
      if extension in members:
        record[modality] = members[extension]
    out.append((f"{where}: {path}:{key}", record))
  return out


def read_member(member):
  """The bytes of one shard member (a reference from `shard_records`)."""
  with tf.io.gfile.GFile(member["tar"], "rb") as f:
    f.seek(member["offset"])
    data = f.read(member["size"])
  if len(data) != member["size"]:
    raise ValueError(f"{member['tar']}: member {member['member']} is truncated")
  return data


def member_text(member, data):
  """Captions of a text member: .txt holds one caption, .json a string or a list of them."""
  text = data.decode("utf-8")
  if member["member"].endswith(".json"):
    return json.loads(text)
  return text.strip()


def write_shard(path, samples):
  """Writes `samples` ([(key, {extension: bytes})]) as a tar shard: for tests and for
  converting loose files."""
  buffer = io.BytesIO()  # tarfile needs tell(), which some filesystems' writers lack
  with tarfile.open(fileobj=buffer, mode="w:") as tar:
    for key, files in samples:
      for extension, data in files.items():
        info = tarfile.TarInfo(f"{key}.{extension}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(buffer.getvalue())
