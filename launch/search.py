"""Searches an embedding export with a query: text, or an audio, image or video file.

  python launch/search.py --config=configs/audio_video_text.py --workdir=runs/avt \
      --export=emb/ --query-text="seven one four two" --k=5

Encodes the query with the run's model (newest checkpoint, or the export's step), scores it
against every other exported modality (or --gallery) by cosine and prints the top-k item ids
with their scores and, when the dataset has text, each item's text. With --rerank=N and a
model with a fusion encoder for the pair (seed 001), the top N are re-scored by the matching
head and listed again; the candidates' tokens are recomputed from just those items of the
export's split (exports hold embeddings, not tokens).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from common import CONFIG, WORKDIR  # launch/common.py
import jax
import numpy as np
from xmodal_jax.data import media, pipeline, preprocess, records
from xmodal_jax.eval import export, search
from xmodal_jax.models import towers
from xmodal_jax.train import loop

_EXPORT = flags.DEFINE_string("export", None, "An export folder (launch/export.py).")
_QUERY_TEXT = flags.DEFINE_string("query-text", None, "A text query.")
_QUERY_AUDIO = flags.DEFINE_string("query-audio", None, "An audio file (wav, flac, ogg, mp3, "
                                   "...) as the query; resampled to the tower's rate.")
_QUERY_IMAGE = flags.DEFINE_string("query-image", None, "An image file (JPEG, PNG, ...) as "
                                   "the query.")
_QUERY_VIDEO = flags.DEFINE_string("query-video", None, "A video file (any format FFmpeg "
                                   "reads) as the query.")
_GALLERY = flags.DEFINE_list("gallery", None, "Modalities to search (default: all others).")
_K = flags.DEFINE_integer("k", 5, "How many items to list per gallery modality.")
_RERANK = flags.DEFINE_integer(
    "rerank", 0, "Also re-score the embedding top N with the matching head of the config's "
    "fusion pair for the query and gallery modalities, and list that ranking (0: off).")
flags.mark_flags_as_required(["export"])


def query_flag():
  """(kind, value) of the one query flag given; checked before anything is built."""
  given = [(kind, value) for kind, value in (("text", _QUERY_TEXT.value),
                                             ("audio", _QUERY_AUDIO.value),
                                             ("image", _QUERY_IMAGE.value),
                                             ("video", _QUERY_VIDEO.value)) if value]
  if len(given) != 1:
    raise app.UsageError("give exactly one of --query-text, --query-audio, --query-image, "
                         "--query-video")
  kind, value = given[0]
  if kind != "text" and not os.path.exists(value):
    raise app.UsageError(f"--query-{kind}={value}: no such file")
  return kind, value


def read_query(experiment, kind, value):
  """(modality name, raw value as the dataset feature holds it)."""
  config = experiment.config
  names = [n for n, m in config.modalities.items() if m.kind == kind]
  if not names:
    raise app.UsageError(f"the config has no {kind} modality to encode the query with")
  name = names[0]
  modality = config.modalities[name]
  if kind == "audio":
    built = records.read_sidecar(experiment.builder.data_dir).get("options", {})
    rate = config.model.towers[name].get("sample_rate") or built.get("sample_rate")
    if not rate:
      raise app.UsageError(f"--query-audio: neither config.model.towers.{name}.sample_rate "
                           "nor the dataset says which sample rate the model takes")
    value = media.decode_audio(value, rate)
  elif kind == "image":
    with open(value, "rb") as f:
      value = f.read()
  elif kind == "video":
    value = media.read_video(value, (modality.num_frames, modality.frame_size,
                                     modality.frame_size, modality.get("channels", 3)))
  return name, value


def item_texts(experiment, split, ids):
  """{id: [captions]} for `ids` when the dataset has a text feature, else {}."""
  texts = [m.feature for m in experiment.config.modalities.values() if m.kind == "text"]
  if not texts:
    return {}
  ds = pipeline.keep_items(experiment.builder.as_dataset(split=split), sorted(set(ids)))
  return {int(example["id"]): [c.decode("utf-8") for c in np.atleast_1d(example[texts[0]])]
          for example in ds.as_numpy_iterator()}


def row_ordinal(ids, mask, row):
  """How many earlier export rows of the same item have the modality of `mask`: rows of one
  item keep their order, so this is the row's caption index when captions are expanded."""
  return int(np.count_nonzero((ids[:row] == ids[row]) & mask[:row]))


