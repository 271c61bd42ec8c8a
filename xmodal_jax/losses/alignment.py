"""ALBEF-style alignment objectives (docs/methods.md; TCL / ALBEF forms): ITC and IMS against
momentum embeddings and a queue with positive-aware targets, and LMIM between a sample's
global vector and its local features.

Every function takes global-batch arrays: under jit on a mesh they stay sharded by rows
(the caller constrains them) and XLA gathers the columns, except the queue's, which stay in
place (see `queue_contrastive`); a value equals the single-device value on the same global
batch.
"""

import functools

import jax
import jax.numpy as jnp

NEG = -1e9


def queue_contrastive(query, momentum_query, keys, queue, scale, *, ids, key_mask, query_mask,
                      queue_ids, alpha=None, queue_columns=None):
  """Cross-entropy of s q_i against the columns [batch momentum keys; queue] with
  positive-aware targets y_ij = 1[same item, column valid] / (positives of i): every column
  of the same item (another caption, a queue entry of an earlier step) is a positive.
  Distilled when `alpha` is given (a number or a traced scalar):
  alpha softmax(s q'_i C^T) + (1 - alpha) y.

  query, momentum_query: [B, D] (online and momentum embeddings of the query modality);
  keys: [B, D] momentum embeddings of the key modality (the same modality for IMS);
  queue: [Q, D] with queue_ids [Q] (-1: empty). Rows count where query_mask holds and a
  positive exists. Returns (mean loss over counted rows, number of counted rows).

  The batch and the queue columns are scored apart and joined by per-row log-sum-exps, so
  `queue_columns`, a sharding for the [B, Q] scores against the queue (NamedSharding(mesh,
  P(None, axis)) when the queue's rows are sharded over `axis`), keeps each device on its
  own queue rows: the B queries are gathered instead of the Q queue rows.
  """
  place = lambda x: x if queue_columns is None else jax.lax.with_sharding_constraint(
      x, queue_columns)
  parts = [(keys, ids, key_mask.astype(bool), lambda x: x),
           (queue, queue_ids, queue_ids >= 0, place)]
  logits, same = [], []
  for columns, column_ids, column_valid, put in parts:
    logits.append(put(jnp.where(column_valid[None, :], scale * query @ columns.T, NEG)))
    same.append(put((ids[:, None] == column_ids[None, :]) & column_valid[None, :]))
  positives = sum(x.sum(axis=1) for x in same)
  targets = [x / jnp.maximum(positives, 1)[:, None] for x in same]
  if alpha is not None:
    momentum_logits = [put(jnp.where(column_valid[None, :],
                                     scale * momentum_query @ columns.T, NEG))
                       for columns, _, column_valid, put in parts]
    normalizer = row_logsumexp(momentum_logits)
    targets = [alpha * jnp.exp(m - normalizer[:, None]) + (1 - alpha) * y
               for m, y in zip(momentum_logits, targets)]
  normalizer = row_logsumexp(logits)
  loss = -sum((jax.lax.stop_gradient(y) * (x - normalizer[:, None])).sum(axis=1)
              for y, x in zip(targets, logits))
  rows = query_mask & (positives > 0)
  count = rows.sum()
  return jnp.where(rows, loss, 0.0).sum() / jnp.maximum(count, 1), count


def row_logsumexp(blocks):
  """log sum_j exp(x_ij) over the columns of several [B, *] blocks, per row."""
  return functools.reduce(jnp.logaddexp, [jax.nn.logsumexp(x, axis=1) for x in blocks])


