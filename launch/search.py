"""Searches an embedding export with a query: text, or an audio, image or video file.

  python launch/search.py --config=configs/audio_video_text.py --workdir=runs/avt \
      --export=emb/ --query-text="seven one four two" --k=5

Encodes the query with the run's model (newest checkpoint, or the export's step), scores it
against every other exported modality (or --gallery) by cosine and prints the top-k items'
keys with their scores and, when the dataset has text, each item's text. The search is
exact, shard by shard, unless the export has a FAISS index of the gallery modality
(launch/export.py --index) and --exact is not given. With --rerank=N and a
model with a fusion encoder for the pair (ALBEF), the top N are re-scored by the matching
head and listed again; the candidates' tokens are recomputed from just those items of the
export's split (exports hold embeddings, not tokens).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from common import ALLOW_CONFIG_CHANGE, CONFIG, WORKDIR, join_runtime  # launch/common.py
from xmodal_jax.eval import export, index, query
from xmodal_jax.models import towers

_EXPORT = flags.DEFINE_string("export", None, "An export folder (launch/export.py).")
_QUERY_TEXT = flags.DEFINE_string("query-text", None, "A text query.")
_QUERY_AUDIO = flags.DEFINE_string("query-audio", None, "An audio file (wav, flac, ogg, mp3, "
                                   "...) as the query; resampled to the tower's rate.")
_QUERY_IMAGE = flags.DEFINE_string("query-image", None, "An image file (JPEG, PNG, ...) as "
                                   "the query.")
_QUERY_VIDEO = flags.DEFINE_string("query-video", None, "A video file (any format FFmpeg "
                                   "reads) as the query.")
_QUERY_MODALITY = flags.DEFINE_string(
    "query_modality", None, "The modality whose tower embeds the query (default: the "
    "first by name of the query's kind; e.g. speech rather than sound).")
_GALLERY = flags.DEFINE_list("gallery", None, "Modalities to search (default: all others).")
_K = flags.DEFINE_integer("k", 5, "How many items to list per gallery modality.")
_RERANK = flags.DEFINE_integer(
    "rerank", 0, "Also re-score the embedding top N with the matching head of the config's "
    "fusion pair for the query and gallery modalities, and list that ranking (0: off).")
_EXACT = flags.DEFINE_bool("exact", False, "Search exactly even where the export has a "
                           "FAISS index.")
_ALLOW_OTHER_EXPORT = flags.DEFINE_bool(
    "allow_other_export", False, "Search an export that another run or model config made.")
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  join_runtime()
  kind, value = query_flag()
  if _K.value < 1:
    raise app.UsageError(f"--k={_K.value}: expected a positive count")
  try:
    modality = query.query_modality(CONFIG.value.modalities, kind, _QUERY_MODALITY.value)
  except ValueError as e:
    named = f" --query_modality={_QUERY_MODALITY.value}" if _QUERY_MODALITY.value else ""
    raise app.UsageError(f"--query-{kind}{named}: {e}") from e
  exported = export.read_export(_EXPORT.value)
  meta = exported.meta
  for gallery in _GALLERY.value or []:
    if gallery not in meta["dims"]:
      raise app.UsageError(f"--gallery={gallery}: the export has {exported.modalities}")
  # Imported here, after the flags are checked: a usage error then stops the launcher in
  # under 2 s instead of after the imports that bring TensorFlow (6 s).
  from xmodal_jax import experiment as experiment_lib
  experiment = experiment_lib.setup(CONFIG.value, WORKDIR.value, step=meta["step"],
                                    require_checkpoint=True,
                                    allow_config_change=ALLOW_CONFIG_CHANGE.value)
  config, embedder, params = experiment.config, experiment.embedder, experiment.state.params
  problems = query.export_mismatches(meta, WORKDIR.value, config.model)
  if problems and not _ALLOW_OTHER_EXPORT.value:
    raise app.UsageError(f"--export={_EXPORT.value}: " + "; ".join(problems)
                         + " (--allow_other_export to search it anyway)")
  try:
    raw = experiment.source.read_value(modality, value)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(f"--query-{kind}: {e}") from e
  query_emb, query_tokens = query.encode_query(embedder, params, modality, raw)
  ids = exported.ids()
  results = {}
  for gallery in _GALLERY.value or [m for m in exported.modalities if m != modality]:
    depth = max(_K.value, _RERANK.value)
    faiss_index = None if _EXACT.value else index.load(exported, gallery)
    hits = query.top_hits(query_emb, exported, gallery, depth, faiss_index)
    how = "exact" if faiss_index is None else f"FAISS {type(faiss_index).__name__}"
    results[f"{gallery} ({how})"] = (gallery, hits[:_K.value])
    pair = towers.fusion_pair(experiment.model, modality, gallery) if _RERANK.value else None
    if _RERANK.value and pair is None:
      print(f"(no fusion encoder for {modality} and {gallery}: not re-ranked)")
    elif pair:
      title = f"{gallery} re-ranked by the matching head of {pair} (top {len(hits)})"
      results[title] = (gallery, query.rerank_hits(
          embedder, params, pair, modality, query_tokens, gallery, hits, meta["split"], ids,
          exported.mask(gallery))[:_K.value])
  texts = experiment.source.item_texts(meta["split"],
                           [item for _, hits in results.values() for _, item, _ in hits])
  for title, (gallery, hits) in results.items():
    print(f"{modality} query -> {title} ({meta['split']}, step {meta['step']}):")
    is_text = config.modalities[gallery].kind == "text"
    mask = exported.mask(gallery) if is_text else None
    keys = exported.keys_at([row for row, _, _ in hits])
    for rank, ((row, item, score), key) in enumerate(zip(hits, keys), start=1):
      text = ""
      if item in texts:  # A text gallery's row is one caption; other items show their first.
        caption = query.row_ordinal(ids, mask, row) if is_text else 0
        text = f"  {texts[item][min(caption, len(texts[item]) - 1)]!r}"
      print(f"  {rank:3d}. {key}  score {score:.4f}{text}")


if __name__ == "__main__":
  app.run(main)
