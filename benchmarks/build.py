"""Dataset build rate: items/s of the manifest builder in one process and as a Beam pipeline
on DirectRunner with N worker processes, over the same manifest of real-format media.

  python benchmarks/build.py --items=400 --workers=2 --out=benchmarks/results/build_cpu2.json

Items: 10 s of 44.1 kHz audio (flac, decoded and resampled to 16 kHz), a 10 s 320x240 H.264
clip (8 frames kept as JPEG) and a caption, as loose files; the same items again as
webdataset tar shards. Each build runs `python -m xmodal_jax.data.build` in its own process
and is timed whole (start-up included, reported apart from the rate).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

import fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position


def write_items(root, count, shards, distinct=8):
  """A loose-file manifest and a shard manifest of the same `count` items (their media cycle
  through `distinct` files of each kind: every item is decoded all the same)."""
  from xmodal_jax.data import webdataset  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, "media"))
  media = []
  for i in range(distinct):
    audio = os.path.join(root, "media", f"a{i}.flac")
    fixtures.write_audio(audio, (rng.normal(size=441_000) * 3000).astype(np.int16), 44_100,
                         "flac")
    video = os.path.join(root, "media", f"v{i}.mp4")
    base = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    fixtures.write_mp4(video, np.stack([np.roll(np.repeat(np.repeat(base, 8, 0), 8, 1),
                                                4 * t, axis=1) for t in range(250)]), fps=25)
    with open(audio, "rb") as a, open(video, "rb") as v:
      media.append((audio, video, a.read(), v.read()))
  lines, samples = [], []
  for i in range(count):
    audio, video, audio_bytes, video_bytes = media[i % distinct]
    caption = f"item {i} " + " ".join(str(w) for w in rng.integers(0, 1000, 10))
    lines.append({"id": f"x{i:05d}", "split": "train", "audio": audio, "video": video,
                  "text": caption})
    samples.append((f"x{i:05d}", {"flac": audio_bytes, "mp4": video_bytes,
                                  "txt": caption.encode()}))
  with open(os.path.join(root, "loose.jsonl"), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)
  per_shard = -(-count // shards)
  for s in range(shards):
    webdataset.write_shard(os.path.join(root, f"shard-{s:03d}.tar"),
                           samples[s * per_shard:(s + 1) * per_shard])
  with open(os.path.join(root, "shards.jsonl"), "w", encoding="utf-8") as f:
    f.write(json.dumps({"split": "train", "tar": f"shard-{{000..{shards - 1:03d}}}.tar",
                        "audio": "flac", "video": "mp4", "text": "txt"}) + "\n")


def timed_build(manifest, data_dir, extra):
  cmd = [sys.executable, "-m", "xmodal_jax.data.build", f"--manifest={manifest}",
         "--modalities=audio:audio,video:video,text:text", "--name=bench",
         f"--data_dir={data_dir}", *extra]
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  seconds = time.perf_counter() - start
  if proc.returncode:
    raise RuntimeError(proc.stderr[-3000:])
  return seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--items", type=int, default=400)
  parser.add_argument("--workers", type=int, default=os.cpu_count())
  parser.add_argument("--out", default=None, help="JSON file to write")
  args = parser.parse_args()
  beam = ["--beam", f"--beam_options=--runner=DirectRunner --direct_num_workers={args.workers}"
          " --direct_running_mode=multi_processing"]
  runs = [("single process, loose files", "loose.jsonl", []),
          (f"Beam DirectRunner, {args.workers} worker processes, loose files", "loose.jsonl",
           beam),
          ("single process, webdataset shards", "shards.jsonl", []),
          (f"Beam DirectRunner, {args.workers} worker processes, webdataset shards",
           "shards.jsonl", beam)]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    write_items(tmp, args.items, shards=4)
    empty = os.path.join(tmp, "empty.jsonl")  # start-up cost: a one-item build
    with open(os.path.join(tmp, "loose.jsonl"), encoding="utf-8") as f, \
        open(empty, "w", encoding="utf-8") as g:
      g.write(f.readline())
    for name, manifest, extra in runs:
      overhead = timed_build(empty, os.path.join(tmp, f"o{len(rows)}"), extra)
      seconds = timed_build(os.path.join(tmp, manifest), os.path.join(tmp, f"d{len(rows)}"),
                            extra)
      rate = (args.items - 1) / max(seconds - overhead, 1e-9)
      rows.append({"build": name, "seconds": seconds, "startup_seconds": overhead,
                   "items_per_s": rate})
  base = rows[0]["items_per_s"]
  print(f"{'build':62} {'s':>7} {'start-up s':>10} {'items/s':>8} {'ratio':>6}")
  for row in rows:
    row["ratio"] = row["items_per_s"] / base
    print(f"{row['build']:62} {row['seconds']:7.1f} {row['startup_seconds']:10.1f} "
          f"{row['items_per_s']:8.2f} {row['ratio']:6.2f}")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"items": args.items, "workers": args.workers, "cpu_count": os.cpu_count(),
                 "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