def lmim(global_emb, local_emb, local_valid, scale, *, mask):
  """Local mutual information (InfoNCE): for each sample i and each of its valid locals k,
  -log e^{s g_i.l_ik} / (e^{s g_i.l_ik} + sum over other samples' valid locals l_jk' of
  e^{s g_i.l_jk'}), averaged over (i, k). global_emb [B, D], local_emb [B, K, D] (normalized),
  local_valid bool[B, K], mask bool[B] (the sample has the modality)."""
  scores = scale * jnp.einsum("id,jkd->ijk", global_emb, local_emb)  # [B, B, K]
  valid = local_valid & mask[:, None]
  own = jnp.eye(global_emb.shape[0], dtype=bool)
  others = jnp.where(~own[:, :, None] & valid[None], scores, NEG)
  negatives = jax.nn.logsumexp(others.reshape(others.shape[0], -1), axis=-1)  # [B]
  positive = jnp.einsum("id,ikd->ik", global_emb, local_emb) * scale  # [B, K]
  loss = jnp.logaddexp(positive, negatives[:, None]) - positive
  counted = valid & mask[:, None]
  return jnp.where(counted, loss, 0.0).sum() / jnp.maximum(counted.sum(), 1)


def hard_negatives(rng, similarity, ids_a, ids_b, mask_a, mask_b):
  """For each row i, a column j drawn with probability softmax(similarity_i) over columns of
  other items (ids differ) that have their modality; and for each column j, such a row.
  Returns (neg_col [B], row_ok [B], neg_row [B], col_ok [B]): *_ok is False where no
  candidate exists."""
  allowed = (ids_a[:, None] != ids_b[None, :]) & mask_a[:, None] & mask_b[None, :]
  rng_rows, rng_cols = jax.random.split(rng)
  logits = jnp.where(allowed, similarity, NEG)
  neg_col = jax.random.categorical(rng_rows, logits, axis=1)
  neg_row = jax.random.categorical(rng_cols, logits, axis=0)
  return neg_col, allowed.any(1) & mask_a, neg_row, allowed.any(0) & mask_b


def matching_loss(logits_pos, logits_neg_b, logits_neg_a, pos_ok, neg_b_ok, neg_a_ok):
  """2-way cross-entropy over (positive pairs: label 1, a_i with a drawn negative b: 0, a
  drawn negative a with b_j: 0), averaged over the counted pairs. Returns (loss, accuracy)."""
  logp = [jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
          for x in (logits_pos, logits_neg_b, logits_neg_a)]
  terms = [(-logp[0][:, 1], pos_ok), (-logp[1][:, 0], neg_b_ok), (-logp[2][:, 0], neg_a_ok)]
  total = sum(jnp.where(ok, t, 0.0).sum() for t, ok in terms)
  count = sum(ok.sum() for _, ok in terms)
  correct = (jnp.where(pos_ok, logp[0][:, 1] > logp[0][:, 0], False).sum()
             + jnp.where(neg_b_ok, logp[1][:, 0] > logp[1][:, 1], False).sum()
             + jnp.where(neg_a_ok, logp[2][:, 0] > logp[2][:, 1], False).sum())
  return total / jnp.maximum(count, 1), correct / jnp.maximum(count, 1)


def enqueue(queue, queue_ids, pointer, keys, ids, valid, shards=1):
  """Writes this step's momentum keys (ids; -1 where the item lacks the modality) as the
  newest entries of a FIFO ring of Q entries (Q divisible by B); returns (queue, ids,
  pointer), `pointer` counting entries written, modulo Q.

  The ring is `shards` equal blocks of rows, one per device when the queue's rows are
  sharded over that many: block k takes the batch's k-th run of B / shards rows, at the
  same offset in every block, so no device touches another's rows. The queue then holds the
  same entries as one ring of Q (the latest Q / B batches), in another order.
  """
  batch, size = keys.shape[0], queue.shape[0]
  if batch % shards or size % batch:
    raise ValueError(f"enqueue: batch {batch} must divide the queue size {size} and be "
                     f"divisible by shards={shards}")
  blocks = lambda x: x.reshape((shards, -1) + x.shape[1:])
  offset = pointer // shards
  queue = jax.lax.dynamic_update_slice(blocks(queue), blocks(keys.astype(queue.dtype)),
                                       (0, offset, 0)).reshape(queue.shape)
  new_ids = jnp.where(valid, ids, -1).astype(queue_ids.dtype)
  queue_ids = jax.lax.dynamic_update_slice(blocks(queue_ids), blocks(new_ids),
                                           (0, offset)).reshape(queue_ids.shape)
  return queue, queue_ids, (pointer + batch) % size
