"""A trained run and one of its exports, answering queries: what the retrieval service
(serve/app.py) does, free of any web framework.

The model is loaded and each query modality's embedding step compiled once. Each gallery
modality is searched through the export's FAISS index where it has one, else exactly over
its rows, which stay on the devices (float32) between queries; `exact` asks for the exact
search where both exist (its rows are loaded then, once).
"""

import collections
import threading
import time
import urllib.parse

import numpy as np

from xmodal_jax.eval import index as index_lib, query as query_lib, retrieval, search
from xmodal_jax.models import towers

OPTIONS = ("gallery", "k", "exact", "rerank")  # request fields that are not queries
QUERY_KINDS = ("text", "audio", "image", "video")
MEDIA_KINDS = ("image", "audio", "video")
SHOWN_KEYS = 10_000  # hits whose items are remembered by key for their media links


class QueryError(ValueError):
  """A request that cannot be answered as asked: the message says why, `status` is the HTTP
  status that goes with it."""

  def __init__(self, message, status=400):
    super().__init__(message)
    self.status = status


class GalleryModality:
  """The rows of an export that have one modality: its FAISS index where the export has
  one, and exact search over its rows, kept on the devices from the first time it is asked
  for (at once where there is no index)."""

  def __init__(self, exported, modality):
    self._exported, self._modality = exported, modality
    self.size = exported.meta["items_with_modality"][modality]
    self.faiss_index = index_lib.load(exported, modality)
    self._exact = None
    self._lock = threading.Lock()
    if self.faiss_index is None:
      self.exact()

  def exact(self):
    """(export rows int64[n], search.Gallery of their embeddings)."""
    with self._lock:
      if self._exact is None:
        parts = list(self._exported.rows_with(self._modality))
        self._exact = (np.concatenate([r for r, _ in parts]),
                       search.Gallery(np.concatenate([e for _, e in parts])))
    return self._exact


def parse_int(name, value, low, high):
  try:
    number = int(value)
  except (TypeError, ValueError):
    raise QueryError(f"{name}={value!r}: expected a whole number") from None
  if not low <= number <= high:
    raise QueryError(f"{name}={number}: expected {low} to {high}")
  return number


def parse_bool(name, value):
  text = str(value).strip().lower()
  if text not in ("1", "0", "true", "false", "yes", "no", "on", "off", ""):
    raise QueryError(f"{name}={value!r}: expected true or false")
  return text in ("1", "true", "yes", "on")