def fusion_pair(experiment, query, gallery):
  """The model's fusion pair joining the two modalities ("a:b"), or None."""
  for pair in towers.fusion_pairs(experiment.model):
    if set(pair.split(":")) == {query, gallery}:
      return pair
  return None


def gallery_tokens(experiment, split, gallery, rows, ids, mask):
  """{export row: (tokens, valid)} for `rows` of the export (whose `ids` and gallery `mask`
  are given), recomputed from just those items of `split`.

  An item can fill several rows (one per caption); rows of one item keep their order, so a
  row is found as the n-th row of its item that has the gallery modality.
  """
  wanted = {(int(ids[r]), row_ordinal(ids, mask, int(r))): int(r) for r in rows}
  seen, found = {}, {}
  embed = experiment.embed_fn(tokens=(gallery,))
  batches = pipeline.eval_iterator(experiment.config, experiment.builder, split,
                                   ids=sorted({item for item, _ in wanted}))
  for out in loop.embed_batches(embed, experiment.state.params, batches, experiment.mesh):
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


def rerank_hits(experiment, pair, modality, query_tokens, gallery, candidates, split, ids,
                mask):
  """[(export row, id, matching score)] of `candidates` ([(export row, id, score)]), best
  match first."""
  found = gallery_tokens(experiment, split, gallery, [row for row, _, _ in candidates], ids,
                         mask)
  tokens = {modality: {"tokens": query_tokens[0], "valid": query_tokens[1]},
            gallery: {"tokens": np.stack([found[row][0] for row, _, _ in candidates]),
                      "valid": np.stack([found[row][1] for row, _, _ in candidates])}}
  count = len(candidates)
  scores = loop.matching_scores(experiment.match_fn(), experiment.state.params, pair, tokens,
                                modality, np.zeros(1, np.int64), np.arange(count),
                                np.arange(count)[None], chunk=1)[0]
  order = np.argsort(-scores, kind="stable")
  return [candidates[i][:2] + (float(scores[i]),) for i in order]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  kind, value = query_flag()
  ids, embeddings, masks, meta = export.read_export(_EXPORT.value)
  experiment = loop.setup(CONFIG.value, WORKDIR.value, step=meta["step"],
                          require_checkpoint=True)
  config = experiment.config
  modality, raw = read_query(experiment, kind, value)
  inputs = {modality: preprocess.preprocess_one(modality, config.modalities[modality], raw)}
  details = experiment.model.apply({"params": experiment.state.params}, inputs,
                                    train=False, details=True)
  query = np.asarray(details["emb"][modality])
  query_tokens = jax.tree.map(np.asarray, details["tokens"][modality])
  galleries = _GALLERY.value or [m for m in embeddings if m != modality]
  results = {}
  for gallery in galleries:
    if gallery not in embeddings:
      raise app.UsageError(f"--gallery={gallery}: the export has {sorted(embeddings)}")
    rows = np.flatnonzero(masks[gallery])
    depth = min(max(_K.value, _RERANK.value), len(rows))
    scores, index = search.topk(query, embeddings[gallery][rows], depth)
    hits = [(int(rows[i]), int(ids[rows[i]]), float(s)) for s, i in zip(scores[0], index[0])]
    results[gallery] = (gallery, hits[:_K.value])
    pair = fusion_pair(experiment, modality, gallery) if _RERANK.value else None
    if _RERANK.value and pair is None:
      print(f"(no fusion encoder for {modality} and {gallery}: not re-ranked)")
    elif pair:
      results[f"{gallery} re-ranked by the matching head of {pair} (top {depth})"] = (
          gallery, rerank_hits(experiment, pair, modality, query_tokens, gallery, hits,
                               meta["split"], ids, masks[gallery])[:_K.value])
  texts = item_texts(experiment, meta["split"],
                     [item for _, hits in results.values() for _, item, _ in hits])
  for title, (gallery, hits) in results.items():
    print(f"{modality} query -> {title} ({meta['split']}, step {meta['step']}):")
    is_text = config.modalities[gallery].kind == "text"
    for rank, (row, item, score) in enumerate(hits, start=1):
      text = ""
      if item in texts:  # A text gallery's row is one caption; other items show their first.
        caption = row_ordinal(ids, masks[gallery], row) if is_text else 0
        text = f"  {texts[item][min(caption, len(texts[item]) - 1)]!r}"
      print(f"  {rank:3d}. id {item}  score {score:.4f}{text}")


if __name__ == "__main__":
  app.run(main)
