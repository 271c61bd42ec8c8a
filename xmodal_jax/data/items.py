"""A split's items read back one at a time by id, for showing search results: their captions,
and their stored media as files a browser plays (docs/guide.md, "Serving an export").

Records are read by position through the split's random-access copy (data/random_access.py,
written once where missing). The first lookup reads only the "id" and "has_" fields of every
record, once, to find each item's first record with a modality (kept as sorted arrays).
"""

import threading

import numpy as np
import tensorflow as tf

from xmodal_jax.data import media, pipeline

VIDEO_FRAME_RATE = 4  # stored frames are a uniform sample of the clip, shown 4 per second
MIN_VIDEO_SIZE = 128  # smaller frames are repeated (nearest neighbour) to at least this
_IMAGE_TYPES = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG", "image/png"),
                (b"GIF8", "image/gif"), (b"BM", "image/bmp"))


def image_type(data):
  """The MIME type of encoded image bytes, from their first bytes."""
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "image/webp"
  return next((kind for magic, kind in _IMAGE_TYPES if data.startswith(magic)),
              "application/octet-stream")


class FirstPositions:
  """Each item's first record position, from the split's ids in position order: two sorted
  int64 arrays (16 bytes an item, not a Python dict's ~100), searched by bisection."""

  def __init__(self, ids, positions):
    self.ids, first = np.unique(ids, return_index=True)
    self.positions = positions[first]

  def get(self, item_id):
    """The position of the first record of `item_id`, or None."""
    i = np.searchsorted(self.ids, item_id)
    return int(self.positions[i]) if i < len(self.ids) and self.ids[i] == item_id else None

  def __contains__(self, item_id):
    return self.get(item_id) is not None


class ItemReader:
  """The items of `split` of a prepared dataset (`builder`), by their int64 id.
  `modalities`: {name: config.modalities entry} of the modalities it shows; `audio_rate`:
  audio modality -> the rate its samples are stored at (Source.audio_rate)."""

  def __init__(self, builder, split, modalities, audio_rate):
    self.split = split
    self._builder, self._modalities, self._audio_rate = builder, modalities, audio_rate
    self._features = builder.info.features
    self._reader = None
    self._first = None  # {feature (None: any record): FirstPositions}
    self._lock = threading.Lock()

  def _positions(self):
    with self._lock:
      if self._first is None:
        self._reader = pipeline.random_access_reader(self._builder, self.split, 1)
        # Datasets built from records say which items have a modality (has_ features);
        # in the others, every item has every feature.
        features = sorted({m.feature for m in self._modalities.values()})
        flagged = [f for f in features if f"has_{f}" in self._features]
        spec = {"id": tf.io.FixedLenFeature([], tf.int64)}
        spec |= {f"has_{f}": tf.io.FixedLenFeature([], tf.int64) for f in flagged}
        columns = {key: [] for key in spec}
        for batch in self._reader.dataset().batch(4096).map(
            lambda s: tf.io.parse_example(s, spec)).as_numpy_iterator():
          for key, values in batch.items():
            columns[key].append(values)
        columns = {key: np.concatenate(parts) if parts else np.zeros(0, np.int64)
                   for key, parts in columns.items()}
        ids = columns["id"]
        first = {None: FirstPositions(ids, np.arange(len(ids)))}
        for f in features:
          if f in flagged:
            having = np.flatnonzero(columns[f"has_{f}"])
            first[f] = FirstPositions(ids[having], having)
          else:  # every record has it
            first[f] = first[None]
        self._first = first
    return self._first

  def record(self, item_id, modality=None):
    """The decoded record (NumPy) of the item's first record that has `modality` (any
    record: None); KeyError where the split has none."""
    feature = None if modality is None else self._modalities[modality].feature
    position = self._positions()[feature].get(int(item_id))
    if position is None:
      what = "" if modality is None else f" with {modality!r}"
      raise KeyError(f"split {self.split!r} has no item {item_id}{what}")
    serialized = self._reader.read([position])[0]
    return self._features.deserialize_example_np(serialized)

  def captions(self, item_ids):
    """{id: [captions]} of `item_ids` from the first text modality ({} without one)."""
    text = [name for name, m in self._modalities.items() if m.kind == "text"]
    if not text:
      return {}
    feature = self._modalities[text[0]].feature
    found = {}
    for item in set(int(i) for i in item_ids):
      if item in self._positions()[feature]:
        found[item] = [c.decode("utf-8") if isinstance(c, bytes) else str(c)
                       for c in np.atleast_1d(self.record(item, text[0])[feature])]
    return found

  def media(self, item_id, modality):
    """(bytes, MIME type) of the item's `modality` as a browser plays it: an image as
    stored, audio as WAV, video frames as WebM."""
    options = self._modalities[modality]
    value = self.record(item_id, modality)[options.feature]
    if options.kind == "image":
      data = bytes(value)
      return data, image_type(data)
    if options.kind == "audio":
      return media.encode_wav(value, self._audio_rate(modality)), "audio/wav"
    if options.kind == "video":
      frames = value  # uint8 [T, H, W, C] where the dataset stores arrays
      if frames.dtype == object:  # JPEG frames (datasets built from records)
        frames = np.stack([tf.io.decode_jpeg(f).numpy() for f in frames])
      scale = -(-MIN_VIDEO_SIZE // min(frames.shape[1:3]))  # tiny frames shown larger
      frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
      return media.encode_webm(frames, VIDEO_FRAME_RATE), "video/webm"
    raise ValueError(f"{modality!r} is a {options.kind} modality: no media to show")
