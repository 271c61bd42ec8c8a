"""Similarity regression (seed 000, PCMR): regress cross-modal similarities to a target.

For a pair (m, n), S_ij = z_m,i . z_n,j is regressed to T_ii = 1 and, for i != j,
T_ij = min(sg((Z_m Z_m^T + Z_n Z_n^T) / 2)_ij, 1 - margin) (target="intra") or 0 ("zero").
"""

import jax
import jax.numpy as jnp

from xmodal_jax.losses.contrastive import modality_pairs, normalize_masks, pair_name
from xmodal_jax.parallel import streaming

TARGETS = ("intra", "zero")
LOSSES = ("mse", "smooth_l1")


def elementwise_error(diff, loss):
  if loss == "mse":
    return diff ** 2
  abs_diff = jnp.abs(diff)  # smooth L1 with beta = 1, as torch's default
  return jnp.where(abs_diff < 1.0, 0.5 * diff ** 2, abs_diff - 0.5)


def regression_pair(za, zb, valid_a, valid_b, diagonal_weight, *, target, margin, loss, impl,
                    block_size, axis_name):
  """Sum over valid (i, j) (i has a, j has b) of w_ij * err(S_ij - T_ij).

  With masks, the "intra" target averages the within-modality similarities that exist for
  (i, j) (a's needs j to have a, b's needs i to have b), and is 0 when neither does.
  """
  rows = jnp.arange(za.shape[0]) + streaming.row_offset(za.shape[0], axis_name)
  sg_za, sg_zb = jax.lax.stop_gradient(za), jax.lax.stop_gradient(zb)

  def body(carry, tile, index):
    sim = za @ tile["b"].T
    diagonal = rows[:, None] == index[None, :]
    if target == "intra":
      intra_a = sg_za @ tile["a"].T
      intra_b = sg_zb @ tile["b_sg"].T
      has_a = tile["valid_a"][None, :] & valid_a[:, None]
      has_b = valid_b[:, None] & tile["valid_b"][None, :]
      count = has_a.astype(za.dtype) + has_b.astype(za.dtype)
      intra = (jnp.where(has_a, intra_a, 0.0) + jnp.where(has_b, intra_b, 0.0)) / jnp.maximum(
          count, 1.0)
      off_target = jnp.minimum(intra, 1.0 - margin)
    else:
      off_target = jnp.zeros_like(sim)
    goal = jnp.where(diagonal, 1.0, off_target)
    weight = jnp.where(diagonal, diagonal_weight, 1.0)
    valid = valid_a[:, None] & tile["valid_b"][None, :] & (index >= 0)[None, :]
    return carry + jnp.where(valid, weight * elementwise_error(sim - goal, loss), 0.0).sum()

  gallery = {"a": sg_za, "b": zb, "b_sg": sg_zb, "valid_a": valid_a, "valid_b": valid_b}
  return streaming.fold_columns(body, jnp.zeros((), za.dtype), gallery, impl=impl,
                                block_size=block_size, axis_name=axis_name)


def similarity_regression_loss(embeddings, *, masks=None, target="intra", margin=0.2,
                               loss="mse", balance=False, pair_weights=None, impl="dense",
                               block_size=None, axis_name=None):
  """The (pair_weights-weighted) mean over modality pairs of the mean regression error.

  Each pair's error is averaged over the (i, j) where item i has m and item j has n. With
  `balance`, diagonal terms weigh (number of off-diagonal terms / number of diagonal terms),
  B - 1 without masks, so matches and non-matches count equally. Arguments as in
  contrastive_loss. Returns (loss, {"{m}-{n}/regression": per-pair loss}).
  """
  if target not in TARGETS:
    raise ValueError(f"target={target!r}: expected one of {TARGETS}")
  if loss not in LOSSES:
    raise ValueError(f"loss={loss!r}: expected one of {LOSSES}")
  if impl not in streaming.IMPLS:
    raise ValueError(f"impl={impl!r}: expected one of {streaming.IMPLS}")
  modalities = list(embeddings)
  if len(modalities) < 2:
    raise ValueError(f"similarity_regression_loss needs at least 2 modalities, got "
                     f"{modalities}")
  masks = normalize_masks(embeddings, masks)
  pair_weights = pair_weights or {}
  psum = lambda x: streaming.psum(x, axis_name)
  metrics, total, weight_sum = {}, 0.0, 0.0
  for m, n in modality_pairs(modalities):
    name = pair_name(m, n)
    num_diagonal = psum((masks[m] & masks[n]).sum()).astype(jnp.float32)
    num_terms = psum(masks[m].sum()).astype(jnp.float32) * psum(masks[n].sum())
    num_off = num_terms - num_diagonal
    diagonal_weight = (num_off / jnp.maximum(num_diagonal, 1.0)) if balance else 1.0
    total_weight = num_off + diagonal_weight * num_diagonal
    pair_sum = regression_pair(
        embeddings[m], embeddings[n], masks[m], masks[n], diagonal_weight, target=target,
        margin=margin, loss=loss, impl=impl, block_size=block_size, axis_name=axis_name)
    pair_loss = psum(pair_sum) / jnp.maximum(total_weight, 1e-12)
    weight = jnp.where(num_terms > 0, pair_weights.get(name, 1.0), 0.0)
    total += weight * pair_loss
    weight_sum += weight
    metrics[f"{name}/regression"] = pair_loss
  return total / jnp.maximum(weight_sum, 1e-12), metrics
