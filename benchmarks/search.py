"""Exact top-k search: our sharded, chunked search (xmodal_jax.eval.search) vs FAISS.

  python benchmarks/search.py --queries=10000 --gallery=1000000 --dim=256 --k=10

Both search the same L2-normalized random float32 data by inner product, exactly (FAISS
IndexFlatIP, all of this machine's threads; ours over all JAX devices in chunks). Prints a
table with the time ratio (ours / FAISS) and whether the results agree; writes JSON.
Needs faiss-cpu (`pip install -e ".[bench]"`).
"""

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from xmodal_jax.eval import search  # pylint: disable=g-import-not-at-top,wrong-import-position


def normalized(rng, n, dim, block=100_000):
  out = np.empty((n, dim), np.float32)
  for start in range(0, n, block):
    x = rng.standard_normal((min(block, n - start), dim), dtype=np.float32)
    out[start:start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--queries", type=int, default=10_000)
  parser.add_argument("--gallery", type=int, default=1_000_000)
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--chunk_size", type=int, default=65_536)
  parser.add_argument("--query_block", type=int, default=1024)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  import faiss  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  gallery = normalized(rng, args.gallery, args.dim)
  queries = normalized(rng, args.queries, args.dim)
  print(f"{args.queries} queries x {args.gallery} gallery x {args.dim} dims, k={args.k}; "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}; faiss {faiss.__version__} "
        f"with {faiss.omp_get_max_threads()} threads", flush=True)

  index = faiss.IndexFlatIP(args.dim)
  start = time.perf_counter()
  index.add(gallery)
  faiss_scores, faiss_ids = index.search(queries, args.k)
  faiss_s = time.perf_counter() - start

  search.topk(queries[:8], gallery, args.k, chunk_size=args.chunk_size,
              query_block=args.query_block)  # Compile (not timed).
  start = time.perf_counter()
  ours_scores, ours_ids = search.topk(queries, gallery, args.k, chunk_size=args.chunk_size,
                                      query_block=args.query_block)
  ours_s = time.perf_counter() - start

  same_ids = float(np.mean(ours_ids == faiss_ids))
  score_error = float(np.abs(ours_scores - faiss_scores).max())
  rows = [("faiss IndexFlatIP", faiss_s), ("xmodal_jax search.topk", ours_s)]
  print(f"{'method':24s} {'seconds':>9s} {'queries/s':>10s} {'time vs faiss':>14s}")
  for name, seconds in rows:
    print(f"{name:24s} {seconds:9.2f} {args.queries / seconds:10.0f} {seconds / faiss_s:14.2f}")
  print(f"same ids: {100 * same_ids:.3f}% of entries (ties may order differently); max score "
        f"difference {score_error:.2e}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(vars(args), device=jax.devices()[0].device_kind,
                     devices=jax.device_count(), faiss_s=faiss_s, ours_s=ours_s,
                     time_vs_faiss=ours_s / faiss_s, same_ids=same_ids,
                     max_score_difference=score_error), f, indent=1)


if __name__ == "__main__":
  main()
