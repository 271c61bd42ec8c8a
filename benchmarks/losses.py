"""Forward+backward time and memory of the contrastive loss: dense vs gathered vs blockwise/ring.

  python benchmarks/losses.py --batch_sizes=4096,16384,65536 --modalities=2,3 --out=losses.json

For each (B, M, mode): compiled temporary memory from `compiled.memory_analysis()` and, where
it fits (`--run`), the median wall time of value_and_grad and, on GPU, the measured peak of
device memory. Modes: dense (one device, full B x B logits), gathered (shard_map over all
devices, local rows x all-gathered columns), blockwise (tiles of --block_size columns), ring
(shards travel by ppermute; several devices only). Sizes grow until the device runs out of
memory. Prints a table; writes JSON. Times are reported as ratios to dense at the same B, M.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from xmodal_jax import losses  # pylint: disable=g-import-not-at-top,wrong-import-position

NAMES = ("m0", "m1", "m2", "m3")


def make_fn(mode, block_size, mesh):
  impl = {"dense": "dense", "gathered": "dense", "blockwise": "blockwise", "ring": "ring"}[mode]
  sharded = mode in ("gathered", "ring") or (mode == "blockwise" and mesh.size > 1)

  def loss(emb, scale):
    return losses.contrastive_loss(emb, scale, impl=impl, block_size=block_size,
                                   axis_name="data" if sharded else None)[0]
  if sharded:
    loss = jax.shard_map(loss, mesh=mesh, in_specs=(P("data"), P()), out_specs=P())
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def inputs(batch, dim, m, mesh, sharded):
  keys = jax.random.split(jax.random.key(0), m)
  sharding = NamedSharding(mesh, P("data") if sharded else P())

  @functools.partial(jax.jit, out_shardings=sharding)
  def make(key):
    x = jax.random.normal(key, (batch, dim), np.float32)
    return x / jax.numpy.linalg.norm(x, axis=1, keepdims=True)
  return {NAMES[i]: make(keys[i]) for i in range(m)}


def measure(mode, batch, dim, m, block_size, mesh, run, repeats):
  sharded = mode in ("gathered", "ring") or (mode == "blockwise" and mesh.size > 1)
  fn = make_fn(mode, block_size, mesh)
  abstract = ({NAMES[i]: jax.ShapeDtypeStruct((batch, dim), np.float32) for i in range(m)},
              jax.ShapeDtypeStruct((), np.float32))
  row = {"mode": mode, "B": batch, "M": m, "d": dim, "block_size": block_size}
  try:
    compiled = fn.lower(*abstract).compile()
    analysis = compiled.memory_analysis()
    row["compiled_temp_bytes"] = int(analysis.temp_size_in_bytes) if analysis else None
  except Exception as e:  # pylint: disable=broad-except
    row["error"] = f"compile: {type(e).__name__}: {str(e)[:200]}"
    return row
  if not run:
    return row
  try:
    emb = inputs(batch, dim, m, mesh, sharded)
    scale = np.float32(14.3)
    jax.block_until_ready(compiled(emb, scale))
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    base = stats.get("peak_bytes_in_use")
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(emb, scale))
      times.append(time.perf_counter() - t0)
    row["time_ms"] = 1e3 * float(np.median(times))
    stats = device.memory_stats() or {}
    if base is not None:
      row["measured_peak_bytes"] = int(stats.get("peak_bytes_in_use", 0))
    del emb
  except Exception as e:  # pylint: disable=broad-except
    row["error"] = f"run: {type(e).__name__}: {str(e)[:200]}"
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_sizes", default="4096,16384,65536")
  parser.add_argument("--grow_until_oom", action="store_true",
                      help="after the listed sizes, keep doubling B until every mode fails")
  parser.add_argument("--modalities", default="2,3")
  parser.add_argument("--modes", default="dense,gathered,blockwise,ring")
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--block_size", type=int, default=4096)
  parser.add_argument("--run", action="store_true", help="time runs (else compile only)")
  parser.add_argument("--max_run_batch", type=int, default=1 << 30,
                      help="only compile (no run) above this B")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="benchmarks/results/losses.json")
  parser.add_argument("--isolate", action="store_true",
                      help="measure each row in a fresh process, so that the measured peak "
                           "memory (a per-process maximum) belongs to that row alone")
  parser.add_argument("--single", help=argparse.SUPPRESS)  # "mode,B,M": one row as JSON
  args = parser.parse_args()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  if args.single:
    mode, batch, m = args.single.split(",")
    row = measure(mode, int(batch), args.dim, int(m), args.block_size, mesh,
                  args.run and int(batch) <= args.max_run_batch, args.repeats)
    print("ROW " + json.dumps(row))
    return

  def measure_row(mode, batch, m):
    if not args.isolate:
      return measure(mode, batch, args.dim, m, args.block_size, mesh,
                     args.run and batch <= args.max_run_batch, args.repeats)
    cmd = [sys.executable, os.path.abspath(__file__), f"--single={mode},{batch},{m}",
           f"--dim={args.dim}", f"--block_size={args.block_size}",
           f"--max_run_batch={args.max_run_batch}", f"--repeats={args.repeats}"]
    proc = subprocess.run(cmd + (["--run"] if args.run else []), capture_output=True,
                          text=True)
    rows = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if not rows:
      return {"mode": mode, "B": batch, "M": m, "error": f"process: {proc.stderr[-200:]}"}
    return json.loads(rows[0])

  modes = [m for m in args.modes.split(",") if m not in ("gathered", "ring") or mesh.size > 1]
  sizes = [int(b) for b in args.batch_sizes.split(",")]
  rows = []
  print(f"{jax.devices()[0].platform} x {mesh.size}; d={args.dim}, block={args.block_size}")
  header = (f"{'M':>2} {'B':>8} {'mode':>10} {'temp MiB':>10} {'peak MiB':>10} {'ms':>9} "
            f"{'x dense':>8}")
  print(header)
  for m in [int(x) for x in args.modalities.split(",")]:
    batch_list = list(sizes)
    i = 0
    while i < len(batch_list):
      batch = batch_list[i]
      dense_ms, any_ok = None, False
      for mode in modes:
        row = measure_row(mode, batch, m)
        rows.append(row)
        ok = "error" not in row
        any_ok |= ok
        if mode == "dense" and "time_ms" in row:
          dense_ms = row["time_ms"]
        ratio = (row["time_ms"] / dense_ms) if dense_ms and "time_ms" in row else float("nan")
        row["time_vs_dense"] = None if np.isnan(ratio) else ratio
        fmt = lambda v: f"{v / 2**20:10.0f}" if v is not None else f"{'-':>10}"
        print(f"{m:>2} {batch:>8} {mode:>10} {fmt(row.get('compiled_temp_bytes'))} "
              f"{fmt(row.get('measured_peak_bytes'))} {row.get('time_ms', float('nan')):9.2f} "
              f"{ratio:8.2f}" + (f"  {row['error'][:60]}" if not ok else ""), flush=True)
      if args.grow_until_oom and i == len(batch_list) - 1 and any_ok:
        batch_list.append(batch * 2)
      i += 1
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"device": str(jax.devices()[0].device_kind), "devices": mesh.size,
               "rows": rows}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
