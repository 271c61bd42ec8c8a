"""Soak check: a tiny run and its export killed (SIGKILL) at random moments, re-run each time,
must end as an uninterrupted run ends.

  python benchmarks/soak.py [--kills=20] [--seed=0] [--out=benchmarks/results/soak_cpu2.json]

An uninterrupted reference trains the tiny config (`--steps` steps: checkpoints every 5,
three evaluations) and exports its test split in small shards, timing both. Then a second
workdir is trained with SIGKILLs at moments drawn uniformly over the first `--window`
seconds of each start (start-up, steps, saves and evaluations alike), each followed by a
re-run, until
`--kills` minus the export's share have landed; the run is finished, and its export is
killed the same way (a third of the kills; an export that finishes before its kill is
deleted and started again) and finished. Checked: every logged step appears
once with the reference's loss, the final metrics and every exported embedding equal the
reference's, and no temporary file (Orbax's tmp folders, .tmp, .partial-*) is left behind.
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

LEFTOVER = re.compile(r"\.tmp$|\.partial-\d+$|orbax-checkpoint-tmp|^incomplete\.")


def train_args(data_dir, workdir, steps):
  return [f"--config={os.path.join(REPO, 'configs', 'audio_video_text.py')}:tiny",
          f"--config.data.data_dir={data_dir}", f"--workdir={workdir}",
          f"--config.total_steps={steps}", "--config.checkpoint_every=5",
          "--config.log_every=5", f"--config.evals.retrieval.every={max(1, steps // 3)}",
          "--config.evals.retrieval.fused=none"]


def start(launcher, args):
  return subprocess.Popen([sys.executable, os.path.join(REPO, "launch", launcher), *args],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def finish(launcher, args):
  """Runs to the end; returns its wall time."""
  began = time.perf_counter()
  proc = start(launcher, args)
  _, err = proc.communicate()
  if proc.returncode:
    raise SystemExit(f"{launcher} failed ({proc.returncode}):\n{err[-3000:]}")
  return time.perf_counter() - began


def kill_at_random(launcher, args, window, rng):
  """Starts the launcher and SIGKILLs it after a uniform draw over `window` seconds;
  returns the delay, or None when it finished first."""
  delay = rng.uniform(0.5, window)
  proc = start(launcher, args)
  try:
    proc.wait(timeout=delay)
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return delay
  if proc.returncode:
    raise SystemExit(f"{launcher} failed ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
  return None


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def leftovers(*roots):
  found = []
  for root in roots:
    for folder, dirs, names in os.walk(root):
      found.extend(os.path.relpath(os.path.join(folder, n), root)
                   for n in dirs + names if LEFTOVER.search(n))
  return found


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--window", type=float, default=30.0,
                      help="a kill lands uniformly within this many seconds of a start")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="JSON file to write")
  args = parser.parse_args()
  from xmodal_jax.eval import export
  rng = random.Random(args.seed)
  tmp = tempfile.mkdtemp(prefix="soak_")
  data_dir = os.path.join(tmp, "tfds")
  os.makedirs(data_dir)
  ref, soaked = os.path.join(tmp, "reference"), os.path.join(tmp, "soaked")
  export_flags = ["--shard_rows=128"]
  finish("train.py", train_args(data_dir, ref, 1)  # builds the dataset, warms the cache
         + ["--config.optimizer.warmup_steps=0"])
  shutil.rmtree(ref)
  train_s = finish("train.py", train_args(data_dir, ref, args.steps))
  export_s = finish("export.py", train_args(data_dir, ref, args.steps)
                    + [f"--out={ref}_export", *export_flags])
  print(f"reference: training {train_s:.0f} s, export {export_s:.0f} s", flush=True)

  export_kills = args.kills // 3
  landed = {"train": [], "export": []}
  while len(landed["train"]) < args.kills - export_kills:
    delay = kill_at_random("train.py", train_args(data_dir, soaked, args.steps),
                           min(train_s, args.window), rng)
    if delay is None:
      break  # finished: every step is done
    landed["train"].append(delay)
    steps = [r["step"] for r in read_metrics(soaked)] if os.path.exists(
        os.path.join(soaked, "metrics.jsonl")) else []
    print(f"kill {len(landed['train'])}: training, after {delay:.1f} s (logged up to step "
          f"{max(steps, default=0)})", flush=True)
  finish("train.py", train_args(data_dir, soaked, args.steps))
  while len(landed["export"]) < export_kills:
    delay = kill_at_random("export.py", train_args(data_dir, soaked, args.steps)
                           + [f"--out={soaked}_export", *export_flags], export_s, rng)
    if delay is None:  # it finished first: export again from nothing, for the next kill
      shutil.rmtree(f"{soaked}_export")
      continue
    landed["export"].append(delay)
    print(f"kill {len(landed['train']) + len(landed['export'])}: export, after "
          f"{delay:.1f} s", flush=True)
  finish("export.py", train_args(data_dir, soaked, args.steps)
         + [f"--out={soaked}_export", *export_flags])

  reference, got = read_metrics(ref), read_metrics(soaked)
  losses = lambda records: [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
  final = lambda records: {k: v for k, v in records[-1].items() if k.startswith("test/")}
  steps_once = [s for s, _ in losses(got)] == [s for s, _ in losses(reference)]
  loss_diff = max(abs(a[1] - b[1]) for a, b in zip(losses(got), losses(reference)))
  metric_diff = max(abs(final(got)[k] - v) for k, v in final(reference).items())
  exported = {name: export.read_export(f"{root}_export") for name, root in
              (("reference", ref), ("soaked", soaked))}
  export_diff = max(float(np.abs(exported["soaked"].embeddings(m)
                                 - exported["reference"].embeddings(m)).max())
                    for m in exported["reference"].modalities)
  same_keys = list(exported["soaked"].keys()) == list(exported["reference"].keys())
  left = leftovers(soaked, f"{soaked}_export")
  results = {"kills_training": len(landed["train"]), "kills_export": len(landed["export"]),
             "kill_delays_s": landed, "steps": args.steps, "reference_train_s": train_s,
             "reference_export_s": export_s, "each_step_logged_once": steps_once,
             "max_loss_difference": loss_diff, "max_final_metric_difference": metric_diff,
             "max_export_difference": export_diff, "export_keys_equal": same_keys,
             "leftover_files": left}
  print(f"\n| check | result |\n|---|---|\n| kills landed (training / export) | "
        f"{len(landed['train'])} / {len(landed['export'])} |\n"
        f"| each logged step once | {steps_once} |\n"
        f"| max loss difference | {loss_diff:.3g} |\n"
        f"| max final metric difference | {metric_diff:.3g} |\n"
        f"| max export difference | {export_diff:.3g}, keys equal: {same_keys} |\n"
        f"| leftover temporary files | {len(left)} {left[:5]} |")
  shutil.rmtree(tmp)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
  ok = steps_once and same_keys and not left and max(loss_diff, metric_diff,
                                                     export_diff) <= 1e-6
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
