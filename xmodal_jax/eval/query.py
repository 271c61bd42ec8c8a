"""One query against an embedding export (launch/search.py): read and encode the query with
the run's model, take each gallery modality's top hits, and re-rank candidates with a
fusion pair's matching head (seed 001).

Exports hold embeddings, not tokens: re-ranking recomputes the candidates' tokens from just
their items of the export's split.
"""

import json
import os

import jax
import numpy as np

from xmodal_jax.data import files
from xmodal_jax.eval import search


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


def read_query(config, builder, kind, path_or_text):
  """(modality name, raw value as the dataset feature holds it) of a query of `kind` (text,
  audio, image or video: a text, or a file's path). Errors say what is missing."""
  from xmodal_jax.data import media, records  # pylint: disable=g-import-not-at-top
  names = [n for n, m in config.modalities.items() if m.kind == kind]
  if not names:
    raise ValueError(f"the config has no {kind} modality to encode the query with")
  name = names[0]
  modality = config.modalities[name]
  if kind != "text" and not os.path.exists(path_or_text):
    raise FileNotFoundError(f"{path_or_text}: no such file")
  if kind == "audio":
    built = records.read_sidecar(builder.data_dir).get("options", {})
    rate = config.model.towers[name].get("sample_rate") or built.get("sample_rate")
    if not rate:
      raise ValueError(f"neither config.model.towers.{name}.sample_rate nor the dataset says "
                       "which sample rate the model takes")
    return name, media.decode_audio(path_or_text, rate)
  if kind == "image":
    with open(path_or_text, "rb") as f:
      return name, f.read()
  if kind == "video":
    return name, media.read_video(path_or_text, (modality.num_frames, modality.frame_size,
                                                 modality.frame_size,
                                                 modality.get("channels", 3)))
  return name, path_or_text


def encode_query(model, params, config, modality, raw):
  """(embedding float32[1, D], (tokens [1, L, W], valid [1, L])) of one raw query."""
  from xmodal_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  inputs = {modality: preprocess.preprocess_one(modality, config.modalities[modality], raw)}
  out = model.apply({"params": params}, inputs, train=False, local_features=False,
                    method="details")
  return np.asarray(out["emb"][modality]), jax.tree.map(np.asarray, out["tokens"][modality])


def top_hits(query_emb, gallery_emb, gallery_mask, ids, depth):
  """[(export row, item id, cosine)] of the `depth` best rows that have the modality."""
  rows = np.flatnonzero(gallery_mask)
  depth = min(depth, len(rows))
  scores, index = search.topk(query_emb, gallery_emb[rows], depth)
  return [(int(rows[i]), int(ids[rows[i]]), float(s)) for s, i in zip(scores[0], index[0])]


def item_texts(config, builder, split, ids):
  """{id: [captions]} for `ids` when the dataset has a text feature, else {}."""
  from xmodal_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  texts = [m.feature for m in config.modalities.values() if m.kind == "text"]
  if not texts:
    return {}
  ds = pipeline.keep_items(pipeline.read_in_order(builder, split), sorted(set(ids)))
  return {int(example["id"]): [c.decode("utf-8") for c in np.atleast_1d(example[texts[0]])]
          for example in ds.as_numpy_iterator()}


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
