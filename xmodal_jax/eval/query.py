"""One query against an embedding export (launch/search.py): read and encode the query with
the run's model, take each gallery modality's top hits, and re-rank candidates with a
fusion pair's matching head (ALBEF).

Exports hold embeddings, not tokens: re-ranking recomputes the candidates' tokens from just
their items of the export's split.
"""

import json

import numpy as np

from xmodal_jax import files
from xmodal_jax.eval import index as index_lib, search


def query_modality(modalities, kind, named=None):
  """The modality whose tower embeds a query of `kind` ("audio", ...): `named`, or else the
  first by name of that kind in `modalities` (config.modalities), so that a run with speech
  and sound towers can send a spoken query through speech. ValueError where `named` is not
  of that kind or the config has none."""
  names = [n for n, m in modalities.items() if m.kind == kind]
  if named is None and names:
    return names[0]
  if named not in names:
    raise ValueError(f"the config's {kind} modalities are {names}"
                     + (f", not {named!r}" if named is not None else ""))
  return named


def export_mismatches(meta, workdir, model_config):
  """What differs between an export's meta.json and the run asked to search it (workdir,
  model config): searching another run's embeddings with this model lists unrelated hits."""
  problems = []
  if meta.get("workdir") != files.absolute(workdir):
    problems.append(f"it was exported from run {meta.get('workdir')!r}, not "
                    f"{files.absolute(workdir)!r}")
  if meta.get("model") != json.loads(model_config.to_json_best_effort(sort_keys=True)):
    problems.append("it was exported with another config.model")
  return problems


def encode_query(embedder, params, modality, raw, tokens=True):
  """(embedding float32[1, D], (tokens [1, L, W], valid [1, L]) or None without `tokens`)
  of one raw query (Source.read_value), prepared as evaluation prepares examples."""
  inputs = embedder.source.prepare(modality, embedder.config.modalities[modality], raw)
  return embedder.embed_one(params, modality, inputs, tokens=tokens)


def top_hits(query_emb, exported, gallery, depth, faiss_index=None):
  """[(export row, item id, cosine)] of the `depth` best rows of `exported` (eval/export.py:
  Export) that have modality `gallery`: exact (eval/search.py) shard by shard, or from
  `faiss_index` (eval/index.py) when given."""
  if faiss_index is not None:
    scores, rows = index_lib.search(faiss_index, query_emb, depth)
    found = rows[0] >= 0
    scores, rows = scores[0][found], rows[0][found]
  else:
    scores, rows = np.zeros([0], np.float32), np.zeros([0], np.int64)
    for shard_rows, emb in exported.rows_with(gallery):
      top_scores, top = search.topk(query_emb, emb, min(depth, len(emb)))
      scores = np.concatenate([scores, top_scores[0]])
      rows = np.concatenate([rows, shard_rows[top[0]]])
    order = np.lexsort((rows, -scores))[:depth]  # by score, ties by row: as search.topk
    scores, rows = scores[order], rows[order]
  ids = exported.ids()
  return [(int(r), int(ids[r]), float(s)) for s, r in zip(scores, rows)]


def row_ordinal(ids, mask, row):
  """How many earlier export rows of the same item have the modality of `mask`: rows of one
  item keep their order, so this is the row's caption index when captions are expanded."""
  return int(np.count_nonzero((ids[:row] == ids[row]) & mask[:row]))


def gallery_tokens(embedder, params, split, gallery, rows, ids, mask):
  """{export row: (tokens, valid)} for `rows` of the export (whose `ids` and gallery `mask`
  are given), recomputed from just those items of `split`.

  An item can fill several rows (one per caption); rows of one item keep their order, so a
  row is found as the n-th row of its item that has the gallery modality.
  """
  wanted = {(int(ids[r]), row_ordinal(ids, mask, int(r))): int(r) for r in rows}
  seen, found = {}, {}
  items = sorted({item for item, _ in wanted})
  for out in embedder.batches(params, split, tokens=(gallery,), ids=items):
    for i, item in enumerate(out["_id"]):
      if not out["_mask"][gallery][i]:
        continue
      key = (int(item), seen.get(int(item), 0))
      seen[int(item)] = key[1] + 1
      if key in wanted:
        found[wanted[key]] = (out["tokens"][gallery]["tokens"][i],
                              out["tokens"][gallery]["valid"][i])
  missing = sorted(set(int(r) for r in rows) - set(found))
  if missing:
    raise ValueError(f"export rows {missing[:5]} (ids {[int(ids[r]) for r in missing[:5]]}) "
                     f"were not found in split {split!r}: was the export made from it?")
  return found


def rerank_hits(embedder, params, pair, modality, query_tokens, gallery, candidates, split,
                ids, mask):
  """[(export row, id, matching score)] of `candidates` ([(export row, id, score)]), best
  match first."""
  found = gallery_tokens(embedder, params, split, gallery, [row for row, _, _ in candidates],
                         ids, mask)
  tokens = {modality: {"tokens": query_tokens[0], "valid": query_tokens[1]},
            gallery: {"tokens": np.stack([found[row][0] for row, _, _ in candidates]),
                      "valid": np.stack([found[row][1] for row, _, _ in candidates])}}
  count = len(candidates)
  scores = embedder.matching_scores(params, pair, tokens, modality, np.zeros(1, np.int64),
                                    np.arange(count), np.arange(count)[None], chunk=1)[0]
  order = np.argsort(-scores, kind="stable")
  return [candidates[i][:2] + (float(scores[i]),) for i in order]
