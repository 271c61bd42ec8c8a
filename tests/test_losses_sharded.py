"""Every loss mode (dense, gathered, blockwise, ring) against dense references, on 8 devices.

The references are written here from the formulas of docs/methods.md, independently of the library:
loops in NumPy for the values, a vectorized jax.numpy transcription for the gradients.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from xmodal_jax import losses

B, D = 48, 8  # 6 rows per device on 8 devices; block_size 4 leaves padded tiles.


def make_inputs(m, seed):
  rng = np.random.default_rng(seed)
  names = ["audio", "video", "text"][:m]
  emb = {}
  for name in names:
    x = rng.normal(size=(B, D))
    emb[name] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  masks = {name: rng.random(B) < 0.75 for name in names}
  return emb, masks


# ----- references ---------------------------------------------------------------------------

def ref_softmax_pair(a, b, s, ma, mb, xp):
  def direction(q, g, mq, mg):
    logits = s * q @ g.T
    logits = xp.where(mg[None, :], logits, -1e30)
    lse = jax.nn.logsumexp(logits, axis=1) if xp is jnp else (
        np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1))
    rows = mq & mg
    return xp.where(rows, lse - xp.diagonal(logits), 0.0).sum() / rows.sum()
  return (direction(a, b, ma, mb) + direction(b, a, mb, ma)) / 2


def ref_sigmoid_pair(a, b, s, bias, ma, mb, xp):
  logits = s * a @ b.T + bias
  y = 2 * xp.eye(len(a)) - 1
  log_sig = -xp.logaddexp(0.0, -y * logits)
  valid = ma[:, None] & mb[None, :]
  return -xp.where(valid, log_sig, 0.0).sum() / (ma & mb).sum()


def ref_regression_pair(a, b, ma, mb, target, margin, loss, balance, xp):
  sim = a @ b.T
  eye = xp.eye(len(a), dtype=bool)
  if target == "intra":
    has_a = ma[:, None] & ma[None, :]
    has_b = mb[:, None] & mb[None, :]
    sg = jax.lax.stop_gradient if xp is jnp else (lambda x: x)
    ia, ib = sg(a @ a.T), sg(b @ b.T)
    cnt = has_a * 1.0 + has_b * 1.0
    intra = (xp.where(has_a, ia, 0.0) + xp.where(has_b, ib, 0.0)) / xp.maximum(cnt, 1.0)
    off = xp.minimum(intra, 1 - margin)
  else:
    off = xp.zeros_like(sim)
  t = xp.where(eye, 1.0, off)
  d = sim - t
  err = d ** 2 if loss == "mse" else xp.where(xp.abs(d) < 1, 0.5 * d ** 2, xp.abs(d) - 0.5)
  valid = ma[:, None] & mb[None, :]
  n_diag = (valid & eye).sum()
  n_off = valid.sum() - n_diag
  w = xp.where(eye, n_off / n_diag if balance else 1.0, 1.0)
  return xp.where(valid, w * err, 0.0).sum() / xp.where(valid, w, 0.0).sum()


def reference(objective, emb, masks, s, bias, xp):
  terms = []
  for m, n in itertools.combinations(emb, 2):
    a, b, ma, mb = emb[m], emb[n], masks[m], masks[n]
    if objective == "softmax":
      terms.append(ref_softmax_pair(a, b, s, ma, mb, xp))
    elif objective == "sigmoid":
      terms.append(ref_sigmoid_pair(a, b, s, bias, ma, mb, xp))
    elif objective == "regression":
      terms.append(ref_regression_pair(a, b, ma, mb, "intra", 0.2, "mse", False, xp))
    else:
      terms.append(ref_regression_pair(a, b, ma, mb, "zero", 0.2, "smooth_l1", True, xp))
  return sum(terms) / len(terms)


def library_loss(objective, emb, masks, s, bias, **options):
  if objective == "softmax":
    return losses.contrastive_loss(emb, s, masks=masks, **options)[0]
  if objective == "sigmoid":
    return losses.contrastive_loss(emb, s, masks=masks, kind="sigmoid", bias=bias,
                                   **options)[0]
  if objective == "regression":
    return losses.similarity_regression_loss(emb, masks=masks, **options)[0]
  return losses.similarity_regression_loss(emb, masks=masks, target="zero",
                                           loss="smooth_l1", balance=True, **options)[0]


OBJECTIVES = ["softmax", "sigmoid", "regression", "regression_zero_balanced"]
MODES = [  # (impl, block_size, sharded)
    ("dense", None, False), ("blockwise", 5, False),
    ("dense", None, True),  # "gathered": local rows against all-gathered columns
    ("blockwise", 4, True), ("ring", 4, True), ("ring", None, True)]


def test_references_agree_with_rowwise_numpy():
  emb, masks = make_inputs(3, 0)
  emb64 = {k: v.astype(np.float64) for k, v in emb.items()}
  # softmax: the row-by-row loop of test_contrastive.py, written out once more here.
  for m, n in itertools.combinations(emb, 2):
    a, b, ma, mb = emb64[m], emb64[n], masks[m], masks[n]
    rows = []
    for q, g, mq, mg in ((a, b, ma, mb), (b, a, mb, ma)):
      terms = []
      for i in np.nonzero(mq & mg)[0]:
        cols = np.nonzero(mg)[0]
        z = 9.0 * g[cols] @ q[i]
        terms.append(np.log(np.exp(z - z.max()).sum()) + z.max() - 9.0 * g[i] @ q[i])
      rows.append(np.mean(terms))
    np.testing.assert_allclose(ref_softmax_pair(a, b, 9.0, ma, mb, np), np.mean(rows),
                               rtol=1e-10)
  for objective in OBJECTIVES:
    np.testing.assert_allclose(reference(objective, emb, masks, 9.0, -3.0, jnp),
                               reference(objective, emb64, masks, 9.0, -3.0, np), rtol=1e-5)


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("impl, block_size, sharded", MODES)
def test_loss_and_gradients_match_reference(m, objective, impl, block_size, sharded):
  assert jax.device_count() == 8
  emb, masks = make_inputs(m, seed=m)
  s, bias = np.float32(9.0), np.float32(-3.0)
  emb64 = {k: v.astype(np.float64) for k, v in emb.items()}
  expected = reference(objective, emb64, masks, 9.0, -3.0, np)

  options = dict(impl=impl, block_size=block_size)
  if sharded:
    mesh = Mesh(np.array(jax.devices()), ("data",))
    inner = functools.partial(library_loss, objective, **options, axis_name="data")
    fn = jax.shard_map(inner, mesh=mesh, in_specs=(P("data"), P("data"), P(), P()),
                       out_specs=P())
  else:
    fn = functools.partial(library_loss, objective, **options)
  value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 2, 3)))(emb, masks, s, bias)
  np.testing.assert_allclose(value, expected, rtol=2e-5)

  ref_grads = jax.grad(lambda e, s, b: reference(objective, e, masks, s, b, jnp),
                       argnums=(0, 1, 2))(emb, s, bias)
  for name in emb:
    np.testing.assert_allclose(grads[0][name], ref_grads[0][name], atol=2e-6, rtol=2e-4,
                               err_msg=name)
  np.testing.assert_allclose(grads[1], ref_grads[1], atol=2e-6, rtol=2e-4)
  np.testing.assert_allclose(grads[2], ref_grads[2], atol=2e-6, rtol=2e-4)


def test_blockwise_compiled_temp_memory_is_under_an_eighth_of_dense_at_16k():
  batch, dim = 16384, 512
  abstract = ({n: jax.ShapeDtypeStruct((batch, dim), np.float32) for n in ("a", "b")},
              jax.ShapeDtypeStruct((), np.float32))

  def temp_bytes(**options):
    fn = jax.value_and_grad(lambda e, s: losses.contrastive_loss(e, s, **options)[0],
                            argnums=(0, 1))
    return jax.jit(fn).lower(*abstract).compile().memory_analysis().temp_size_in_bytes

  dense = temp_bytes(impl="dense")
  blockwise = temp_bytes(impl="blockwise", block_size=256)
  assert dense > batch * batch * 4  # Dense holds at least one B x B float32 matrix.
  assert blockwise < dense / 8, (blockwise, dense)
