"""Embedding export: every item of a split, every modality it has, in shards that NumPy and
pyarrow read without this package (docs/guide.md, "Exporting embeddings").

  {out}/meta.json                             what was exported, and its shards in row order
  {out}/embeddings/{modality}/{shard}.npy     float32 or float16 [n, D], L2-normalized
                                              (zero rows where an item lacks the modality)
  {out}/items/{shard}.parquet                 key (string), id (int64), has_{modality} (bool)
  {out}/faiss/{modality}.index                optional: a FAISS index of the rows that have
                                              the modality, ids = export rows (eval/index.py)

Shard `{process:04d}-{number:05d}` holds a run of consecutive eval batches of one process:
each process embeds and writes only the rows it read (no gather across processes), and the
shards in name order are the split in dataset order. A shard is complete once its parquet
file exists (written last, atomically), so an interrupted export resumes after the shards
every process finished; shards written with another checkpoint, config, process count or
shard size are refused, not mixed.
"""

import dataclasses
import io
import json
import os

import jax
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from jax.experimental import multihost_utils

from xmodal_jax import files
from xmodal_jax.parallel import distributed

FORMAT = 2
DTYPES = ("float32", "float16")


def shard_name(process, number):
  return f"{process:04d}-{number:05d}"


def check_signature(out, signature):
  """Refuses `out` if it holds shards of another export; records `signature` otherwise."""
  path = os.path.join(out, "signature.json")
  if files.exists(path):
    previous = json.loads(files.read_text(path))
    if previous != signature:
      changed = sorted(k for k in set(previous) | set(signature)
                       if previous.get(k) != signature.get(k))
      raise ValueError(f"{out}: holds shards of another export (it differs in {changed}); "
                       f"use a new --out or delete it")
  elif jax.process_index() == 0:
    files.makedirs(out)
    files.write_atomically(path, json.dumps(signature, sort_keys=True))


def _complete_shards(out, process):
  """How many of `process`'s shards, from number 0 on, are complete."""
  done = set(files.listdir(os.path.join(out, "items"))) if files.exists(
      os.path.join(out, "items")) else set()
  number = 0
  while f"{shard_name(process, number)}.parquet" in done:
    number += 1
  return number


def write_shard(out, name, rows, dtype, meta):
  """Writes one shard's embedding files, then its parquet file (the completion mark)."""
  for m, emb in rows["emb"].items():
    emb = np.where(rows["_mask"][m][:, None], emb, 0.0).astype(dtype)
    buffer = io.BytesIO()
    np.save(buffer, emb)
    folder = os.path.join(out, "embeddings", m)
    files.makedirs(folder)
    files.write_atomically(os.path.join(folder, f"{name}.npy"), buffer.getvalue())
  table = pa.table({"key": pa.array([k.decode("utf-8") for k in rows["_key"]], pa.string()),
                    "id": pa.array(rows["_id"], pa.int64()),
                    **{f"has_{m}": pa.array(rows["_mask"][m], pa.bool_())
                       for m in sorted(rows["emb"])}})
  table = table.replace_schema_metadata({"xmodal_jax": json.dumps(meta, sort_keys=True)})
  buffer = io.BytesIO()
  pq.write_table(table, buffer)
  files.makedirs(os.path.join(out, "items"))
  files.write_atomically(os.path.join(out, "items", f"{name}.parquet"), buffer.getvalue())


