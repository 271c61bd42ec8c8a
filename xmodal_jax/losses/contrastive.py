"""N-way contrastive coordination (seed 000, PCMC): CLIP's symmetric InfoNCE on all pairs."""

import itertools

import jax
import jax.numpy as jnp

IMPLS = ("dense",)
KINDS = ("softmax",)


def modality_pairs(modalities):
  """All unordered pairs (m, n), m before n in the given order."""
  return list(itertools.combinations(modalities, 2))


def pair_name(m, n):
  return f"{m}-{n}"


def _masked_cross_entropy(logits, row_valid, col_valid):
  """Mean over valid rows of -log softmax(logits)[i, i], softmax over valid columns only.

  Returns (mean loss, mean accuracy, number of valid rows).
  """
  # A finite fill keeps rows with no valid column (and their gradients) free of NaN.
  logits = jnp.where(col_valid[None, :], logits, -1e9)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  diagonal = jnp.diagonal(log_probs)
  count = row_valid.sum()
  denom = jnp.maximum(count, 1)
  loss = -jnp.where(row_valid, diagonal, 0.0).sum() / denom
  correct = jnp.argmax(logits, axis=-1) == jnp.arange(logits.shape[0])
  accuracy = jnp.where(row_valid, correct, False).sum() / denom
  return loss, accuracy, count


def contrastive_loss(embeddings, logit_scale, *, masks=None, pair_weights=None, kind="softmax",
                     bias=None, impl="dense", block_size=None, axis_name=None):
  """CLIP's symmetric InfoNCE averaged over all M(M-1)/2 modality pairs.

  Args:
    embeddings: {modality: float[B, D]}, L2-normalized; every modality has the same B rows,
      row i of each describing item i.
    logit_scale: the multiplier s itself (callers exponentiate their stored log), a scalar or
      {"m-n": scalar} for one temperature per pair.
    masks: optional {modality: bool[B]}: which items have that modality. A pair term (i, j)
      counts only where i has the query modality and j the other; rows without their
      positive leave the mean, and a pair with no valid row leaves the weighted mean.
    pair_weights: optional {"m-n": weight}; default 1 for every pair.
    kind, bias, impl, block_size, axis_name: see DESIGN.md; this version has kind="softmax",
      impl="dense" on one device (the objectives issue adds the others).

  Returns:
    (loss, metrics) with metrics["{m}-{n}/loss"] and in-batch top-1 accuracies
    metrics["{m}->{n}/accuracy"] per pair and direction.
  """
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
  if axis_name is not None or block_size is not None or bias is not None:
    raise ValueError("axis_name, block_size and bias are not supported by impl='dense' "
                     "on one device yet")
  modalities = list(embeddings)
  if len(modalities) < 2:
    raise ValueError(f"contrastive_loss needs at least 2 modalities, got {modalities}")
  batch = embeddings[modalities[0]].shape[0]
  masks = masks or {}
  masks = {m: jnp.asarray(masks.get(m, jnp.ones((batch,), bool)), bool) for m in modalities}
  pair_weights = pair_weights or {}

  metrics, total, weight_sum = {}, 0.0, 0.0
  for m, n in modality_pairs(modalities):
    name = pair_name(m, n)
    scale = logit_scale[name] if isinstance(logit_scale, dict) else logit_scale
    logits = scale * embeddings[m] @ embeddings[n].T
    both = masks[m] & masks[n]
    loss_mn, acc_mn, count = _masked_cross_entropy(logits, both, masks[n])
    loss_nm, acc_nm, _ = _masked_cross_entropy(logits.T, both, masks[m])
    loss = (loss_mn + loss_nm) / 2
    weight = jnp.where(count > 0, pair_weights.get(name, 1.0), 0.0)
    total += weight * loss
    weight_sum += weight
    metrics[f"{name}/loss"] = loss
    metrics[f"{m}->{n}/accuracy"] = acc_mn
    metrics[f"{n}->{m}/accuracy"] = acc_nm
  return total / jnp.maximum(weight_sum, 1e-12), metrics
