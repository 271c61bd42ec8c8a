"""Resume cost: seconds from creating the training input at step k to its first batch, on
the default dataset read uncached, for the random-access reader training uses and, as the
baseline, the sequential reader (a shuffle buffer over the split read in order, which skips
the k * batch examples before the step; what `captions="expand"` still uses).

  python benchmarks/resume.py --out=benchmarks/results/resume_cpu2.json

Also checks that the batch at step k equals the k-th batch of an uninterrupted stream.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from configs import audio_video_text
from xmodal_jax.data import pipeline


def first_batch_seconds(make, start_step):
  start = time.perf_counter()
  batch = next(make(start_step))
  return time.perf_counter() - start, batch


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", default="10,10000,1000000",
                      help="resume steps for the random-access reader")
  parser.add_argument("--baseline_steps", default="10,1500",
                      help="resume steps for the sequential reader (slow: it re-reads)")
  parser.add_argument("--data_dir", default=None, help="where the default dataset is")
  parser.add_argument("--out", default=None, help="JSON file to write")
  args = parser.parse_args()
  config = audio_video_text.get_config()
  config.data.data_dir = args.data_dir
  config.data.cache = False
  builder = pipeline.get_builder(config.data)
  readers = {
      "random access": lambda k: pipeline.train_iterator(config, builder, start_step=k),
      "sequential": lambda k: pipeline._sequential_train_iterator(  # pylint: disable=protected-access
          config, builder, None, k, 0, 1)}
  steps = {"random access": [int(s) for s in args.steps.split(",")],
           "sequential": [int(s) for s in args.baseline_steps.split(",")]}
  rows = []
  for name, make in readers.items():
    next(make(0))  # warm up tf.data and the file cache
    for k in steps[name]:
      seconds, batch = first_batch_seconds(make, k)
      rows.append({"reader": name, "step": k, "seconds": seconds})
      print(f"{name:14} resume at step {k:>9,}: first batch after {seconds:7.2f} s",
            flush=True)
  # Exactness: the random-access reader's batch at step 12 is the uninterrupted stream's.
  stream = readers["random access"](0)
  for _ in range(12):
    next(stream)
  expected, (_, resumed) = next(stream), first_batch_seconds(readers["random access"], 12)
  jax.tree.map(np.testing.assert_array_equal, expected, resumed)
  base = {r["step"]: r["seconds"] for r in rows if r["reader"] == "random access"}
  first = min(base)
  print(f"\nrandom access: step {max(base):,} / step {first}: "
        f"{base[max(base)] / base[first]:.2f}x; batch at step 12 equal after a resume: yes")
  seq = {r["step"]: r["seconds"] for r in rows if r["reader"] == "sequential"}
  print(f"sequential: step {max(seq):,} / step {min(seq)}: {seq[max(seq)] / seq[min(seq)]:.2f}x")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"rows": rows, "batch_size": config.batch_size, "cpu_count": os.cpu_count(),
                 "examples": builder.info.splits[config.data.train_split].num_examples}, f,
                indent=1)


if __name__ == "__main__":
  main()
