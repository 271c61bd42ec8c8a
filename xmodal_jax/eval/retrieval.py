"""Retrieval metrics between every ordered pair of modalities.

A query's positives are the gallery items that share its id. Its rank is 1 + the number of
gallery items scoring strictly higher than its best-scoring positive (docs/methods.md,
"Retrieval metrics").
"""

import itertools

import numpy as np


def check_finite(emb, what):
  """Raises when any row of `emb` is not finite: NaN scores rank nothing above a positive,
  so a diverged model would otherwise report R@1 = 100."""
  bad = int(np.count_nonzero(~np.isfinite(np.asarray(emb)).all(axis=-1)))
  if bad:
    raise ValueError(f"{what}: {bad} of {len(emb)} embeddings are not finite (NaN or inf); "
                     "refusing to rank them (has the model diverged?)")


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


def top_indices(query_emb, gallery_emb, k, chunk_size=1024):
  """int64[Q, k]: the k best gallery items per query (score descending, ties by index)."""
  out = []
  for start in range(0, len(query_emb), chunk_size):
    scores = np.asarray(query_emb[start:start + chunk_size], np.float32) @ np.asarray(
        gallery_emb, np.float32).T
    out.append(np.argsort(-scores, axis=1, kind="stable")[:, :k])
  return np.concatenate(out) if out else np.zeros((0, k), np.int64)


def mean_average_precision(top, query_ids, gallery_ids, k):
  """mAP@k (percent) over queries with a positive: AP@k = sum over ranks j <= k of
  precision@j at each positive, divided by min(#positives, k)."""
  query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
  ids, counts = np.unique(gallery_ids, return_counts=True)
  positives = np.zeros(len(query_ids), np.int64)
  known = np.isin(query_ids, ids)
  positives[known] = counts[np.searchsorted(ids, query_ids[known])]
  hits = gallery_ids[top[:, :k]] == query_ids[:, None]
  precision = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
  ap = (precision * hits).sum(axis=1) / np.maximum(np.minimum(positives, k), 1)
  return 100.0 * float(ap[positives > 0].mean())


# Above this many query x gallery scores, metrics use the sharded, streamed search.
LARGE = 1 << 26


def retrieval_metrics(query_emb, gallery_emb, query_ids, gallery_ids, ks=(1, 5, 10), *,
                      map_k=10, return_ranks=False, mesh=None):
  """{"R@k" (percent) for k in ks, "MedR", "MnR", "mAP@10", "RSUM"} over queries with a
  positive; with `return_ranks`, also "ranks": int64[Q] (0 = no positive).

  Queries with no positive in the gallery cannot be ranked: they are counted in
  "unmatched_queries" instead of being scored. Large galleries (over `LARGE` scores) go
  through `search` over all devices (or `mesh`), exactly.
  """
  check_finite(query_emb, "retrieval_metrics: queries")
  check_finite(gallery_emb, "retrieval_metrics: gallery")
  k = min(map_k, len(gallery_emb))
  if len(query_emb) * len(gallery_emb) > LARGE or mesh is not None:
    from xmodal_jax.eval import search  # pylint: disable=g-import-not-at-top
    ranks = search.ranks(query_emb, gallery_emb, query_ids, gallery_ids, mesh=mesh)
    top = search.topk(query_emb, gallery_emb, k, mesh=mesh)[1]
  else:
    ranks = query_ranks(query_emb, gallery_emb, query_ids, gallery_ids)
    top = top_indices(query_emb, gallery_emb, k)
  metrics = metrics_from_ranks(ranks, top, query_ids, gallery_ids, ks, map_k)
  if return_ranks:
    metrics["ranks"] = ranks
  return metrics


def metrics_from_ranks(ranks, top, query_ids, gallery_ids, ks=(1, 5, 10), map_k=10):
  """R@k, MedR, MnR, RSUM and "unmatched_queries" from per-query ranks (0 = no positive),
  and mAP@map_k from each query's ranked gallery indices `top` [Q, >= min(map_k, N)]."""
  matched = ranks[ranks > 0]
  if not len(matched):
    raise ValueError("retrieval_metrics: no query has a positive (shared id) in the gallery")
  metrics = {f"R@{k}": 100.0 * float(np.mean(matched <= k)) for k in ks}
  metrics["MedR"] = float(np.median(matched))
  metrics["MnR"] = float(np.mean(matched))
  metrics[f"mAP@{map_k}"] = mean_average_precision(top, query_ids, gallery_ids,
                                                   min(map_k, top.shape[1]))
  metrics["RSUM"] = sum(metrics[f"R@{k}"] for k in ks)
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


def fused_query_sets(modalities, fused="all"):
  """The modality sets to query with: "all" = every subset of 2..M-1 modalities, "none" =
  none, or names joined by "+" ("audio+video"), as a list or a comma-separated string (what
  a command-line override gives)."""
  modalities = list(modalities)
  if fused == "none" or not fused:
    return []
  if fused == "all":
    return [c for r in range(2, len(modalities))
            for c in itertools.combinations(modalities, r)]
  if isinstance(fused, str):
    fused = fused.split(",")
  sets = []
  for name in fused:
    parts = tuple(name.split("+"))
    unknown = set(parts) - set(modalities)
    if len(parts) < 2 or unknown or len(parts) >= len(modalities):
      raise ValueError(f"fused query {name!r}: expected 2 to {len(modalities) - 1} of "
                       f"{modalities} joined by '+'")
    sets.append(parts)
  return sets


