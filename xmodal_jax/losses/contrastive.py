"""N-way contrastive coordination (PCMC): a CLIP or SigLIP loss on every pair.

Every function here takes this device's rows. Inside `shard_map` with `axis_name`, rows are
scored against the whole global batch of the other modality and the value equals the
single-device value on the global batch; `impl` picks how the other modality's rows are seen
(parallel/streaming.py): all at once (dense), in tiles (blockwise) or around a ring.
"""

import functools

import jax
import jax.numpy as jnp

from xmodal_jax.losses import pairs
from xmodal_jax.parallel import streaming

KINDS = ("softmax", "sigmoid")


def check_options(*, kind, impl, has_bias=True, where=""):
  """Raises on options contrastive_loss does not take; `where` prefixes the field in errors
  ("config.loss." for a config)."""
  if kind not in KINDS:
    raise ValueError(f"{where}kind={kind!r}: expected one of {KINDS}")
  pairs.check_options(impl=impl, where=where)
  if kind == "sigmoid" and not has_bias:
    raise ValueError(f"{where}kind='sigmoid' needs a bias (SigLIP initializes it to -10)")


def softmax_rows_dense(q, g, scale, col_valid, *, axis_name):
  """Per row i of this device: (-log softmax_j(s q_i . g_j)[i] against all-gathered columns,
  whether i's positive scores top-1). col_valid: j has g's modality."""
  columns = streaming.gather({"emb": g, "valid": col_valid}, axis_name)
  logits = scale * q @ columns["emb"].T
  logits = jnp.where(columns["valid"][None, :], logits, streaming.neg_fill(q.dtype))
  positive = scale * jnp.sum(q * g, axis=-1)
  return jax.nn.logsumexp(logits, axis=-1) - positive, positive >= logits.max(axis=-1)


def softmax_direction_dense(q, g, scale, row_valid, col_valid, *, axis_name):
  """Sum over valid rows i of -log softmax_j(s q_i . g_j)[i] against all-gathered columns.

  q, g: this device's rows of the two modalities (row i of each is item i); row_valid: i has
  both; col_valid: j has g's modality. Returns (loss sum, number of correct top-1 rows).
  """
  losses, correct = softmax_rows_dense(q, g, scale, col_valid, axis_name=axis_name)
  return jnp.where(row_valid, losses, 0.0).sum(), (row_valid & correct).sum()


def sigmoid_rows_dense(a, b, scale, bias, valid_b, *, axis_name):
  """Per row i of this device: sum over valid columns j (all-gathered) of
  -log sigmoid(y_ij (s a_i . b_j + bias)), y = +1 iff i == j."""
  columns = streaming.gather({"emb": b, "valid": valid_b}, axis_name)
  rows = jnp.arange(a.shape[0]) + streaming.row_offset(a.shape[0], axis_name)
  logits = scale * a @ columns["emb"].T + bias
  labels = jnp.where(rows[:, None] == jnp.arange(logits.shape[1])[None, :], 1.0, -1.0)
  return jnp.where(columns["valid"][None, :], -jax.nn.log_sigmoid(labels * logits), 0.0).sum(1)


