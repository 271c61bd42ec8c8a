"""N-way contrastive coordination (seed 000, PCMC): a CLIP or SigLIP loss on every pair.

Every function here takes this device's rows. Inside `shard_map` with `axis_name`, rows are
scored against the whole global batch of the other modality and the value equals the
single-device value on the global batch; `impl` picks how the other modality's rows are seen
(parallel/streaming.py): all at once (dense), in tiles (blockwise) or around a ring.
"""

import itertools

import jax
import jax.numpy as jnp

from xmodal_jax.parallel import streaming

KINDS = ("softmax", "sigmoid")
IMPLS = streaming.IMPLS


def modality_pairs(modalities):
  """All unordered pairs (m, n), m before n in the given order."""
  return list(itertools.combinations(modalities, 2))


def pair_name(m, n):
  return f"{m}-{n}"


def per_pair(value, name):
  """A scalar, or a {pair name: scalar} mapping's entry for `name`."""
  if isinstance(value, dict) or hasattr(value, "items"):
    if name not in value:
      raise ValueError(f"no value for pair {name!r} in {sorted(value)}")
    return value[name]
  return value


def normalize_masks(embeddings, masks):
  batch = jax.tree.leaves(embeddings)[0].shape[0]
  masks = masks or {}
  unknown = set(masks) - set(embeddings)
  if unknown:
    raise ValueError(f"masks name modalities {sorted(unknown)} that have no embeddings")
  return {m: (jnp.ones((batch,), bool) if masks.get(m) is None else
              jnp.asarray(masks[m], bool)) for m in embeddings}


def softmax_direction(q, g, scale, row_valid, col_valid, *, impl, block_size, axis_name):
  """Sum over valid rows i of -log softmax_j(s q_i . g_j)[i], softmax over valid columns.

  q, g: this device's rows of the two modalities (row i of each is item i); row_valid: i has
  both; col_valid: j has g's modality. Returns (loss sum, number of correct top-1 rows).
  """
  fill = streaming.neg_fill(q.dtype)
  positive = scale * jnp.sum(q * g, axis=-1)
  gallery = {"emb": g, "valid": col_valid}

  def logits_of(q, scale, tile, index):
    logits = scale * q @ tile["emb"].T
    return jnp.where(tile["valid"][None, :] & (index >= 0)[None, :], logits, fill)

  if impl == "dense":
    columns = streaming.gather(gallery, axis_name)
    logits = logits_of(q, scale, columns, jnp.arange(columns["valid"].shape[0]))
    lse = jax.nn.logsumexp(logits, axis=-1)
    best = logits.max(axis=-1)
    loss_sum = jnp.where(row_valid, lse - positive, 0.0).sum()
  else:
    sg_q, sg_scale = jax.lax.stop_gradient(q), jax.lax.stop_gradient(scale)

    def max_and_sum(carry, tile, index):  # Running log-sum-exp, no gradient needed.
      best, total = carry
      logits = logits_of(sg_q, sg_scale, tile, index)
      new_best = jnp.maximum(best, logits.max(axis=-1))
      total = total * jnp.exp(best - new_best) + jnp.exp(logits - new_best[:, None]).sum(-1)
      return new_best, total

    init = (jnp.full(q.shape[:1], fill, q.dtype), jnp.zeros(q.shape[:1], q.dtype))
    best, total = streaming.fold_columns(max_and_sum, init, jax.lax.stop_gradient(gallery),
                                         impl=impl, block_size=block_size,
                                         axis_name=axis_name)
    lse = best + jnp.log(total)

    def softmax_mass(carry, tile, index):
      # Value 1 per valid row; its gradient is d lse / d logits, exactly.
      logits = logits_of(q, scale, tile, index)
      mass = jnp.exp(logits - lse[:, None])
      return carry + jnp.where(row_valid[:, None], mass, 0.0).sum()

    mass = streaming.fold_columns(softmax_mass, jnp.zeros((), q.dtype), gallery, impl=impl,
                                  block_size=block_size, axis_name=axis_name)
    loss_sum = (jnp.where(row_valid, lse - positive, 0.0).sum()
                + mass - jax.lax.stop_gradient(mass))
  correct = (row_valid & (positive >= best)).sum()
  return loss_sum, correct


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
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
  if kind == "sigmoid" and bias is None:
    raise ValueError("kind='sigmoid' needs a bias (SigLIP initializes it to -10)")
  modalities = list(embeddings)
  if len(modalities) < 2:
    raise ValueError(f"contrastive_loss needs at least 2 modalities, got {modalities}")
  masks = normalize_masks(embeddings, masks)
  pair_weights = pair_weights or {}
  options = dict(impl=impl, block_size=block_size, axis_name=axis_name)
  psum = lambda x: streaming.psum(x, axis_name)

  metrics, total, weight_sum = {}, 0.0, 0.0
  for m, n in modality_pairs(modalities):
    name = pair_name(m, n)
    scale = per_pair(logit_scale, name)
    a, b = embeddings[m], embeddings[n]
    both = masks[m] & masks[n]
    count = psum(both.sum())
    denom = jnp.maximum(count, 1)
    if kind == "softmax":
      sum_mn, correct_mn = softmax_direction(a, b, scale, both, masks[n], **options)
      sum_nm, correct_nm = softmax_direction(b, a, scale, both, masks[m], **options)
      loss = (psum(sum_mn) + psum(sum_nm)) / (2 * denom)
      metrics[f"{m}->{n}/accuracy"] = psum(correct_mn) / denom
      metrics[f"{n}->{m}/accuracy"] = psum(correct_nm) / denom
    else:
      loss = psum(sigmoid_pair(a, b, scale, per_pair(bias, name), masks[m], masks[n],
                               **options)) / denom
    weight = jnp.where(count > 0, pair_weights.get(name, 1.0), 0.0)
    total += weight * loss
    weight_sum += weight
    metrics[f"{name}/loss"] = loss
  return total / jnp.maximum(weight_sum, 1e-12), metrics
