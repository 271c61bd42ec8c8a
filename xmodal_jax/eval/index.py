"""FAISS indexes over an export (the `faiss` extra): one per modality, over the rows that
have it, searched by inner product (embeddings are L2-normalized, so by cosine). FAISS ids
are export rows. Exact search (eval/search.py) stays the reference; "flat" equals it, and
"ivf_pq" trades recall for memory and speed (benchmarks/README.md).
"""

import math
import os

import numpy as np

from xmodal_jax import files

KINDS = ("flat", "ivf_pq")
TRAIN_ROWS = 200_000  # at most this many rows train the IVF centroids and PQ codebooks


def _faiss():
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("FAISS indexes need the faiss extra: pip install -e '.[faiss]'") from e
  return faiss


def path(export, modality):
  return os.path.join(export.folder, "faiss", f"{modality}.index")


def ivf_pq_shape(count, dim):
  """(lists, sub-quantizers, bits per code) for `count` rows of `dim`: about 4 sqrt(count)
  lists with 39 or more training rows each, dim/4 sub-quantizers of 4 dimensions (fewer
  where dim/4 does not divide dim), 8-bit codes where the rows can train them."""
  lists = max(1, min(int(4 * math.sqrt(count)), count // 39))
  sub = max(d for d in range(1, dim // 4 + 1) if dim % d == 0) if dim >= 4 else dim
  bits = int(np.clip(math.floor(math.log2(max(count, 2) / 39)), 1, 8))
  return lists, sub, bits


def _training_rows(export, modality, count):
  """An evenly strided sample of at most TRAIN_ROWS of the modality's rows."""
  stride = -(-count // TRAIN_ROWS)
  return np.concatenate([emb[::stride] for _, emb in export.rows_with(modality)])[:TRAIN_ROWS]


def build(export, modality, kind, log=print):
  """Builds, writes and returns the `kind` index of `modality`, adding shard by shard."""
  faiss = _faiss()
  if kind not in KINDS:
    raise ValueError(f"--index={kind!r}: expected one of {KINDS}")
  dim, count = export.meta["dims"][modality], export.meta["items_with_modality"][modality]
  if kind == "flat":
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
  else:
    lists, sub, bits = ivf_pq_shape(count, dim)
    index = faiss.index_factory(dim, f"IVF{lists},PQ{sub}x{bits}", faiss.METRIC_INNER_PRODUCT)
    index.train(_training_rows(export, modality, count))
    index.nprobe = min(lists, 16)
  for rows, emb in export.rows_with(modality):
    index.add_with_ids(emb, rows.astype(np.int64))
  files.makedirs(os.path.dirname(path(export, modality)))
  files.write_atomically(path(export, modality),
                         faiss.serialize_index(index).tobytes())
  log(f"index: {kind} over {index.ntotal} {modality} rows -> {path(export, modality)}")
  return index


def load(export, modality):
  """The modality's index, or None where the export has none."""
  where = path(export, modality)
  if not files.exists(where):
    return None
  faiss = _faiss()
  return faiss.deserialize_index(np.frombuffer(files.read_bytes(where), np.uint8))


def search(index, queries, k, nprobe=None):
  """(scores float32[Q, k], export rows int64[Q, k]) of the k best rows per query (row -1
  where fewer than k are found); `nprobe`: IVF lists visited (default: as built, 16)."""
  if nprobe is not None:
    _faiss().extract_index_ivf(index).nprobe = nprobe
  return index.search(np.ascontiguousarray(np.asarray(queries, np.float32)), k)