class Searcher:
  """Queries -> hits over `exported` (eval/export.py: Export) with `experiment`'s model
  (xmodal_jax/experiment.py: Experiment, restored at the export's step). At most `max_k`
  hits per search."""

  def __init__(self, experiment, exported, *, max_k=100, log=print):
    self.experiment, self.exported, self.max_k = experiment, exported, max_k
    self.embedder, self.params = experiment.embedder, experiment.state.params
    self.modalities = experiment.config.modalities
    self.split = exported.meta["split"]
    self.ids = exported.ids()
    # Items of recent hits by key: the media links a page follows (others: row_of_key).
    self._shown, self._shown_lock = collections.OrderedDict(), threading.Lock()
    self.galleries = {}
    for modality in exported.modalities:
      start = time.perf_counter()
      self.galleries[modality] = GalleryModality(exported, modality)
      how = "FAISS index" if self.galleries[modality].faiss_index is not None else "exact"
      log(f"gallery {modality}: {self.galleries[modality].size} rows ({how}, "
          f"{time.perf_counter() - start:.1f} s)")

  def info(self):
    """What a client needs to ask: the run, the export, the query and gallery modalities."""
    meta = self.exported.meta
    return {
        "workdir": meta["workdir"], "step": meta["step"], "split": self.split,
        "dataset": meta.get("dataset"), "items": self.exported.count, "max_k": self.max_k,
        "queries": {m: o.kind for m, o in self.modalities.items() if o.kind in QUERY_KINDS},
        "galleries": {m: {"kind": self.modalities[m].kind, "rows": g.size,
                          "faiss": g.faiss_index is not None}
                      for m, g in self.galleries.items()}}

  def compile(self, log=print):
    """Compiles each query modality's embedding step (on an all-padding input)."""
    for name, shapes in self.embedder.source.abstract_batch(1).items():
      if name in self.modalities and self.modalities[name].kind in QUERY_KINDS:
        start = time.perf_counter()
        zeros = {k: np.zeros(s.shape, s.dtype) for k, s in shapes.items()}
        self.embedder.embed_one(self.params, name, zeros)
        log(f"compiled the {name} query step ({time.perf_counter() - start:.1f} s)")

  def check_queries(self, queries):
    """QueryError unless `queries` holds one or more texts or files of query modalities."""
    known = sorted(m for m, o in self.modalities.items() if o.kind in QUERY_KINDS)
    if not queries:
      raise QueryError(f"no query: give a text or a file of one of the modalities {known}")
    for name, value in queries.items():
      kind = self.modalities[name].kind if name in self.modalities else None
      if kind not in QUERY_KINDS:
        raise QueryError(f"unknown query modality {name!r}: expected one of {known}")
      if kind == "text" and not isinstance(value, str):
        raise QueryError(f"{name}: a text modality takes a text, not a file")
      if kind != "text" and isinstance(value, str):
        raise QueryError(f"{name}: a {kind} modality takes an uploaded file, not a text")

  def embed(self, queries, *, tokens=False):
    """{modality: (float32[1, D], tokens or None)} of `queries` ({modality: text or file
    bytes}), read and prepared as evaluation prepares examples."""
    self.check_queries(queries)
    out = {}
    for name, value in queries.items():
      try:
        raw = self.embedder.source.read_value(name, value)
      except ValueError as e:
        raise QueryError(f"{name}: {e}") from e
      out[name] = query_lib.encode_query(self.embedder, self.params, name, raw, tokens)
    return out

  def search(self, queries, gallery, k=10, exact=False, rerank=0):
    """{"query", "gallery", "how", "hits": [{rank, row, key, score, caption, media}]} of the
    k best `gallery` rows for `queries` (several: their fused query, docs/methods.md); with
    `rerank` > 0, the embedding top `rerank` re-scored by the pair's matching head."""
    if gallery not in self.galleries:
      raise QueryError(f"unknown gallery modality {gallery!r}: the export has "
                       f"{sorted(self.galleries)}")
    self.check_queries(queries)
    found = self.galleries[gallery]
    k = parse_int("k", k, 1, min(self.max_k, found.size))
    rerank = parse_int("rerank", rerank, 0, min(self.max_k, found.size))
    pair = None
    if rerank:
      pair = towers.fusion_pair(self.experiment.model, next(iter(queries), None), gallery)
      if len(queries) != 1 or pair is None:
        raise QueryError(f"rerank: the model has no fusion encoder for the query "
                         f"{sorted(queries)} and gallery {gallery!r}")
    embedded = self.embed(queries, tokens=bool(rerank))
    names = sorted(embedded)
    query_emb = (embedded[names[0]][0] if len(names) == 1 else
                 retrieval.fuse({m: e for m, (e, _) in embedded.items()}, names))
    depth = max(k, rerank)
    use_faiss = found.faiss_index is not None and not parse_bool("exact", exact)
    if use_faiss:
      hits = query_lib.top_hits(query_emb, self.exported, gallery, depth, found.faiss_index)
      how = f"FAISS {type(found.faiss_index).__name__}"
    else:
      rows, gallery_rows = found.exact()
      scores, top = gallery_rows.topk(query_emb, depth)
      hits = [(int(rows[i]), int(self.ids[rows[i]]), float(s))
              for s, i in zip(scores[0], top[0])]
      how = "exact"
    if pair:
      hits = query_lib.rerank_hits(self.embedder, self.params, pair, names[0],
                                   embedded[names[0]][1], gallery, hits, self.split,
                                   self.ids, self.exported.mask(gallery))
      how += f", re-ranked by the matching head of {pair}"
    return {"query": names, "gallery": gallery, "how": how, "split": self.split,
            "hits": self.describe(hits[:k], gallery)}

  def describe(self, hits, gallery):
    """[(row, id, score)] -> the JSON of each hit: key, score, caption and media URL."""
    texts = self.embedder.source.item_texts(self.split, [item for _, item, _ in hits])
    is_text = self.modalities[gallery].kind == "text"
    mask = self.exported.mask(gallery) if is_text else None
    out = []
    keys = [str(key) for key in self.exported.keys_at([row for row, _, _ in hits])]
    with self._shown_lock:
      for key, (_, item, _) in zip(keys, hits):
        self._shown[key] = item
        self._shown.move_to_end(key)
      while len(self._shown) > SHOWN_KEYS:
        self._shown.popitem(last=False)
    for rank, ((row, item, score), key) in enumerate(zip(hits, keys), start=1):
      caption = None
      if item in texts:  # a text gallery's row is one caption; other items show their first
        captions = texts[item]
        caption = captions[min(query_lib.row_ordinal(self.ids, mask, row) if is_text else 0,
                               len(captions) - 1)]
      media = None
      if self.modalities[gallery].kind in MEDIA_KINDS:
        media = "/api/media?" + urllib.parse.urlencode({"key": key, "modality": gallery})
      out.append({"rank": rank, "row": row, "key": key, "score": score, "caption": caption,
                  "media": media})
    return out

  def media(self, key, modality):
    """(bytes, MIME type) of item `key`'s `modality`, from the dataset's own records."""
    shown = sorted(m for m, o in self.modalities.items() if o.kind in MEDIA_KINDS)
    if modality not in shown:
      raise QueryError(f"modality={modality!r}: expected one of {shown}")
    with self._shown_lock:
      item = self._shown.get(key)
    if item is None:
      row = self.exported.row_of_key(key)
      if row is None:
        raise QueryError(f"key={key!r}: no such item in the export", status=404)
      item = int(self.ids[row])
    try:
      return self.embedder.source.items(self.split).media(item, modality)
    except KeyError as e:
      raise QueryError(f"key={key!r}: the item has no {modality}", status=404) from e
