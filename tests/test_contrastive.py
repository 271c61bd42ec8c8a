"""contrastive_loss against dense NumPy formulas written independently of it."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmodal_jax import losses, schema


def normalized(rng, b, d):
  x = rng.normal(size=(b, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def log_softmax(x):
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def clip_loss(a, b, s):
  """CLIP's symmetric InfoNCE: (CE(s A B^T, I) + CE(s B A^T, I)) / 2."""
  logits = s * a.astype(np.float64) @ b.T.astype(np.float64)
  ce_ab = -np.mean(np.diag(log_softmax(logits)))
  ce_ba = -np.mean(np.diag(log_softmax(logits.T)))
  return (ce_ab + ce_ba) / 2


def masked_direction(q, g, s, mq, mg):
  """Per-row loop: rows whose item has both modalities, softmax over items having g."""
  terms = []
  for i in range(len(q)):
    if not (mq[i] and mg[i]):
      continue
    cols = np.nonzero(mg)[0]
    logits = s * (g[cols].astype(np.float64) @ q[i].astype(np.float64))
    logits -= logits.max()
    terms.append(-(logits[list(cols).index(i)] - np.log(np.exp(logits).sum())))
  return np.mean(terms) if terms else None


def test_two_modalities_equal_clip_symmetric_infonce():
  rng = np.random.default_rng(0)
  a, b = normalized(rng, 16, 8), normalized(rng, 16, 8)
  loss, metrics = losses.contrastive_loss({"image": a, "text": b}, 14.3)
  np.testing.assert_allclose(loss, clip_loss(a, b, 14.3), rtol=1e-5)
  np.testing.assert_allclose(metrics["image-text/loss"], loss, rtol=1e-6)


def test_three_modalities_average_all_pairs_with_weights():
  rng = np.random.default_rng(1)
  emb = {m: normalized(rng, 12, 6) for m in ("audio", "video", "text")}
  weights = {"audio-video": 2.0, "audio-text": 0.5}
  loss, _ = losses.contrastive_loss(emb, 10.0, pair_weights=weights)
  terms = [(weights.get(f"{m}-{n}", 1.0), clip_loss(emb[m], emb[n], 10.0))
           for m, n in itertools.combinations(emb, 2)]
  expected = sum(w * l for w, l in terms) / sum(w for w, _ in terms)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_per_pair_temperatures():
  rng = np.random.default_rng(2)
  emb = {m: normalized(rng, 8, 4) for m in ("a", "b", "c")}
  scales = {"a-b": 5.0, "a-c": 20.0, "b-c": 1.0}
  loss, _ = losses.contrastive_loss(emb, scales)
  expected = np.mean([clip_loss(emb[m], emb[n], scales[f"{m}-{n}"])
                      for m, n in itertools.combinations(emb, 2)])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_masks_match_rowwise_reference():
  rng = np.random.default_rng(3)
  emb = {m: normalized(rng, 20, 8) for m in ("audio", "video", "text")}
  masks = {m: rng.random(20) < 0.7 for m in emb}
  loss, metrics = losses.contrastive_loss(emb, 7.0, masks=masks)
  pair_losses = []
  for m, n in itertools.combinations(emb, 2):
    mn = masked_direction(emb[m], emb[n], 7.0, masks[m], masks[n])
    nm = masked_direction(emb[n], emb[m], 7.0, masks[n], masks[m])
    pair_losses.append((mn + nm) / 2)
    np.testing.assert_allclose(metrics[f"{m}-{n}/loss"], (mn + nm) / 2, rtol=1e-5)
  np.testing.assert_allclose(loss, np.mean(pair_losses), rtol=1e-5)


def test_absent_modality_leaves_the_mean_without_nan():
  rng = np.random.default_rng(4)
  emb = {m: normalized(rng, 10, 8) for m in ("audio", "video", "text")}
  masks = {"audio": np.ones(10, bool), "video": np.zeros(10, bool), "text": np.ones(10, bool)}
  loss_fn = lambda e: losses.contrastive_loss(e, 10.0, masks=masks)[0]
  loss, grads = jax.value_and_grad(loss_fn)(emb)
  np.testing.assert_allclose(loss, clip_loss(emb["audio"], emb["text"], 10.0), rtol=1e-5)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(g))
  np.testing.assert_array_equal(grads["video"], 0.0)


def test_gradient_matches_finite_differences():
  rng = np.random.default_rng(5)
  a, b = normalized(rng, 6, 4).astype(np.float64), normalized(rng, 6, 4).astype(np.float64)
  with jax.enable_x64():
    grad = jax.grad(lambda x: losses.contrastive_loss({"a": x, "b": jnp.asarray(b)}, 3.0)[0])(
        jnp.asarray(a))
  eps, numeric = 1e-6, np.zeros_like(a)
  for idx in np.ndindex(a.shape):
    plus, minus = a.copy(), a.copy()
    plus[idx] += eps
    minus[idx] -= eps
    numeric[idx] = (clip_loss(plus, b, 3.0) - clip_loss(minus, b, 3.0)) / (2 * eps)
  np.testing.assert_allclose(grad, numeric, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"kind": "hinge"}, {"impl": "sparse"}])
def test_unknown_options_are_rejected_by_name(kwargs):
  rng = np.random.default_rng(6)
  emb = {m: normalized(rng, 4, 4) for m in ("a", "b")}
  with pytest.raises(ValueError, match=list(kwargs)[0]):
    losses.contrastive_loss(emb, 1.0, **kwargs)


def test_per_pair_temperatures_refuse_objectives_with_one_temperature():
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  config = audio_video_text.get_config("tiny,align_fuse")
  config.model.per_pair_temperature = True
  with pytest.raises(ValueError, match=r"per_pair_temperature=True: objectives \['ims', "
                     r"'itc', 'itm', 'lmim'\] take one temperature"):
    schema.resolve(config, jax.device_count())


def test_a_loaded_clip_scale_goes_to_every_pair():
  from xmodal_jax.models import towers  # pylint: disable=g-import-not-at-top
  params = {"logit_scale": {"image-text": np.float32(0.0), "audio-image": np.float32(0.0)}}
  loaded = towers.insert_pretrained(params, {(): {"logit_scale": np.float32(4.6)}})
  assert loaded["logit_scale"] == {"image-text": 4.6, "audio-image": 4.6}
