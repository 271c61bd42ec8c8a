"""The retrieval service (launch/serve.py) under load, on this machine.

  python benchmarks/serve.py [--items=100000] [--requests=300] [--concurrency=4] \
      [--out=benchmarks/results/serve_cpu2.json]

A run of the default config (one training step: the towers' cost is a trained model's) and
a synthetic export of `--items` rows of its three modalities (random unit vectors, keys
"item/0000042"; its signature is the run's, so the service accepts it). The service runs
in its own process; `--concurrency` client threads send `--requests` requests each row, over
HTTP on localhost, and the table reports queries/s and p50/p99 latency per query kind (a
text, or a real WAV recording uploaded) against the video gallery: exact search (the rows
on the device), a FAISS IVF-PQ index and a flat FAISS index, and the embedding alone
(/api/embed). Ratios are queries/s against exact search with the same query kind.
"""

import argparse
import concurrent.futures
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process only writes the export
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

CONFIG = os.path.join(REPO, "configs", "audio_video_text.py")
SHARD_ROWS = 25_000


def config_args(data_dir, workdir):
  return [f"--config={CONFIG}", f"--config.data.data_dir={data_dir}", f"--workdir={workdir}",
          "--config.total_steps=1", "--config.checkpoint_every=1", "--config.evals={}",
          "--config.optimizer.warmup_steps=0"]


def train(data_dir, workdir):
  os.makedirs(data_dir, exist_ok=True)
  proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "train.py"),
                         *config_args(data_dir, workdir)], capture_output=True, text=True,
                        check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if proc.returncode:
    raise SystemExit(f"train.py failed:\n{proc.stderr[-3000:]}")


def synthetic_export(workdir, out, items):
  """An export of `items` random unit rows per modality, signed as the run's own."""
  from xmodal_jax import files
  from xmodal_jax.eval import export
  from xmodal_jax.train import checkpoint
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  step = 1
  signature = {"workdir": files.absolute(workdir), "step": step,
               "checkpoint": checkpoint.identity(workdir, step), "split": "test",
               "dataset": config["data"]["name"], "eval_batch_size": config["eval_batch_size"],
               "process_count": 1, "shard_rows": SHARD_ROWS, "dtype": "float32",
               "model": config["model"]}
  export.check_signature(out, signature)
  rng = np.random.default_rng(0)
  dim = config["model"]["embed_dim"]
  for number, start in enumerate(range(0, items, SHARD_ROWS)):
    rows = np.arange(start, min(start + SHARD_ROWS, items))
    emb = {}
    for m in config["modalities"]:
      x = rng.standard_normal((len(rows), dim)).astype(np.float32)
      emb[m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    export.write_shard(out, export.shard_name(0, number), {
        "emb": emb, "_mask": {m: np.ones(len(rows), bool) for m in emb},
        "_id": rows.astype(np.int64), "_key": [f"item/{r:07d}".encode() for r in rows]},
                       "float32", {k: signature[k] for k in ("split", "step", "workdir",
                                                             "dataset")})
  export.finish(out, signature, "float32")


def build_indexes(out, kind):
  from xmodal_jax.eval import export, index
  shutil.rmtree(os.path.join(out, "faiss"), ignore_errors=True)
  exported = export.read_export(out)
  for m in exported.modalities:
    index.build(exported, m, kind, log=lambda _: None)


def start_service(data_dir, workdir, out):
  args = config_args(data_dir, workdir)
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, "launch", "serve.py"), *args,
                           f"--export={out}", "--port=0"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  for line in proc.stdout:
    if line.startswith("Serving "):
      return proc, line.split(" on ")[-1].strip().rstrip("/")
  raise SystemExit("serve.py did not start:\n" + proc.stderr.read()[-3000:])


def load(url, request, count, concurrency):
  """(queries/s, p50 ms, p99 ms) of `count` requests (request(client) -> response) from
  `concurrency` threads, after a warm-up of 2 per thread."""
  import httpx

  def one(client):
    start = time.perf_counter()
    response = request(client)
    if response.status_code != 200:
      raise SystemExit(f"{response.status_code}: {response.text[:500]}")
    return time.perf_counter() - start

  clients = [httpx.Client(base_url=url, timeout=120) for _ in range(concurrency)]
  with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
    list(pool.map(one, clients * 2))
    start = time.perf_counter()
    latencies = list(pool.map(one, [clients[i % concurrency] for i in range(count)]))
    seconds = time.perf_counter() - start
  for client in clients:
    client.close()
  ms = np.array(latencies) * 1000
  return count / seconds, float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def requests_for(wav):
  text = {"text": "three eight six one", "gallery": "video", "k": 10}
  audio_files = lambda: {"audio": ("query.wav", io.BytesIO(wav), "audio/wav")}
  return {
      "text": {
          "search": lambda exact: lambda c: c.get("/api/search",
                                                  params=dict(text, exact=int(exact))),
          "embed": lambda c: c.post("/api/embed", data={"text": text["text"]})},
      "audio": {
          "search": lambda exact: lambda c: c.post(
              "/api/search", data={"gallery": "video", "k": 10, "exact": int(exact)},
              files=audio_files()),
          "embed": lambda c: c.post("/api/embed", files=audio_files())}}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--items", type=int, default=100_000)
  parser.add_argument("--requests", type=int, default=300)
  parser.add_argument("--concurrency", type=int, default=4)
  parser.add_argument("--out", default=None, help="JSON file to write")
  args = parser.parse_args()
  tmp = tempfile.mkdtemp(prefix="serve_bench_")
  data_dir, workdir, out = (os.path.join(tmp, n) for n in ("tfds", "run", "export"))
  start = time.perf_counter()
  train(data_dir, workdir)
  synthetic_export(workdir, out, args.items)
  print(f"run and {args.items}-row export made in {time.perf_counter() - start:.0f} s",
        flush=True)
  wav_path = sorted(glob.glob(os.path.join(
      REPO, "xmodal_jax", "data", "builders", "digit_sequences_assets", "audio", "en",
      "*.wav")))[0]
  with open(wav_path, "rb") as f:
    wav = f.read()
  kinds = requests_for(wav)
  rows = []

  def measure(query, search, request):
    qps, p50, p99 = load(url, request, args.requests, args.concurrency)
    rows.append({"query": query, "search": search, "queries_per_s": qps, "p50_ms": p50,
                 "p99_ms": p99})
    print(f"{query:6} {search:12} {qps:8.1f} q/s  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms",
          flush=True)

  for index_kind in ("ivf_pq", "flat"):
    build_indexes(out, index_kind)
    proc, url = start_service(data_dir, workdir, out)
    try:
      for query, requests in kinds.items():
        if index_kind == "ivf_pq":
          measure(query, "embed only", requests["embed"])
          measure(query, "exact", requests["search"](True))
        measure(query, f"FAISS {index_kind}", requests["search"](False))
    finally:
      proc.terminate()
      proc.wait()
  for row in rows:
    base = next(r for r in rows if r["query"] == row["query"] and r["search"] == "exact")
    row["qps_vs_exact"] = row["queries_per_s"] / base["queries_per_s"]
  print("\n| query | search | queries/s | vs exact | p50 ms | p99 ms |\n|---|---|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['query']} | {r['search']} | {r['queries_per_s']:.1f} | "
          f"{r['qps_vs_exact']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
  shutil.rmtree(tmp)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"cpu_count": os.cpu_count(), "items": args.items,
                 "requests": args.requests, "concurrency": args.concurrency,
                 "audio_query": os.path.relpath(wav_path, REPO), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
