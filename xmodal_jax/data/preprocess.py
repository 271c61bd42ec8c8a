"""Per-modality preprocessing ops, found by the modality's `kind`.

Each op is built from the modality's config (`config.modalities.<name>`) and maps one
example's stored feature (a tf.Tensor) and a stateless seed (int64[2], None at evaluation)
to the tower's inputs, a dict of fixed-shape tensors. Random choices depend only on the seed,
so a resumed run sees the same augmentations.
"""

import numpy as np
import tensorflow as tf

from xmodal_jax import tokenizers

def _seed(seed, salt):
  return None if seed is None else seed + tf.constant([0, salt * 1_000_003], tf.int64)


def normalize(pixels, mean, std):
  """uint8-valued pixels [..., C] -> (x / 255 - mean) / std, float32."""
  x = tf.cast(pixels, tf.float32) / 255.0
  return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def resize_center_crop(images, size):
  """[..., h, w, C] -> shorter side resized to `size` (antialiased bilinear), centre crop
  size x size."""
  shape = tf.shape(images)
  height, width = tf.cast(shape[-3], tf.float32), tf.cast(shape[-2], tf.float32)
  scale = size / tf.minimum(height, width)
  new_h = tf.maximum(size, tf.cast(tf.round(height * scale), tf.int32))
  new_w = tf.maximum(size, tf.cast(tf.round(width * scale), tf.int32))
  images = tf.image.resize(images, tf.stack([new_h, new_w]), antialias=True)
  return tf.image.crop_to_bounding_box(images, (new_h - size) // 2, (new_w - size) // 2,
                                       size, size)


def text_op(modality_config, train):
  """A caption string, or one of an item's captions ([n] strings): sampled per step in
  training when `captions="sample"`, else the first; "" when there is none. `text_batch_op`
  tokenizes whole batches outside tf.data."""
  sample = train and modality_config.captions == "sample"

  def op(text, seed):
    if text.shape.rank == 0:
      return {"text": text}
    count = tf.shape(text)[0]
    index = 0
    if sample:
      index = tf.random.stateless_uniform([], _seed(seed, 1), 0, tf.maximum(count, 1),
                                          tf.int32)
    return {"text": tf.cond(count > 0, lambda: text[index], lambda: tf.constant(""))}
  return op


def text_batch_op(modality_config):
  """{"text": bytes[B]} -> {"input_ids", "attention_mask"}: int32[B, max_length].

  One tokenizer call per batch (the fast tokenizer batches in Rust); done after tf.data so
  no Python runs inside its threads.
  """
  tokenizer = tokenizers.load(modality_config.tokenizer)

  def op(inputs):
    texts = [t.decode("utf-8") for t in inputs["text"]]
    out = tokenizer(texts, padding="max_length", truncation=True,
                    max_length=modality_config.max_length, return_tensors="np")
    return {"input_ids": out["input_ids"].astype(np.int32),
            "attention_mask": out["attention_mask"].astype(np.int32)}
  return op


def audio_op(modality_config, train):
  """int16 or float samples [N] -> {"waveform": float32[num_samples]}: a random window in
  training (`random_crop`, default True) or the start at evaluation, zero-padded."""
  num_samples = modality_config.num_samples
  random_crop = train and modality_config.random_crop

  def op(samples, seed):
    x = tf.cast(samples, tf.float32)
    if samples.dtype == tf.int16:
      x = x / 32768.0
    start = 0
    if random_crop:
      start = tf.random.stateless_uniform(
          [], _seed(seed, 2), 0, tf.maximum(tf.shape(x)[0] - num_samples, 0) + 1, tf.int32)
    x = x[start:start + num_samples]
    x = tf.pad(x, [[0, num_samples - tf.shape(x)[0]]])
    return {"waveform": tf.ensure_shape(x, [num_samples])}
  return op


def image_op(modality_config, train):
  """Encoded image bytes -> {"pixels": float32[size, size, 3]}: random-resized crop (area
  fraction `crop_scale`, aspect 3/4..4/3) and horizontal flip (`flip`) in training, shorter
  side resize + centre crop at evaluation; normalized by `mean`/`std` (CLIP's by default).
  An absent image (empty bytes) gives zeros."""
  size = modality_config.image_size
  mean, std = tuple(modality_config.mean), tuple(modality_config.std)
  crop_scale = tuple(modality_config.crop_scale)
  flip = modality_config.flip

  def op(encoded, seed):
    image = tf.cond(
        tf.strings.length(encoded) > 0,
        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
        lambda: tf.zeros([size, size, 3], tf.uint8))
    image = tf.ensure_shape(image, [None, None, 3])
    if train:
      begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
          tf.shape(image), tf.zeros([1, 0, 4]), seed=_seed(seed, 3), area_range=crop_scale,
          aspect_ratio_range=(3 / 4, 4 / 3), min_object_covered=0.0, max_attempts=10,
          use_image_if_no_bounding_boxes=True)
      image = tf.image.resize(tf.slice(image, begin, crop), (size, size), antialias=True)
      if flip:
        image = tf.image.stateless_random_flip_left_right(image, _seed(seed, 4))
    else:
      image = resize_center_crop(image, size)
    return {"pixels": tf.ensure_shape(normalize(image, mean, std), [size, size, 3])}
  return op