def _streamed_forward(a, b, scale, valid_a, valid_b, impl, block_size, axis_name):
  """Both directions of a pair's InfoNCE in one pass over column tiles.

  Each tile s A_local B_tile^T updates running log-sum-exps of this device's rows (a -> b)
  and of the tile's columns (b -> a, merged across devices). Returns the psum'd loss sum,
  the correct counts of both directions, and the residuals the backward pass needs.
  """
  fill = streaming.neg_fill(a.dtype)
  both = valid_a & valid_b

  def body(carry, tile, state, index):
    row_max, row_sum = carry
    valid = valid_a[:, None] & tile["valid"][None, :] & (index >= 0)[None, :]
    logits = jnp.where(valid, scale * a @ tile["emb"].T, fill)
    new_row_max = jnp.maximum(row_max, logits.max(axis=1))
    row_sum = (row_sum * jnp.exp(row_max - new_row_max)
               + jnp.exp(logits - new_row_max[:, None]).sum(axis=1))
    col_max = jnp.maximum(state["max"], logits.max(axis=0))
    col_sum = (state["sum"] * jnp.exp(state["max"] - col_max)
               + jnp.exp(logits - col_max[None, :]).sum(axis=0))
    return (new_row_max, row_sum), {"max": col_max, "sum": col_sum}

  def merge(state, axis_name):
    size_local = a.shape[0]
    best = jax.lax.pmax(state["max"], axis_name)
    total = jax.lax.psum(state["sum"] * jnp.exp(state["max"] - best), axis_name)
    start = streaming.row_offset(size_local, axis_name)
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size_local)
    return {"max": take(best), "sum": take(total)}

  rows = a.shape[0]
  init = (jnp.full((rows,), fill, a.dtype), jnp.zeros((rows,), a.dtype))
  state = {"max": jnp.full((rows,), fill, a.dtype), "sum": jnp.zeros((rows,), a.dtype)}
  (row_max, row_sum), col = streaming.fold_columns_with_state(
      body, init, {"emb": b, "valid": valid_b}, state, impl=impl, block_size=block_size,
      axis_name=axis_name, merge=merge)
  row_lse = row_max + jnp.log(row_sum)
  col_lse = col["max"] + jnp.log(col["sum"])
  positive = scale * jnp.sum(a * b, axis=-1)
  loss_sum = jnp.where(both, row_lse + col_lse - 2 * positive, 0.0).sum()
  correct_ab = (both & (positive >= row_max)).sum()
  correct_ba = (both & (positive >= col["max"])).sum()
  psum = lambda x: streaming.psum(x, axis_name)
  outputs = (psum(loss_sum), psum(correct_ab), psum(correct_ba))
  return outputs, (a, b, scale, valid_a, valid_b, row_lse, col_lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def softmax_pair_streamed(a, b, scale, valid_a, valid_b, impl, block_size, axis_name):
  """(global loss sum of both directions, correct a->b, correct b->a) of one pair, exact,
  holding only [local rows, block_size] logits at a time (impl: blockwise or ring)."""
  return _streamed_forward(a, b, scale, valid_a, valid_b, impl, block_size, axis_name)[0]


def _streamed_fwd(a, b, scale, valid_a, valid_b, impl, block_size, axis_name):
  return _streamed_forward(a, b, scale, valid_a, valid_b, impl, block_size, axis_name)


def _streamed_bwd(impl, block_size, axis_name, residuals, cotangents):
  a, b, scale, valid_a, valid_b, row_lse, col_lse = residuals
  g = cotangents[0]  # d total / d loss sum; the counts have no gradient.
  both = valid_a & valid_b

  def body(carry, tile, state, index):
    da, dscale = carry
    raw = a @ tile["emb"].T
    logits = scale * raw
    in_range = (index >= 0)[None, :]
    p_row = jnp.where(both[:, None] & tile["valid"][None, :] & in_range,
                      jnp.exp(logits - row_lse[:, None]), 0.0)
    p_col = jnp.where(valid_a[:, None] & tile["both"][None, :] & in_range,
                      jnp.exp(logits - tile["col_lse"][None, :]), 0.0)
    coeff = g * (p_row + p_col)
    da = da + scale * coeff @ tile["emb"]
    dscale = dscale + jnp.sum(coeff * raw)
    return (da, dscale), {"db": state["db"] + scale * coeff.T @ a}

  merge = lambda state, axis_name: {
      "db": jax.lax.psum_scatter(state["db"], axis_name, scatter_dimension=0, tiled=True)}
  gallery = {"emb": b, "valid": valid_b, "both": both, "col_lse": col_lse}
  init = (jnp.zeros_like(a), jnp.zeros((), a.dtype))
  (da, dscale), state = streaming.fold_columns_with_state(
      body, init, gallery, {"db": jnp.zeros_like(b)}, impl=impl, block_size=block_size,
      axis_name=axis_name, merge=merge)
  # The positives -s a_i . b_i appear once in each direction.
  weight = jnp.where(both, -2.0 * g, 0.0)[:, None]
  da = da + weight * scale * b
  db = state["db"] + weight * scale * a
  dscale = streaming.psum(dscale + jnp.sum(weight * a * b), axis_name)
  return da, db, dscale, None, None


softmax_pair_streamed.defvjp(_streamed_fwd, _streamed_bwd)


def sigmoid_pair(a, b, scale, bias, valid_a, valid_b, *, impl, block_size, axis_name):
  """Sum over valid (i, j) of -log sigmoid(y_ij (s a_i . b_j + bias)), y = +1 iff i == j."""
  rows = jnp.arange(a.shape[0]) + streaming.row_offset(a.shape[0], axis_name)

  def body(carry, tile, index):
    logits = scale * a @ tile["emb"].T + bias
    labels = jnp.where(rows[:, None] == index[None, :], 1.0, -1.0)
    valid = valid_a[:, None] & tile["valid"][None, :] & (index >= 0)[None, :]
    return carry + jnp.where(valid, -jax.nn.log_sigmoid(labels * logits), 0.0).sum()

  return streaming.fold_columns(body, jnp.zeros((), a.dtype), {"emb": b, "valid": valid_b},
                                impl=impl, block_size=block_size, axis_name=axis_name)


def contrastive_loss(embeddings, logit_scale, *, masks=None, pair_weights=None, kind="softmax",
                     bias=None, impl="dense", block_size=None, axis_name=None):
  """The (pair_weights-weighted) mean over all M(M-1)/2 modality pairs of a pair loss.

  Args:
    embeddings: {modality: float[B, D]}, L2-normalized; row i of each describes item i.
    logit_scale: the multiplier s itself (callers exponentiate their stored log): a scalar,
      or {"m-n": scalar} for one temperature per pair.
    masks: optional {modality: bool[B]}: which items have that modality. A term (i, j)
      counts only where i has the query modality and j the other; rows without their
      positive leave the mean, and a pair with no such row leaves the weighted mean.
    pair_weights: optional {"m-n": weight}; 1 for pairs not named.
    kind: "softmax": CLIP's (CE(s A B^T, I) + CE(s B A^T, I)) / 2;
      "sigmoid": SigLIP's -(1/n) sum_ij log sigmoid(y_ij (s A_i . B_j + bias)), n the number
      of items having both modalities.
    bias: the sigmoid bias (scalar or per pair); required for kind="sigmoid".
    impl, block_size: dense, blockwise (tiles of block_size columns) or ring.
    axis_name: the mesh axis the batch is split over, inside shard_map; None on one device.

  Returns:
    (loss, metrics): metrics["{m}-{n}/loss"] per pair and, for softmax, in-batch top-1
    accuracies metrics["{m}->{n}/accuracy"] per direction.
  """
  check_options(kind=kind, impl=impl, has_bias=bias is not None)
  options = dict(impl=impl, block_size=block_size, axis_name=axis_name)
  psum = lambda x: streaming.psum(x, axis_name)

  def pair_term(m, n, name, masks):
    scale = pairs.per_pair(logit_scale, name)
    a, b = embeddings[m], embeddings[n]
    both = masks[m] & masks[n]
    count = psum(both.sum())
    denom = jnp.maximum(count, 1)
    metrics = {}
    if kind == "sigmoid":
      loss = psum(sigmoid_pair(a, b, scale, pairs.per_pair(bias, name), masks[m], masks[n],
                               **options)) / denom
    else:
      if impl == "dense":
        sum_mn, correct_mn = softmax_direction_dense(a, b, scale, both, masks[n],
                                                     axis_name=axis_name)
        sum_nm, correct_nm = softmax_direction_dense(b, a, scale, both, masks[m],
                                                     axis_name=axis_name)
        loss_sum, correct_mn, correct_nm = (psum(sum_mn + sum_nm), psum(correct_mn),
                                            psum(correct_nm))
      else:
        loss_sum, correct_mn, correct_nm = softmax_pair_streamed(
            a, b, scale, masks[m], masks[n], impl, block_size, axis_name)
      loss = loss_sum / (2 * denom)
      metrics[f"{m}->{n}/accuracy"] = correct_mn / denom
      metrics[f"{n}->{m}/accuracy"] = correct_nm / denom
    metrics[f"{name}/loss"] = loss
    return loss, count, metrics

  return pairs.mean_over_pairs("contrastive_loss", embeddings, masks, pair_weights, impl,
                               pair_term)


def source_losses(embeddings, logit_scale, source, *, masks, pair_weights=None,
                  kind="softmax", bias=None, axis_name=None):
  """The contrastive loss of each mixture source's rows (a metric: which source the loss
  comes from): float[S], for source s the pair_weights-weighted mean of l_i,mn over its rows
  i and the pairs (m, n) that i has, l_i,mn being row i's term of the pair loss against
  every column of the global batch (softmax: its two directions' mean; sigmoid: its row of
  terms). `source`: bool[B, S], each row's source one-hot. Dense: columns all-gathered."""
  masks = pairs.normalize_masks(embeddings, masks)
  source = source.astype(jnp.float32)
  total = jnp.zeros(source.shape[1])
  weight_sum = jnp.zeros(source.shape[1])
  for m, n in pairs.modality_pairs(list(embeddings)):
    name = pairs.pair_name(m, n)
    scale = pairs.per_pair(logit_scale, name)
    a, b = embeddings[m], embeddings[n]
    if kind == "sigmoid":
      rows = sigmoid_rows_dense(a, b, scale, pairs.per_pair(bias, name), masks[n],
                                axis_name=axis_name)
    else:
      rows = (softmax_rows_dense(a, b, scale, masks[n], axis_name=axis_name)[0]
              + softmax_rows_dense(b, a, scale, masks[m], axis_name=axis_name)[0]) / 2
    both = (masks[m] & masks[n]).astype(jnp.float32)
    weight = (pair_weights or {}).get(name, 1.0)
    total += weight * (jnp.where(both > 0, rows, 0.0) @ source)
    weight_sum += weight * (both @ source)
  total, weight_sum = streaming.psum(total, axis_name), streaming.psum(weight_sum, axis_name)
  return total / jnp.maximum(weight_sum, 1e-12)
