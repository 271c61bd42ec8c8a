"""The alignment recipe's momentum queue on a mesh: what its two steps move between devices.

  python benchmarks/queue_sharding.py --devices=8 --batch=4096 --queue=65536 --dim=512

Compiles, over --devices devices (simulated CPU devices), the batch and the queue sharded by
rows: (1) value_and_grad of `alignment.queue_contrastive` (ITC against [batch keys; queue],
with momentum distillation) and (2) `alignment.enqueue` of the batch's keys, each two ways:
as XLA partitions the global-array code on its own (scores against the queue unconstrained,
one ring of Q rows) and kept on the queue's rows (`queue_columns`, and a ring block per
device: what the train step does). Reports per device the bytes each kind of collective
produces (from the compiled HLO) and the compiled temporary memory, as ratios to the first
way. Compile only: nothing runs, so it needs no accelerator.
"""

import argparse
import collections
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}


def collective_bytes(hlo_text):
  """{collective kind: bytes of its outputs} over a compiled (per-device) HLO module."""
  pattern = re.compile(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
  totals = collections.Counter()
  for line in hlo_text.splitlines():
    match = pattern.search(line)
    if not match:
      continue
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
      size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
      totals[match.group(2)] += size * BYTES.get(dtype, 4)
  return dict(totals)


def measure(piece, batch, queue_size, dim, in_place):
  """Compiles `piece` ("scores" or "enqueue") and reads what it moves."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from xmodal_jax import parallel  # pylint: disable=g-import-not-at-top
  from xmodal_jax.losses import alignment  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  rows = NamedSharding(mesh, P(parallel.DATA_AXIS))
  spec = lambda shape, dtype, sharding=rows: jax.ShapeDtypeStruct(shape, dtype,
                                                                  sharding=sharding)
  emb, queue = spec((batch, dim), np.float32), spec((queue_size, dim), np.float32)
  ids, mask, queue_ids = spec((batch,), np.int32), spec((batch,), bool), spec((queue_size,),
                                                                              np.int32)
  if piece == "scores":
    columns = NamedSharding(mesh, P(None, parallel.DATA_AXIS)) if in_place else None

    def scores(query, momentum_query, keys, queue, ids, mask, queue_ids):
      return alignment.queue_contrastive(query, momentum_query, keys, queue, 14.3, ids=ids,
                                         key_mask=mask, query_mask=mask, queue_ids=queue_ids,
                                         alpha=0.4, queue_columns=columns)[0]
    fn, args = jax.value_and_grad(scores), (emb, emb, emb, queue, ids, mask, queue_ids)
  else:
    shards = mesh.shape[parallel.DATA_AXIS] if in_place else 1

    def fn(queue, queue_ids, pointer, keys, ids, mask):
      queue, queue_ids, pointer = alignment.enqueue(queue, queue_ids, pointer, keys, ids, mask,
                                                    shards=shards)
      keep = lambda x: jax.lax.with_sharding_constraint(x, rows)
      return keep(queue), keep(queue_ids), pointer
    args = (queue, queue_ids, spec((), np.int32, NamedSharding(mesh, P())), emb, ids, mask)
  compiled = jax.jit(fn).lower(*args).compile()
  moved = collective_bytes(compiled.as_text())
  return {"piece": piece, "devices": mesh.size, "batch": batch, "queue": queue_size,
          "dim": dim, "in_place": in_place, "collective_bytes": moved,
          "collective_bytes_total": sum(moved.values()),
          "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
  parser.add_argument("--batch", type=int, default=4096, help="global batch")
  parser.add_argument("--queue", type=int, default=65536)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
  rows = [measure(piece, args.batch, args.queue, args.dim, in_place)
          for piece in ("scores", "enqueue") for in_place in (False, True)]
  mib = lambda b: f"{b / 2**20:9.1f} MiB"
  print(f"{rows[0]['devices']} devices, global batch {args.batch}, queue {args.queue} x "
        f"{args.dim} float32: per device")
  print(f"{'':34s} {'collectives':>13s} {'ratio':>7s} {'temp memory':>13s} {'ratio':>7s}  "
        "MiB by kind")
  for row in rows:
    base = next(r for r in rows if r["piece"] == row["piece"] and not r["in_place"])
    ratio = lambda key: row[key] / base[key] if base[key] else float(row[key] == 0)
    row["collective_ratio"], row["temp_ratio"] = (ratio("collective_bytes_total"),
                                                  ratio("temp_bytes"))
    kinds = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sorted(row["collective_bytes"].items()))
    way = "kept on the queue's rows" if row["in_place"] else "XLA's partitioning"
    print(f"{row['piece'] + ', ' + way:34s} {mib(row['collective_bytes_total'])} "
          f"{row['collective_ratio']:7.3f} {mib(row['temp_bytes'])} {row['temp_ratio']:7.3f}  "
          f"{kinds or '-'}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