def frame_indices(count, num_frames, seed=None):
  """Indices of `num_frames` of `count` frames: segment centres, or (with a seed) a random
  frame in each of `num_frames` equal segments."""
  offset = 0.5 if seed is None else tf.random.stateless_uniform([num_frames], seed)
  positions = (tf.range(num_frames, dtype=tf.float32) + offset) * tf.cast(count, tf.float32)
  return tf.minimum(tf.cast(positions / num_frames, tf.int32), tf.maximum(count - 1, 0))


def video_op(modality_config, train):
  """Video -> {"frames": float32[num_frames, frame_size, frame_size, channels]}.

  Stored as JPEG frames ([S] strings, from the record builders) or as uint8 [T, H, W, C];
  `num_frames` are picked by `sampling` ("uniform", or "random" in training: one random frame
  per segment), resized (shorter side) and centre-cropped to `frame_size`, optionally shifted
  by up to `max_shift` pixels per frame in training, and normalized by `mean`/`std` (0.5/0.5
  by default: [-1, 1]). An absent video gives zeros.
  """
  num_frames = modality_config.num_frames
  size = modality_config.frame_size
  channels = modality_config.channels
  random_sampling = train and modality_config.sampling == "random"
  max_shift = modality_config.max_shift if train else 0
  mean, std = modality_config.mean, modality_config.std

  def pick(count, seed):
    return frame_indices(count, num_frames, _seed(seed, 5) if random_sampling else None)

  def shift(frames, seed):
    time, height, width = tf.unstack(tf.shape(frames)[:3])
    padded = tf.pad(frames, [[0, 0], [max_shift, max_shift], [max_shift, max_shift], [0, 0]])
    offsets = tf.random.stateless_uniform([time, 2], _seed(seed, 6), 0, 2 * max_shift + 1,
                                          tf.int32)
    return tf.map_fn(
        lambda x: tf.image.crop_to_bounding_box(x[0], x[1][0], x[1][1], height, width),
        (padded, offsets), fn_output_signature=frames.dtype)

  def op(frames, seed):
    if frames.dtype == tf.string:
      count = tf.shape(frames)[0]
      frames = tf.cond(
          count > 0,
          lambda: tf.map_fn(lambda b: tf.io.decode_jpeg(b, channels=channels),
                            tf.gather(frames, pick(count, seed)),
                            fn_output_signature=tf.TensorSpec([None, None, channels],
                                                              tf.uint8)),
          lambda: tf.zeros([num_frames, size, size, channels], tf.uint8))
    elif frames.shape[0] != num_frames:
      frames = tf.gather(frames, pick(tf.shape(frames)[0], seed))
    if frames.shape[1:3] != (size, size):
      frames = resize_center_crop(frames, size)
    frames = tf.cast(frames, tf.float32)
    if max_shift:
      frames = shift(frames, seed)
    out = normalize(frames, (mean,) * channels, (std,) * channels)
    return {"frames": tf.ensure_shape(out, [num_frames, size, size, channels])}
  return op


def features_op(modality_config, train):
  """Stored float features -> {"features": float32, same shape}."""
  del modality_config, train

  def op(features, seed):
    del seed
    return {"features": tf.cast(features, tf.float32)}
  return op


# kind -> (op on one example inside tf.data, op on a numpy batch after it or None)
OPS = {"text": (text_op, text_batch_op), "audio": (audio_op, None),
       "image": (image_op, None), "video": (video_op, None), "features": (features_op, None)}


def _kind(modality_name, modality_config):
  kind = modality_config.kind
  if kind not in OPS:
    raise ValueError(f"config.modalities.{modality_name}.kind={kind!r}: expected one of "
                     f"{sorted(OPS)}")
  return kind


def get_op(modality_name, modality_config, train):
  """The modality's per-example op; in training it augments unless the modality sets
  augment=False (then training prepares an example exactly as evaluation does)."""
  train = train and modality_config.augment
  return OPS[_kind(modality_name, modality_config)][0](modality_config, train)


def get_batch_op(modality_name, modality_config):
  batch_op = OPS[_kind(modality_name, modality_config)][1]
  return batch_op and batch_op(modality_config)


def missing_value(kind, shape=None):
  """The raw value that stands for a modality an example lacks (its mask is False): what the
  modality's op prepares for a row of a source without it, or for shapes alone. `shape`:
  a features modality's."""
  if kind == "features":
    return np.zeros(shape, np.float32)
  return {"image": b"", "audio": np.zeros([0], np.int16), "text": "",
          "video": np.zeros([0], np.bytes_)}[kind]


def preprocess_one(modality_name, modality_config, raw):
  """One raw value, as a dataset feature holds it (a string, int16 samples, uint8 frames,
  encoded image bytes), -> the tower's inputs with a batch dimension of 1: how a search
  query is prepared."""
  out = get_op(modality_name, modality_config, train=False)(tf.constant(raw), None)
  out = {k: np.asarray(v)[None] for k, v in out.items()}
  batch_op = get_batch_op(modality_name, modality_config)
  return batch_op(out) if batch_op else out
