"""Re-ranking (ALBEF): re-score each query's top-k by embedding similarity with the fusion
encoder's matching head and report the re-ranked retrieval beside the embedding one."""

import time

import numpy as np

from xmodal_jax.eval import retrieval


def rerank(query_emb, gallery_emb, query_ids, gallery_ids, score_fn, k):
  """Ranks after re-scoring each query's embedding top-k with `score_fn(top)` (top: int[Q, k]
  gallery indices -> float[Q, k] matching scores, higher = better match).

  A query's rank is the position of its first positive in the re-ranked top-k; a query with
  no positive there keeps its embedding rank (> k, or 0 without any positive). Returns
  (ranks int64[Q], re-ranked top int64[Q, k]).
  """
  retrieval.check_finite(query_emb, "rerank: queries")
  retrieval.check_finite(gallery_emb, "rerank: gallery")
  gallery_ids = np.asarray(gallery_ids)
  query_ids = np.asarray(query_ids)
  k = min(k, len(gallery_emb))
  top = retrieval.top_indices(query_emb, gallery_emb, k)
  ranks = retrieval.query_ranks(query_emb, gallery_emb, query_ids, gallery_ids)
  scores = np.asarray(score_fn(top))
  reranked = np.take_along_axis(top, np.argsort(-scores, axis=1, kind="stable"), axis=1)
  hits = gallery_ids[reranked] == query_ids[:, None]
  return np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, ranks), reranked


def rerank_metrics(query_emb, gallery_emb, query_ids, gallery_ids, score_fn, k,
                   ks=(1, 5, 10), map_k=10):
  """retrieval_metrics' numbers for the re-ranked lists, plus "ms_per_query" (the matching
  head's cost per query, k pairs each)."""
  start = time.perf_counter()
  ranks, reranked = rerank(query_emb, gallery_emb, query_ids, gallery_ids, score_fn, k)
  elapsed = time.perf_counter() - start
  metrics = retrieval.metrics_from_ranks(ranks, reranked, query_ids, gallery_ids, ks, map_k)
  metrics["ms_per_query"] = 1e3 * elapsed / max(len(query_emb), 1)
  return metrics
