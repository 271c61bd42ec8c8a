"""Tower options every tower shares: bfloat16 compute, float8 matmuls, rematerialization,
pooling choices; video as frames through an image tower; precomputed features."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmodal_jax.models import attention, audio, features, speech, text, vision

SMALL = dict(num_layers=2, num_heads=2, mlp_dim=32)


def vit(**kwargs):
  return vision.PatchTransformer(width=16, image_size=(8, 8), patch_size=4, **(SMALL | kwargs))


def towers_and_inputs(rng, **kwargs):
  ids = rng.integers(3, 50, size=(3, 6)).astype(np.int32)
  mask = np.array([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0]], np.int32)
  tokens = {"input_ids": ids, "attention_mask": mask}
  return [
      (vit(**kwargs), {"pixels": rng.normal(size=(3, 8, 8, 3)).astype(np.float32)}),
      (text.BertTextEncoder(vocab_size=50, width=16, **(SMALL | kwargs)), tokens),
      (text.CausalTextEncoder(vocab_size=50, width=16, eos_token_id=49, **(SMALL | kwargs)),
       tokens),
      (audio.SpectrogramTransformer(width=16, num_mels=16, max_frames=24, patch_size=8,
                                    patch_stride=(4, 4), **(SMALL | kwargs)),
       {"spectrogram": rng.normal(size=(3, 24, 16)).astype(np.float32)}),
      (features.FeatureEncoder(width=16, **(SMALL | kwargs)),
       {"features": rng.normal(size=(3, 5, 7)).astype(np.float32)}),
      (speech.SpeechTransformer(width=16, conv_channels=(8, 8), conv_kernels=(10, 4),
                                conv_strides=(5, 2), pos_conv_kernel=4, pos_conv_groups=2,
                                **(SMALL | kwargs)),
       {"waveform": rng.normal(size=(3, 400)).astype(np.float32)}),
  ]


def init_params(tower, inputs):
  return jax.jit(functools.partial(tower.init, train=False))(jax.random.key(0), inputs)["params"]


def pooled_and_grads(tower, params, inputs):
  """(pooled output, gradients of sum(pooled^2) with respect to params), jitted."""
  pooled = lambda p: tower.apply({"params": p}, inputs, train=False)["pooled"]
  loss = lambda p: jnp.sum(pooled(p).astype(jnp.float32) ** 2)
  return jax.jit(lambda p: (pooled(p), jax.grad(loss)(p)))(params)


def flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("index", range(6))
def test_trunk_options_keep_the_params_and_stay_close_to_float32(index):
  """Each tower with bfloat16 compute, remat and fp8 matmuls, against its float32 self on
  the same params: bfloat16 keeps float32 params and outputs within 5% of the largest;
  remat gives the same gradients (to float32 rounding of the largest); fp8
  (tests/test_fp8.py checks the rounding exactly) takes the same params, and its outputs and
  gradients are near float32's, yet not equal."""
  rng = np.random.default_rng(index)
  plain, inputs = towers_and_inputs(rng)[index]
  params = init_params(plain, inputs)
  out32, grads32 = pooled_and_grads(plain, params, inputs)

  tower16, _ = towers_and_inputs(rng, dtype=jnp.bfloat16)[index]
  params16 = jax.eval_shape(functools.partial(tower16.init, train=False), jax.random.key(0),
                            inputs)["params"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params16))
  out16 = jax.jit(functools.partial(tower16.apply, train=False))({"params": params},
                                                                 inputs)["pooled"]
  assert out16.dtype == jnp.bfloat16
  scale = float(jnp.abs(out32).max())
  assert float(jnp.abs(out16.astype(jnp.float32) - out32).max()) < 0.05 * scale

  remat, _ = towers_and_inputs(rng, remat=True)[index]
  # Float32 rounding is relative to the gradients that flow through the step: leaves whose
  # gradient nearly cancels (1e-5 under a final LayerNorm whose scale gets 27) keep an error
  # of that scale, and the order remat recomputes in may change it.
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads32))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6 * scale, rtol=1e-4),
               pooled_and_grads(remat, params, inputs)[1], grads32)

  low, _ = towers_and_inputs(rng, fp8=True)[index]
  assert (jax.tree.structure(jax.eval_shape(functools.partial(low.init, train=False),
                                            jax.random.key(0), inputs)["params"])
          == jax.tree.structure(params))
  out8, grads8 = pooled_and_grads(low, params, inputs)
  error = np.linalg.norm(out8 - out32) / np.linalg.norm(out32)
  assert 1e-3 < error < 0.2, error  # e4m3 keeps 3 mantissa bits: a few % per product
  g8, g32 = flat(grads8), flat(grads32)
  cosine = g8 @ g32 / np.linalg.norm(g8) / np.linalg.norm(g32)
  assert cosine > 0.9, cosine  # e5m2 gradients (2 mantissa bits) through 2 blocks


