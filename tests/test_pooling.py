"""GPO against a direct NumPy implementation of VSE-infinity's algorithm; cls/mean pooling."""

import jax
import jax.numpy as jnp
import numpy as np

from xmodal_jax.models import pooling


def np_encoding(n, dim=32):
  pe = np.zeros((n, dim))
  for pos in range(n):
    for i in range(0, dim, 2):
      angle = pos / 10000 ** (i / dim)
      pe[pos, i], pe[pos, i + 1] = np.sin(angle), np.cos(angle)
  return pe


def np_gru(params, xs):
  """Runs a GRU over xs [n, in]: r, z gates; n = tanh(W_in x + r * (W_hn h + b)); h = (1-z)n+zh."""
  sig = lambda v: 1 / (1 + np.exp(-v))
  dense = lambda name, v: v @ np.asarray(params[name]["kernel"]) + (
      np.asarray(params[name]["bias"]) if "bias" in params[name] else 0.0)
  h, out = np.zeros(params["hr"]["kernel"].shape[0]), []
  for x in xs:
    r = sig(dense("ir", x) + dense("hr", h))
    z = sig(dense("iz", x) + dense("hz", h))
    cand = np.tanh(dense("in", x) + r * dense("hn", h))
    h = (1 - z) * cand + z * h
    out.append(h)
  return np.array(out)


def np_gpo(params, features, n, temperature=0.1):
  """One set: the first n rows of features [K, D] are the elements."""
  pe = np_encoding(n)
  forward = np_gru(params["GRUCell_0"], pe)
  backward = np_gru(params["GRUCell_1"], pe[::-1])[::-1]
  scores = ((forward + backward) / 2) @ np.asarray(params["score"]["kernel"])[:, 0]
  weights = np.exp(scores / temperature - (scores / temperature).max())
  weights /= weights.sum()
  ordered = -np.sort(-features[:n], axis=0)
  return weights @ ordered, weights


def test_gpo_matches_numpy_and_ignores_padding():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(3, 7, 5)).astype(np.float32)
  lengths = np.array([7, 4, 1])
  valid = np.arange(7)[None, :] < lengths[:, None]
  gpo = pooling.GPO()
  variables = gpo.init(jax.random.key(1), features, valid, train=False)
  # Scale the score layer so the weights are far from uniform.
  variables["params"]["score"]["kernel"] = variables["params"]["score"]["kernel"] * 20
  pooled, weights = gpo.apply(variables, features, valid, train=False)
  for b, n in enumerate(lengths):
    expected, expected_weights = np_gpo(variables["params"], features[b].astype(np.float64), n)
    np.testing.assert_allclose(pooled[b], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(weights[b, :n], expected_weights, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(weights[b, n:]) == 0)
  # Padding values never matter.
  noisy = features.copy()
  noisy[~valid] = 1e6
  np.testing.assert_allclose(gpo.apply(variables, noisy, valid, train=False)[0], pooled)


def test_gpo_with_fixed_weights_reduces_to_max_and_mean():
  rng = np.random.default_rng(2)
  features = rng.normal(size=(2, 6, 4)).astype(np.float32)
  valid = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], bool)
  ordered = pooling.sort_descending(jnp.asarray(features), jnp.asarray(valid))
  first = np.where(np.arange(6) == 0, 1.0, 0.0)
  as_max = jnp.einsum("l,blw->bw", first, ordered)
  np.testing.assert_allclose(as_max[0], features[0].max(axis=0))
  np.testing.assert_allclose(as_max[1], features[1, :3].max(axis=0))
  uniform = valid / valid.sum(axis=1, keepdims=True)
  as_mean = jnp.einsum("bl,blw->bw", uniform, ordered)
  np.testing.assert_allclose(as_mean[0], features[0].mean(axis=0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(as_mean[1], features[1, :3].mean(axis=0), rtol=1e-6, atol=1e-6)


def test_gpo_set_size_dropout_keeps_at_least_one_and_changes_sets():
  features = np.random.default_rng(3).normal(size=(64, 5, 3)).astype(np.float32)
  valid = np.ones((64, 5), bool)
  gpo = pooling.GPO(drop_rate=0.9)
  variables = gpo.init(jax.random.key(0), features, valid, train=False)
  _, weights = gpo.apply(variables, features, valid, train=True,
                         rngs={"dropout": jax.random.key(4)})
  sizes = (np.asarray(weights) > 0).sum(axis=1)
  assert sizes.min() >= 1 and len(set(sizes.tolist())) > 1


def test_cls_and_mean_pooling():
  x = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
  valid = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  cls = pooling.Pool("cls").apply({}, x, valid, train=False)
  np.testing.assert_array_equal(cls, x[:, 0])
  mean = pooling.Pool("mean").apply({}, x, valid, train=False)
  np.testing.assert_allclose(mean[0], x[0, 1:3].mean(axis=0))
  np.testing.assert_allclose(mean[1], x[1, 1:].mean(axis=0))