def write_shards(out, embedder, params, split, *, signature, shard_rows, dtype="float32",
                 log=print):
  """This process's shards of `split` (Embedder.local_batches), each of the eval batches
  that make up about `shard_rows` rows; resumes after the shards every process finished.
  Returns the number of batches embedded here."""
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r}: expected one of {DTYPES}")
  host_batch = embedder.config.eval_batch_size // jax.process_count()
  per_shard = max(1, shard_rows // host_batch)
  check_signature(out, signature)
  multihost_utils.sync_global_devices("export signature")
  process = jax.process_index()
  done = int(np.min(multihost_utils.process_allgather(
      np.int32(_complete_shards(out, process)))))  # a count per process, not embeddings
  total = -(-embedder.source.eval_batch_count(split) // per_shard)
  if done:
    log(f"export: resuming after {done} of {total} shards")
  number, pending, embedded = done, [], 0
  shard_meta = {k: signature[k] for k in ("split", "step", "workdir", "dataset")}

  def flush():
    rows = jax.tree.map(lambda *xs: np.concatenate(xs), *pending)
    write_shard(out, shard_name(process, number), rows, dtype, shard_meta)
    if process == 0:
      log(f"export: shard {number + 1}/{total}")

  # A shard that fails to write on one process (a full disk) stops every process.
  with distributed.InStep(embedder.local_batches(params, split,
                                                 start_batch=done * per_shard)) as batches:
    for batch in batches:
      pending.append(batch)
      embedded += 1
      if len(pending) == per_shard:
        flush()
        number, pending = number + 1, []
    if pending:
      flush()
  return embedded


def finish(out, signature, dtype):
  """Writes meta.json (process 0, after every process wrote its shards): the shards in row
  order with their row counts, read from the parquet files' footers."""
  items = os.path.join(out, "items")
  names = sorted(n[:-len(".parquet")] for n in files.listdir(items) if n.endswith(".parquet"))
  shards, start, counts = [], 0, {}
  for name in names:
    table = read_parquet(os.path.join(items, f"{name}.parquet"))
    shards.append({"name": name, "start": start, "rows": table.num_rows})
    start += table.num_rows
    for column in table.column_names:
      if column.startswith("has_"):
        counts[column[4:]] = counts.get(column[4:], 0) + int(
            np.count_nonzero(table[column].to_numpy(zero_copy_only=False)))
  dims = {}
  for m in counts:
    first = files.load_arrays(os.path.join(out, "embeddings", m, f"{names[0]}.npy"))
    dims[m] = int(first.shape[1])
  meta = dict(signature, format=FORMAT, dtype=dtype, count=start, dims=dims,
              items_with_modality=counts, shards=shards)
  files.write_atomically(os.path.join(out, "meta.json"), json.dumps(meta, indent=1))
  return meta


def read_parquet(path, columns=None):
  """A parquet file as a pyarrow Table (`columns`: only those; a local file is then read
  only in their column chunks)."""
  source = path if not files.is_remote(path) else io.BytesIO(files.read_bytes(path))
  return pq.read_table(source, columns=columns)


@dataclasses.dataclass
class Export:
  """An export folder, read lazily: embeddings shard by shard (memory-mapped where the
  folder is local); the item table's columns (key, id, has_{modality}) each when first
  asked for, and keys only of the rows asked for."""
  folder: str
  meta: dict
  _columns: dict = dataclasses.field(default_factory=dict)

  @property
  def modalities(self):
    return sorted(self.meta["dims"])

  @property
  def count(self):
    return self.meta["count"]

  def _items_path(self, shard):
    return os.path.join(self.folder, "items", f"{shard['name']}.parquet")

  def column(self, name):
    """Column `name` of the item table over every row, as NumPy (read once)."""
    if name not in self._columns:
      column = pa.concat_tables([read_parquet(self._items_path(s), [name])
                                 for s in self.meta["shards"]])[name]
      text = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
      self._columns[name] = (np.asarray(column.to_pylist(), object) if text
                             else column.to_numpy())
    return self._columns[name]

  def keys(self):
    """Every row's item key: a Python string per row (all in memory; see keys_at)."""
    return self.column("key")

  def keys_at(self, rows):
    """The item keys of export rows `rows`, read from just the shards that hold them."""
    rows = np.asarray(rows, np.int64)
    starts = np.asarray([s["start"] for s in self.meta["shards"]])
    shard_of = np.searchsorted(starts, rows, side="right") - 1
    keys = np.empty(len(rows), object)
    for number in np.unique(shard_of):
      shard = self.meta["shards"][number]
      here = shard_of == number
      column = read_parquet(self._items_path(shard), ["key"])["key"]
      keys[here] = column.take(pa.array(rows[here] - shard["start"])).to_pylist()
    return keys

  def row_of_key(self, key):
    """The first export row whose item key is `key`, or None: the key column is read shard
    by shard (one shard's keys in memory at a time)."""
    for shard in self.meta["shards"]:
      found = pc.index(read_parquet(self._items_path(shard), ["key"])["key"], key).as_py()
      if found >= 0:
        return shard["start"] + found
    return None

  def ids(self):
    return self.column("id")

  def mask(self, modality):
    return self.column(f"has_{modality}")

  def shard_embeddings(self, modality):
    """Yields (first export row, float32 or float16 [n, D]) per shard, in row order."""
    self._check(modality)
    for shard in self.meta["shards"]:
      path = os.path.join(self.folder, "embeddings", modality, f"{shard['name']}.npy")
      yield shard["start"], (np.load(path, mmap_mode="r") if os.path.exists(path)
                             else files.load_arrays(path))

  def rows_with(self, modality):
    """Yields (export rows int64[n], float32 [n, D]) per shard: the rows that have
    `modality`."""
    mask = self.mask(modality)
    for start, emb in self.shard_embeddings(modality):
      keep = np.flatnonzero(mask[start:start + len(emb)])
      if len(keep):
        yield start + keep, np.ascontiguousarray(np.asarray(emb[keep], np.float32))

  def embeddings(self, modality):
    """float32 [N, D] of every row: all of it in memory (tests, small exports)."""
    return np.concatenate([np.asarray(e, np.float32)
                           for _, e in self.shard_embeddings(modality)])

  def _check(self, modality):
    if modality not in self.meta["dims"]:
      raise ValueError(f"{self.folder}: the export has {self.modalities}, not {modality!r}")


def read_export(out):
  """The Export in folder `out` (launch/export.py wrote it)."""
  meta_path = os.path.join(out, "meta.json")
  if not files.exists(meta_path):
    raise FileNotFoundError(f"{out}: no meta.json, so not a finished export")
  meta = json.loads(files.read_text(meta_path))
  if meta.get("format") != FORMAT:
    raise ValueError(f"{out}: export format {meta.get('format', 1)}, this version reads "
                     f"format {FORMAT}; export again")
  return Export(out, meta)
