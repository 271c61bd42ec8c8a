"""Retrieval metrics between every ordered pair of modalities.

A query's positives are the gallery items that share its id. Its rank is 1 + the number of
gallery items scoring strictly higher than its best-scoring positive (DESIGN.md).
"""

import itertools

import numpy as np


def query_ranks(query_emb, gallery_emb, query_ids, gallery_ids, chunk_size=1024):
  """int64[Q] ranks (1 = best); 0 for a query whose id has no item in the gallery."""
  query_emb = np.asarray(query_emb, np.float32)
  gallery_emb = np.asarray(gallery_emb, np.float32)
  query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
  ranks = np.zeros(len(query_emb), np.int64)
  for start in range(0, len(query_emb), chunk_size):
    scores = query_emb[start:start + chunk_size] @ gallery_emb.T
    positive = query_ids[start:start + chunk_size, None] == gallery_ids[None, :]
    best_positive = np.where(positive, scores, -np.inf).max(axis=1)
    rank = 1 + (scores > best_positive[:, None]).sum(axis=1)
    ranks[start:start + chunk_size] = np.where(positive.any(axis=1), rank, 0)
  return ranks


def retrieval_metrics(query_emb, gallery_emb, query_ids, gallery_ids, ks=(1, 5, 10)):
  """{"R@k" (percent) for k in ks, "MedR", "MnR"} over queries that have a positive.

  Queries with no positive in the gallery cannot be ranked: they are counted in
  "unmatched_queries" instead of being scored.
  """
  ranks = query_ranks(query_emb, gallery_emb, query_ids, gallery_ids)
  matched = ranks[ranks > 0]
  if not len(matched):
    raise ValueError("retrieval_metrics: no query has a positive (shared id) in the gallery")
  metrics = {f"R@{k}": 100.0 * float(np.mean(matched <= k)) for k in ks}
  metrics["MedR"] = float(np.median(matched))
  metrics["MnR"] = float(np.mean(matched))
  metrics["unmatched_queries"] = int(len(ranks) - len(matched))
  return metrics


def chance_recall(query_ids, gallery_ids, k):
  """Expected R@k (percent) of a random ranking, given each query's number of positives."""
  gallery_ids = np.asarray(gallery_ids)
  n = len(gallery_ids)
  ids, counts = np.unique(gallery_ids, return_counts=True)
  positives = dict(zip(ids.tolist(), counts.tolist()))
  misses = []
  for q in np.asarray(query_ids).tolist():
    p = positives.get(q, 0)
    if p:
      misses.append(np.prod([(n - p - i) / (n - i) for i in range(min(k, n - p + 1))]))
  return 100.0 * (1.0 - float(np.mean(misses)))


def evaluate_pairs(embeddings, masks, ids, split, ks=(1, 5, 10)):
  """Metrics for every ordered pair (query, gallery) of modalities.

  Args:
    embeddings: {modality: float[N, D]} for the N items of `split`.
    masks: {modality: bool[N]} which items have that modality.
    ids: int[N] item ids.
  Returns:
    {"{split}/{query}->{gallery}/{metric}": value} plus "…/chance_R@1".
  """
  out = {}
  for q, g in itertools.permutations(embeddings, 2):
    qm, gm = np.asarray(masks[q], bool), np.asarray(masks[g], bool)
    metrics = retrieval_metrics(embeddings[q][qm], embeddings[g][gm], ids[qm], ids[gm], ks)
    metrics["chance_R@1"] = chance_recall(ids[qm], ids[gm], 1)
    for name, value in metrics.items():
      out[f"{split}/{q}->{g}/{name}"] = value
  return out


def format_table(metrics, split, ks=(1, 5, 10)):
  """A text table, one row per ordered pair, from evaluate_pairs' output."""
  pairs = sorted({key.split("/")[1] for key in metrics if key.startswith(f"{split}/")})
  columns = [f"R@{k}" for k in ks] + ["MedR", "MnR", "chance_R@1"]
  width = max([len("query->gallery")] + [len(p) for p in pairs])
  lines = [f"{'query->gallery':<{width}} " + " ".join(f"{c:>10}" for c in columns)]
  for pair in pairs:
    values = [metrics[f"{split}/{pair}/{c}"] for c in columns]
    lines.append(f"{pair:<{width}} " + " ".join(f"{v:>10.2f}" for v in values))
  return "\n".join(lines)
