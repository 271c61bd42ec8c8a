"""Similarity regression (PCMR): regress cross-modal similarities to a target.

For a pair (m, n), S_ij = z_m,i . z_n,j is regressed to T_ii = 1 and, for i != j,
T_ij = min(sg((Z_m Z_m^T + Z_n Z_n^T) / 2)_ij, 1 - margin) (target="intra") or 0 ("zero").
"""

import jax
import jax.numpy as jnp

from xmodal_jax.losses import pairs
from xmodal_jax.parallel import streaming

TARGETS = ("intra", "zero")
LOSSES = ("mse", "smooth_l1")


def check_options(*, target, loss, impl, margin=0.0, where=""):
  """Raises on options similarity_regression_loss does not take; `where` prefixes the field
  in errors ("config.loss.regression." for a config)."""
  if target not in TARGETS:
    raise ValueError(f"{where}target={target!r}: expected one of {TARGETS}")
  if loss not in LOSSES:
    raise ValueError(f"{where}loss={loss!r}: expected one of {LOSSES}")
  if not 0.0 <= margin < 2.0:
    raise ValueError(f"{where}margin={margin}: expected 0 <= margin < 2 (cosines lie in "
                     "[-1, 1])")
  pairs.check_options(impl=impl)


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
  check_options(target=target, loss=loss, impl=impl, margin=margin)
  psum = lambda x: streaming.psum(x, axis_name)

  def pair_term(m, n, name, masks):
    num_diagonal = psum((masks[m] & masks[n]).sum()).astype(jnp.float32)
    num_terms = psum(masks[m].sum()).astype(jnp.float32) * psum(masks[n].sum())
    num_off = num_terms - num_diagonal
    diagonal_weight = (num_off / jnp.maximum(num_diagonal, 1.0)) if balance else 1.0
    total_weight = num_off + diagonal_weight * num_diagonal
    pair_sum = regression_pair(
        embeddings[m], embeddings[n], masks[m], masks[n], diagonal_weight, target=target,
        margin=margin, loss=loss, impl=impl, block_size=block_size, axis_name=axis_name)
    pair_loss = psum(pair_sum) / jnp.maximum(total_weight, 1e-12)
    return pair_loss, num_terms, {f"{name}/regression": pair_loss}

  return pairs.mean_over_pairs("similarity_regression_loss", embeddings, masks, pair_weights,
                               impl, pair_term)
