"""Per-modality preprocessing ops, found by the modality's `kind`.

Each op is built from the modality's config (`config.modalities.<name>`) and maps one
example's raw feature (a tf.Tensor) to the tower's inputs, a dict of fixed-shape tensors.
"""

import functools
import os

import numpy as np
import tensorflow as tf

from xmodal_jax.data.builders import digit_sequences

# Tokenizers shipped with the package, by name; any other value is a Hugging Face folder.
SHIPPED_TOKENIZERS = {"digit_words": digit_sequences.TOKENIZER_DIR}


@functools.lru_cache(maxsize=None)
def load_tokenizer(name_or_path):
  """A `transformers` tokenizer from a shipped name or a local Hugging Face folder."""
  import transformers  # pylint: disable=g-import-not-at-top
  path = SHIPPED_TOKENIZERS.get(name_or_path, name_or_path)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"tokenizer {name_or_path!r}: no such folder (expected a Hugging Face tokenizer folder "
        f"or one of {sorted(SHIPPED_TOKENIZERS)})")
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def text_op(modality_config, train):
  """Passes the string through; `text_batch_op` tokenizes whole batches outside tf.data."""
  del modality_config, train

  def op(text):
    return {"text": text}
  return op


def text_batch_op(modality_config):
  """{"text": bytes[B]} -> {"input_ids", "attention_mask"}: int32[B, max_length].

  One tokenizer call per batch (the fast tokenizer batches in Rust); done after tf.data so
  no Python runs inside its threads.
  """
  tokenizer = load_tokenizer(modality_config.tokenizer)

  def op(inputs):
    texts = [t.decode("utf-8") for t in inputs["text"]]
    out = tokenizer(texts, padding="max_length", truncation=True,
                    max_length=modality_config.max_length, return_tensors="np")
    return {"input_ids": out["input_ids"].astype(np.int32),
            "attention_mask": out["attention_mask"].astype(np.int32)}
  return op


def audio_op(modality_config, train):
  """int16 or float samples [N] -> {"waveform": float32[num_samples]}, cropped or zero-padded."""
  del train
  num_samples = modality_config.num_samples

  def op(samples):
    x = tf.cast(samples, tf.float32)
    if samples.dtype == tf.int16:
      x = x / 32768.0
    x = x[:num_samples]
    x = tf.pad(x, [[0, num_samples - tf.shape(x)[0]]])
    return {"waveform": tf.ensure_shape(x, [num_samples])}
  return op


def video_op(modality_config, train):
  """uint8 frames [T, H, W, C] -> {"frames": float32 in [-1, 1]}.

  In training, each frame moves by up to `max_shift` pixels (zero fill), independently.
  """
  max_shift = modality_config.get("max_shift", 0) if train else 0

  def shift(frames):
    time, height, width = tf.unstack(tf.shape(frames)[:3])
    padded = tf.pad(frames, [[0, 0], [max_shift, max_shift], [max_shift, max_shift], [0, 0]])
    offsets = tf.random.uniform([time, 2], 0, 2 * max_shift + 1, tf.int32)
    return tf.map_fn(
        lambda x: tf.image.crop_to_bounding_box(x[0], x[1][0], x[1][1], height, width),
        (padded, offsets), fn_output_signature=frames.dtype)

  def op(frames):
    frames = tf.cast(frames, tf.float32) / 127.5 - 1.0
    if max_shift:
      frames = tf.ensure_shape(shift(frames + 1.0) - 1.0, frames.shape)
    return {"frames": frames}
  return op


# kind -> (op on one example inside tf.data, op on a numpy batch after it or None)
OPS = {"text": (text_op, text_batch_op), "audio": (audio_op, None),
       "video": (video_op, None)}


def _kind(modality_name, modality_config):
  kind = modality_config.kind
  if kind not in OPS:
    raise ValueError(f"config.modalities.{modality_name}.kind={kind!r}: expected one of "
                     f"{sorted(OPS)}")
  return kind


def get_op(modality_name, modality_config, train):
  return OPS[_kind(modality_name, modality_config)][0](modality_config, train)


def get_batch_op(modality_name, modality_config):
  batch_op = OPS[_kind(modality_name, modality_config)][1]
  return batch_op and batch_op(modality_config)


def preprocess_one(modality_name, modality_config, raw):
  """One raw value, as the dataset feature holds it (a string, int16 samples, uint8 frames),
  -> the tower's inputs with a batch dimension of 1: how a search query is prepared."""
  out = get_op(modality_name, modality_config, train=False)(tf.constant(raw))
  out = {k: np.asarray(v)[None] for k, v in out.items()}
  batch_op = get_batch_op(modality_name, modality_config)
  return batch_op(out) if batch_op else out