def fuse(embeddings, modalities, weights=None):
  """The fused query of docs/methods.md: normalize(sum over m of a_m z_m), a_m = 1 by
  default."""
  total = sum((weights or {}).get(m, 1.0) * np.asarray(embeddings[m], np.float32)
              for m in modalities)
  return total / np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12)


def first_per_class(mask, class_ids):
  """`mask` keeping only the first row of each class."""
  keep = np.zeros_like(mask)
  rows = np.flatnonzero(mask)
  keep[rows[np.unique(class_ids[rows], return_index=True)[1]]] = True
  return keep


def evaluate_pairs(embeddings, masks, ids, split, ks=(1, 5, 10), fused="all", mesh=None,
                   class_ids=None, class_level=()):
  """Metrics for every ordered pair (query, gallery) of modalities, and for fused queries.

  Args:
    embeddings: {modality: float[N, D]} for the N items of `split`.
    masks: {modality: bool[N]} which items have that modality.
    ids: int[N] item ids.
    fused: which modality sets also query as one (see `fused_query_sets`), each against
      every modality outside the set; an item queries only if it has all of them.
    class_ids, class_level: modalities in `class_level` describe an item's class, not the
      item (a species' attributes): a query or gallery that involves one matches by
      `class_ids` (int[N]) instead of `ids`, and such a modality enters a gallery, or
      queries alone, once per class.
  Returns:
    {"{split}/{query}->{gallery}/{metric}": value} plus "…/chance_R@1"; a fused query's
    name joins its modalities with "+"; "{split}/{a}<->{b}/RSUM" sums both directions.
  """
  ids = np.asarray(ids)
  for m, emb in embeddings.items():
    check_finite(np.asarray(emb)[np.asarray(masks[m], bool)], f"{split}/{m}")
  queries = [((q,), g) for q, g in itertools.permutations(embeddings, 2)]
  queries += [(s, g) for s in fused_query_sets(embeddings, fused) for g in embeddings
              if g not in s]
  out = {}
  for query, g in queries:
    qm = np.logical_and.reduce([np.asarray(masks[m], bool) for m in query])
    gm = np.asarray(masks[g], bool)
    match = ids
    if set(query + (g,)) & set(class_level):
      match = np.asarray(class_ids)
      if g in class_level:
        gm = first_per_class(gm, match)
      if set(query) <= set(class_level):
        qm = first_per_class(qm, match)
    query_emb = fuse({m: embeddings[m][qm] for m in query}, query)
    metrics = retrieval_metrics(query_emb, embeddings[g][gm], match[qm], match[gm], ks,
                                mesh=mesh)
    metrics["chance_R@1"] = chance_recall(match[qm], match[gm], 1)
    for name, value in metrics.items():
      out[f"{split}/{'+'.join(query)}->{g}/{name}"] = value
  for a, b in itertools.combinations(embeddings, 2):
    out[f"{split}/{a}<->{b}/RSUM"] = (out[f"{split}/{a}->{b}/RSUM"]
                                      + out[f"{split}/{b}->{a}/RSUM"])
  return out


def metric_parts(key):
  """(prefix, query->gallery, metric) of a retrieval metric's name, None for any other; the
  prefix may hold slashes ("msrvtt/test")."""
  parts = key.split("/")
  for i, part in enumerate(parts[1:-1], start=1):
    if "->" in part:
      return "/".join(parts[:i]), part, "/".join(parts[i + 1:])
  return None


def format_table(metrics, split, ks=(1, 5, 10)):
  """A text table, one row per ordered pair and fused query, from evaluate_pairs' output
  with prefix `split`."""
  columns = [f"R@{k}" for k in ks] + ["MedR", "MnR", "mAP@10", "RSUM", "chance_R@1"]
  pairs = sorted({pair for prefix, pair, _ in filter(None, map(metric_parts, metrics))
                  if prefix == split and "<->" not in pair
                  and f"{split}/{pair}/{columns[0]}" in metrics},
                 key=lambda p: (p.count("+"), p))
  width = max([len("query->gallery")] + [len(p) for p in pairs])
  lines = [f"{'query->gallery':<{width}} " + " ".join(f"{c:>10}" for c in columns)]
  for pair in pairs:
    values = [metrics.get(f"{split}/{pair}/{c}", float("nan")) for c in columns]
    lines.append(f"{pair:<{width}} " + " ".join(f"{v:>10.2f}" for v in values))
  return "\n".join(lines)


def format_zeroshot_table(metrics):
  """One row per zero-shot classification ("{prefix}/zeroshot/{modality}/{metric}")."""
  rows = {}
  for key, value in metrics.items():
    if "/zeroshot/" in key:
      head, metric = key.rsplit("/", 1)
      rows.setdefault(head.replace("/zeroshot/", " "), {})[metric] = value
  if not rows:
    return ""
  columns = ["top1", "top5", "mean_per_class_recall", "chance_top1"]
  width = max(len("zero-shot"), *map(len, rows))
  lines = [f"{'zero-shot':<{width}} " + " ".join(f"{c:>22}" for c in columns)]
  for name, values in sorted(rows.items()):
    lines.append(f"{name:<{width}} " + " ".join(
        f"{values.get(c, float('nan')):>22.2f}" for c in columns))
  return "\n".join(lines)


def format_tables(metrics, ks=(1, 5, 10)):
  """format_table for each prefix that has pair metrics in `metrics`, each under its name,
  then the zero-shot table."""
  prefixes = sorted({parts[0] for parts in map(metric_parts, metrics) if parts})
  tables = [f"{prefix}\n{format_table(metrics, prefix, ks)}" for prefix in prefixes]
  return "\n\n".join(tables + [t for t in [format_zeroshot_table(metrics)] if t])