@pytest.mark.parametrize("pooling", ["cls", "mean", "gpo"])
def test_every_tower_pools_its_valid_tokens(pooling):
  """cls is the first token; mean is the NumPy mean of the valid tokens after the prefix;
  gpo gives [B, W]; dropout-free training mode matches eval."""
  rng = np.random.default_rng(2)
  for tower, inputs in towers_and_inputs(rng, pooling=pooling):
    variables = tower.init(jax.random.key(0), inputs, train=False)
    out = tower.apply(variables, inputs, train=False)
    tokens, valid = np.asarray(out["tokens"]), np.asarray(out["valid"])
    assert out["pooled"].shape == (3, 16)
    prefix = {vision.PatchTransformer: 1, audio.SpectrogramTransformer: 2,
              features.FeatureEncoder: 1}.get(type(tower), 0)
    if pooling == "cls":
      np.testing.assert_allclose(out["pooled"], tokens[:, 0], atol=1e-6)
    elif pooling == "mean":
      w = valid[:, prefix:, None]
      np.testing.assert_allclose(out["pooled"], (tokens[:, prefix:] * w).sum(1) / w.sum(1),
                                 atol=1e-5)


def test_frames_through_an_image_tower_with_temporal_mean():
  """Equals the image tower run on each frame separately, averaged over valid frames."""
  rng = np.random.default_rng(3)
  image = vit()
  video = vision.FrameVideoEncoder(image=image, num_frames=4, temporal="mean")
  frames = rng.normal(size=(2, 4, 8, 8, 3)).astype(np.float32)
  frame_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
  inputs = {"frames": frames, "frame_mask": frame_mask}
  params = video.init(jax.random.key(0), inputs, train=False)["params"]
  out = video.apply({"params": params}, inputs, train=False)["pooled"]
  for b in range(2):
    per_frame = [image.apply({"params": params["image"]}, {"pixels": frames[b, t:t + 1]},
                             train=False)["pooled"][0] for t in range(4) if frame_mask[b, t]]
    np.testing.assert_allclose(out[b], np.mean(per_frame, axis=0), atol=1e-5)


def test_temporal_transformer_ignores_masked_frames():
  rng = np.random.default_rng(4)
  video = vision.FrameVideoEncoder(image=vit(), num_frames=3, temporal="transformer",
                                   temporal_layers=1, temporal_heads=2)
  frames = rng.normal(size=(1, 3, 8, 8, 3)).astype(np.float32)
  inputs = {"frames": frames, "frame_mask": np.array([[1, 1, 0]], bool)}
  params = video.init(jax.random.key(0), inputs, train=False)["params"]
  changed = {"frames": frames.copy(), "frame_mask": inputs["frame_mask"]}
  changed["frames"][0, 2] = 5.0
  a = video.apply({"params": params}, inputs, train=False)
  b = video.apply({"params": params}, changed, train=False)
  np.testing.assert_allclose(a["pooled"], b["pooled"], atol=1e-5)
  assert a["tokens"].shape == (1, 3, 16)
  with pytest.raises(ValueError, match="num_frames=3"):
    video.apply({"params": params}, {"frames": frames[:, :2]}, train=False)


