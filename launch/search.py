"""Searches an embedding export with a query: text, or an audio, image or video file.

  python launch/search.py --config=configs/audio_video_text.py --workdir=runs/avt \
      --export=emb/ --query-text="seven one four two" --k=5

Encodes the query with the run's model (newest checkpoint, or the export's step), scores it
against every other exported modality (or --gallery) by cosine and prints the top-k item ids
with their scores and, when the dataset has text, each item's text.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from common import CONFIG, WORKDIR  # launch/common.py
import numpy as np
from xmodal_jax.data import media, preprocess, records
from xmodal_jax.eval import export, search
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
  """{id: text} for `ids` when the dataset has a text feature, else {}."""
  texts = [m.feature for m in experiment.config.modalities.values() if m.kind == "text"]
  if not texts:
    return {}
  wanted, found = set(int(i) for i in ids), {}
  for example in experiment.builder.as_dataset(split=split).as_numpy_iterator():
    if int(example["id"]) in wanted:
      text = example[texts[0]]
      text = text[0] if isinstance(text, np.ndarray) else text  # an item's first caption
      found[int(example["id"])] = text.decode("utf-8")
  return found


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
  query = np.asarray(experiment.model.apply({"params": experiment.state.params}, inputs,
                                            train=False)[modality])
  galleries = _GALLERY.value or [m for m in embeddings if m != modality]
  results = {}
  for gallery in galleries:
    if gallery not in embeddings:
      raise app.UsageError(f"--gallery={gallery}: the export has {sorted(embeddings)}")
    rows = np.flatnonzero(masks[gallery])
    scores, index = search.topk(query, embeddings[gallery][rows], min(_K.value, len(rows)))
    results[gallery] = [(int(ids[rows[i]]), float(s)) for s, i in zip(scores[0], index[0])]
  texts = item_texts(experiment, meta["split"], [i for r in results.values() for i, _ in r])
  for gallery, hits in results.items():
    print(f"{modality} query -> {gallery} ({meta['split']}, step {meta['step']}):")
    for rank, (item, score) in enumerate(hits, start=1):
      text = f"  {texts[item]!r}" if item in texts else ""
      print(f"  {rank:3d}. id {item}  score {score:.4f}{text}")


if __name__ == "__main__":
  app.run(main)
