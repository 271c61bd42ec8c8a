"""Towers and the multi-modal model: frontend numbers, masking, shapes, normalization."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from transformers import audio_utils

from xmodal_jax import schema
from xmodal_jax.data.builders import digit_sequences
from xmodal_jax.models import audio, towers


def test_log_mel_matches_transformers_on_a_real_recording():
  x, rate = digit_sequences.read_wav(
      os.path.join(digit_sequences.ASSETS_DIR, "audio", "en", "7.wav"))
  ours = audio.LogMel(sample_rate=rate, fft_length=256, hop_length=160, num_mels=40,
                      fmin=20.0)(jnp.asarray(x)[None])[0]
  filters = audio_utils.mel_filter_bank(
      num_frequency_bins=129, num_mel_filters=40, min_frequency=20.0, max_frequency=rate / 2,
      sampling_rate=rate, norm=None, mel_scale="htk")
  reference = audio_utils.spectrogram(
      x.astype(np.float64), audio_utils.window_function(256, "hann"), frame_length=256,
      hop_length=160, fft_length=256, power=2.0, center=False, mel_filters=filters,
      mel_floor=1e-6, log_mel="log").T
  assert ours.shape == reference.shape
  np.testing.assert_allclose(ours, reference, atol=2e-3)


def tiny_model():
  tower = lambda name, **kw: dict(name=name, width=16, num_layers=1, num_heads=2, mlp_dim=32,
                                  **kw)
  config = schema.defaults().model
  config.update(embed_dim=8, towers=dict(
      audio=tower("audio_transformer", sample_rate=8000, patch_frames=4),
      video=tower("video_transformer", patch_size=4),
      text=tower("text_transformer")))
  model, pretrained = towers.build_model(config, vocab_sizes={"text": 20})
  assert not pretrained
  return model


def example_batch(rng, b=3):
  return {
      "audio": {"waveform": rng.normal(size=(b, 4000)).astype(np.float32)},
      "video": {"frames": rng.normal(size=(b, 4, 8, 8, 1)).astype(np.float32)},
      "text": {"input_ids": rng.integers(4, 20, size=(b, 6)).astype(np.int32),
               "attention_mask": np.array([[1, 1, 1, 1, 0, 0]] * b, np.int32)},
  }


def test_embeddings_are_normalized_per_modality():
  model = tiny_model()
  batch = example_batch(np.random.default_rng(0))
  variables = model.init(jax.random.key(0), batch, train=False)
  out = model.apply(variables, batch, train=False)
  assert set(out) == {"audio", "video", "text"}
  for emb in out.values():
    assert emb.shape == (3, 8) and emb.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(variables["params"]["logit_scale"], np.log(1 / 0.07), rtol=1e-6)


def test_text_padding_does_not_change_the_embedding():
  model = tiny_model()
  batch = example_batch(np.random.default_rng(1))
  variables = model.init(jax.random.key(0), batch, train=False)
  other = jax.tree.map(np.copy, batch)
  other["text"]["input_ids"][:, 4:] = 7  # Different tokens where attention_mask is 0.
  a = model.apply(variables, batch, train=False)["text"]
  b = model.apply(variables, other, train=False)["text"]
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_audio_embedding_ignores_recording_gain():
  model = tiny_model()
  batch = example_batch(np.random.default_rng(2))
  variables = model.init(jax.random.key(0), batch, train=False)
  louder = jax.tree.map(np.copy, batch)
  louder["audio"]["waveform"] *= 3.0
  np.testing.assert_allclose(model.apply(variables, batch, train=False)["audio"],
                             model.apply(variables, louder, train=False)["audio"], atol=1e-4)


def test_unknown_tower_name_is_named():
  config = ml_collections.ConfigDict(dict(embed_dim=4, towers=dict(x=dict(name="nope"))))
  try:
    towers.build_model(config)
  except ValueError as e:
    assert "config.model.towers.x.name='nope'" in str(e)
  else:
    raise AssertionError("no error")
