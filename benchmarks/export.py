"""Embedding export at scale, on this machine.

  python benchmarks/export.py [--items=1000000] [--out=benchmarks/results/export_cpu2.json]

Part 1: peak RSS and rows/s of one export process (launch/export.py's code path:
  Embedder.local_batches -> export.write_shards) over a synthetic split of `--items` items
  (two 32-dim "features" modalities, so the model costs little and the export path shows),
  exporting its first fifth and the whole of it. Each export runs in a fresh process that
  reports its own peak RSS (VmHWM); the claim is that memory does not grow with the items.
Part 2: item keys on the whole export: `Export.row_of_key` (a key's row, shard by shard)
  and `keys_at` (the keys of a few rows, from their shards alone), per call, against the
  baseline of loading every key (`Export.keys()`) once.
Part 3: recall@10 of a FAISS IVF-PQ index (launch/export.py --index=ivf_pq) against exact
  search (eval/search.topk) on 1,000 queries ("b" rows against the "a" gallery), at 16
  (the default), 64 and 256 lists probed, with its build time and size, beside flat.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

DIM = 32


def make_builder(data_dir, items):
  """A TFDS builder of `items` synthetic items: two float32[DIM] features and a key."""
  import tensorflow_datasets as tfds

  class SyntheticFeatures(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "id": np.int64, "key": tfds.features.Text(),
          "a": tfds.features.Tensor(shape=(DIM,), dtype=np.float32),
          "b": tfds.features.Tensor(shape=(DIM,), dtype=np.float32)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(0)
      for i in range(items):
        a = rng.standard_normal(DIM).astype(np.float32)
        yield i, {"id": i, "key": f"item/{i:07d}", "a": a,
                  "b": a + 0.5 * rng.standard_normal(DIM).astype(np.float32)}

  return SyntheticFeatures(data_dir=data_dir)


def config_for(data_dir):
  from configs import audio_video_text, sizes  # the tiny run's optimizer and loss
  config = audio_video_text.get_config("tiny")
  config.data.update(name="synthetic_features", data_dir=data_dir, train_split="test",
                     eval_split="test")
  config.modalities = dict(a=dict(kind="features", feature="a", shape=(DIM,)),
                           b=dict(kind="features", feature="b", shape=(DIM,)))
  config.model.embed_dim = DIM
  config.model.towers = dict(a=sizes.features("tiny", width=64, mlp_dim=128),
                             b=sizes.features("tiny", width=64, mlp_dim=128))
  config.batch_size, config.eval_batch_size = 256, 4096
  config.total_steps, config.log_every, config.checkpoint_every = 1, 1, 1
  config.optimizer.warmup_steps = 0
  config.evals = {}
  config.loss.pair_weights = {}
  return config


def child(args):
  """One export in this process; prints JSON with rows/s and peak RSS."""
  import jax
  from xmodal_jax import experiment as experiment_lib
  from xmodal_jax.eval import export
  make_builder(args.data_dir, args.items)  # registers the builder's name
  experiment = experiment_lib.setup(config_for(args.data_dir), args.workdir,
                                    require_checkpoint=True)
  signature = {"split": args.split, "step": experiment.step, "workdir": args.workdir,
               "dataset": "synthetic_features"}
  start = time.perf_counter()
  export.write_shards(args.out, experiment.embedder, experiment.state.params, args.split,
                      signature=signature, shard_rows=args.shard_rows, log=lambda _: None)
  meta = export.finish(args.out, signature, "float32")
  seconds = time.perf_counter() - start
  with open("/proc/self/status", encoding="utf-8") as f:
    peak_kb = int(f.read().split("VmHWM:")[1].split()[0])
  print(json.dumps({"split": args.split, "rows": meta["count"], "seconds": seconds,
                    "rows_per_s": meta["count"] / seconds, "peak_rss_mb": peak_kb / 1024,
                    "devices": jax.device_count()}))


def key_lookups(export_dir, lookups=20):
  """Seconds per row_of_key and keys_at call on an export, against loading every key."""
  from xmodal_jax.eval import export
  rng = np.random.default_rng(2)
  start = time.perf_counter()
  every_key = export.read_export(export_dir).keys()
  load_s = time.perf_counter() - start
  rows = rng.choice(len(every_key), lookups, replace=False)
  exported = export.read_export(export_dir)  # nothing read yet
  start = time.perf_counter()
  found = [exported.row_of_key(every_key[r]) for r in rows]
  row_of_key_s = (time.perf_counter() - start) / lookups
  assert found == list(rows), "row_of_key found other rows"
  start = time.perf_counter()
  for chunk in np.array_split(rows, lookups // 10):
    assert list(exported.keys_at(chunk)) == list(every_key[chunk])
  keys_at_s = (time.perf_counter() - start) / (lookups // 10)
  result = {"rows": len(every_key), "all_keys_s": load_s, "row_of_key_s": row_of_key_s,
            "keys_at_10_rows_s": keys_at_s}
  print(f"every key: {load_s:.2f} s once; row_of_key {1e3 * row_of_key_s:.0f} ms "
        f"({row_of_key_s / load_s:.3f}x); keys_at of 10 rows {1e3 * keys_at_s:.0f} ms "
        f"({keys_at_s / load_s:.3f}x)", flush=True)
  return result


def recall(export_dir, queries=1000):
  """recall@10 of IVF-PQ and flat against exact search, with build times and sizes."""
  from xmodal_jax.eval import export, index, search
  exported = export.read_export(export_dir)
  gallery = exported.embeddings("a")
  query = exported.embeddings("b")[np.random.default_rng(1).choice(len(gallery), queries,
                                                                   replace=False)]
  _, exact = search.topk(query, gallery, 10)
  exact = np.asarray(exact)
  rows = []
  for kind in index.KINDS:
    start = time.perf_counter()
    built = index.build(exported, "a", kind, log=lambda _: None)
    build_s = time.perf_counter() - start
    size = os.path.getsize(index.path(exported, "a"))
    for nprobe in ((None,) if kind == "flat" else (16, 64, 256)):
      start = time.perf_counter()
      _, found = index.search(built, query, 10, nprobe=nprobe)
      search_s = time.perf_counter() - start
      hits = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
      rows.append({"index": kind, "nprobe": nprobe, "recall_at_10": float(hits),
                   "build_s": build_s, "queries_per_s": queries / search_s, "bytes": size,
                   "bytes_per_row": size / len(gallery)})
      print(f"{kind:7} nprobe {nprobe or '-':>4} recall@10 {hits:.3f}  build {build_s:6.1f} s"
            f"  {queries / search_s:9.0f} queries/s  {size / len(gallery):6.1f} bytes/row",
            flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--items", type=int, default=1_000_000)
  parser.add_argument("--shard_rows", type=int, default=100_000)
  parser.add_argument("--out", default=None, help="JSON file to write")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--data_dir", help=argparse.SUPPRESS)
  parser.add_argument("--workdir", help=argparse.SUPPRESS)
  parser.add_argument("--split", help=argparse.SUPPRESS)
  parser.add_argument("--export", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    args.out = args.export
    return child(args)
  from xmodal_jax import experiment as experiment_lib
  tmp = tempfile.mkdtemp(prefix="export_bench_")
  data_dir, workdir = os.path.join(tmp, "tfds"), os.path.join(tmp, "run")
  start = time.perf_counter()
  make_builder(data_dir, args.items).download_and_prepare()
  print(f"built {args.items} synthetic items in {time.perf_counter() - start:.0f} s",
        flush=True)
  experiment_lib.train(config_for(data_dir), workdir)
  results = {"cpu_count": os.cpu_count(), "items": args.items,
             "shard_rows": args.shard_rows, "exports": []}
  for split in (f"test[:{args.items // 5}]", "test"):
    export_dir = os.path.join(tmp, f"export_{len(results['exports'])}")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", f"--data_dir={data_dir}",
         f"--workdir={workdir}", f"--split={split}", f"--export={export_dir}",
         f"--items={args.items}", f"--shard_rows={args.shard_rows}"],
        capture_output=True, text=True, check=False, cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if proc.returncode:
      sys.exit(f"export of {split} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    results["exports"].append(row)
    print(f"{split:16} {row['rows']:9d} rows  {row['rows_per_s']:8.0f} rows/s  "
          f"peak RSS {row['peak_rss_mb']:7.0f} MB", flush=True)
  small, large = results["exports"]
  results["peak_rss_ratio"] = large["peak_rss_mb"] / small["peak_rss_mb"]
  print(f"peak RSS, {large['rows']} vs {small['rows']} rows: "
        f"{results['peak_rss_ratio']:.3f}x", flush=True)
  results["keys"] = key_lookups(export_dir)
  results["indexes"] = recall(export_dir)
  shutil.rmtree(tmp)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