def test_feature_mlp_matches_numpy():
  rng = np.random.default_rng(5)
  tower = features.FeatureEncoder(width=4, num_layers=1, num_heads=1, mlp_dim=6)
  x = rng.normal(size=(3, 5)).astype(np.float32)
  p = tower.init(jax.random.key(0), {"features": x}, train=False)["params"]
  hidden = x @ p["hidden0"]["kernel"] + p["hidden0"]["bias"]
  hidden = np.asarray(jax.nn.gelu(hidden, approximate=False))
  expected = hidden @ p["output"]["kernel"] + p["output"]["bias"]
  out = tower.apply({"params": p}, {"features": x}, train=False)["pooled"]
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_spec_augment_masks_bands_of_at_most_the_given_width():
  spec = jnp.ones((64, 50, 20))
  out = np.asarray(audio.spec_augment(jax.random.key(0), spec, time_masks=2, time_width=6,
                                      freq_masks=1, freq_width=4))
  time_masked = (out == 0).all(axis=2)  # [B, frames]: whole frames set to the fill
  freq_masked = (out == 0).all(axis=1)  # [B, mels]
  assert time_masked.sum(axis=1).max() <= 12 and freq_masked.sum(axis=1).max() <= 4
  assert time_masked.any() and freq_masked.any()
  np.testing.assert_array_equal(out[out != 0], 1.0)  # nothing else changes
  assert (freq_masked.sum(axis=1) > 0).mean() > 0.5  # widths are drawn from 0..4
  unchanged = audio.spec_augment(jax.random.key(0), spec, time_masks=2, time_width=0,
                                 freq_masks=2, freq_width=0)
  np.testing.assert_array_equal(unchanged, spec)


def test_speech_time_masking_replaces_whole_spans_by_the_learned_vector():
  """wav2vec 2.0's training-time masking: about mask_time_prob * T / mask_time_length spans
  (here 5) of exactly mask_time_length frames per example, each set to masked_spec_embed."""
  tower = speech.SpeechTransformer(width=4, mask_time_prob=0.5, mask_time_length=4, **SMALL)
  frames = np.zeros((64, 40, 4), np.float32)
  out = np.asarray(tower.apply({}, frames, jnp.ones(4), method="mask_spans",
                               rngs={"dropout": jax.random.key(0)}))
  masked = (out == 1).all(axis=2)
  np.testing.assert_array_equal(out[~masked], 0.0)  # a frame is wholly masked or untouched
  counts = masked.sum(axis=1)
  assert counts.min() >= 4 and counts.max() <= 20 and len(set(counts)) > 1
  for row in masked:  # every run of masked frames is at least one span long
    edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]])))
    assert (np.diff(edges)[::2] >= 4).all()


def test_attention_impl_resolution_off_gpu():
  resolve = attention.resolve_attention_impl
  assert resolve("auto", jnp.bfloat16, 64) == ("cudnn" if jax.default_backend() == "gpu"
                                               else "xla")
  assert resolve("cudnn", jnp.float32, 64) == "xla"  # cuDNN's kernel: half precision only.
  assert resolve("cudnn", jnp.bfloat16, 64) == "cudnn"
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    resolve("flash", jnp.bfloat16, 64)
  with attention.target_platform("tpu"):  # compiling for TPU chips from this host
    assert resolve("auto", jnp.float32, 64) == resolve("auto", jnp.bfloat16, 128) == "pallas"
    assert resolve("auto", jnp.bfloat16, 192) == "xla"  # the kernel's head dims: <= 128 or k*128
    assert resolve("xla", jnp.bfloat16, 64) == "xla"


def test_pallas_attention_equals_numpy_and_xla_gradients(causal=True):
  """The Pallas TPU kernel, run in interpret mode on CPU, on a length that is not a whole
  number of its blocks (77 -> 128) with right padding and the causal mask: NumPy's attention
  where a query sees a valid key, and XLA attention's gradients."""
  pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 77, 2, 16)).astype(np.float32) for _ in range(3))
  valid = np.arange(77)[None] < np.array([[77], [30]])
  q_, k_, v_, valid_ = map(jnp.asarray, (q, k, v, valid))

  def loss(impl):
    return lambda *qkv: jnp.sum(attention.attention(
        *qkv, valid_, causal=causal, implementation=impl) * valid_[:, :, None, None] * v_)
  with pltpu.force_tpu_interpret_mode():
    out = attention.attention(q_, k_, v_, valid_, causal=causal, implementation="pallas")
    grads = jax.grad(loss("pallas"), argnums=(0, 1, 2))(q_, k_, v_)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
  allowed = valid[:, None, None, :] & (np.tril(np.ones((77, 77), bool)) if causal else True)
  weights = np.exp(np.where(allowed, logits, -np.inf) - logits.max(-1, keepdims=True))
  reference = np.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), v)
  np.testing.assert_allclose(np.asarray(out)[valid], reference[valid], atol=2e-5)
  expected = jax.grad(loss("xla"), argnums=(0, 1, 2))(q_, k_, v_)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, atol=2e-5)
