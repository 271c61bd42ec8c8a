"""Input pipeline throughput: items/s per CPU core for each modality, and whether the real
pipeline keeps up with the default config's train step.

  python benchmarks/pipeline.py --out=benchmarks/results/pipeline_cpu2.json

Part 1 (one core: tf.data runs with a private threadpool of 1 thread, sequential map):
  build time: decode + resample audio files (wav, flac, mp3; 10 s at 44.1 kHz -> 16 kHz),
              decode a video file into 8 JPEG frames (10 s of 320 x 240 H.264);
  read time:  image (640 x 480 JPEG -> 224 random-resized crop + flip, or centre crop),
              video (8 stored JPEG frames -> 8 x 224 x 224), audio (crop 10 s), text
              (one tokenizer call per batch of 256 captions).
Part 2: median train-step time of configs/audio_video_text.py fed by the real pipeline
  (next(batches) inside the timed loop) vs the same step fed one in-memory batch over and
  over; the ratio is the pipeline's overhead (1.0 = the step never waits for data).
"""

import argparse
import functools
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import ml_collections
import numpy as np
import tensorflow as tf

import fixtures  # tests/fixtures.py: media files in real formats
from xmodal_jax.data import media, preprocess, records


def rate(fn, n, warmup=1):
  for _ in range(warmup):
    fn()
  start = time.perf_counter()
  for _ in range(n):
    fn()
  return n / (time.perf_counter() - start)


def one_core(ds):
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


def dataset_rate(values, op, n):
  """Items/s of `op` mapped over `values` repeated to n items, on one core."""
  ds = tf.data.Dataset.from_tensor_slices(values).repeat().take(n)
  ds = one_core(ds.enumerate().map(lambda i, x: op(x, tf.stack([tf.constant(0, tf.int64), i]))))
  for _ in ds.take(2):
    pass
  start = time.perf_counter()
  for _ in ds:
    pass
  return n / (time.perf_counter() - start)


def build_time_rates(tmp, n):
  rows = []
  samples = fixtures.write_wav(os.path.join(tmp, "a.wav"), 1, seconds=10.0, rate=44_100)
  for codec, ext in [("pcm_s16le", "wav"), ("flac", "flac"), ("mp3", "mp3")]:
    path = os.path.join(tmp, f"a.{ext}")
    if ext != "wav":
      fixtures.write_audio(path, samples, 44_100, codec)
    rows.append({"stage": "build", "modality": f"audio .{ext} 10 s 44.1k->16k",
                 "items_per_s": rate(lambda p=path: media.decode_audio(p, 16_000), n)})
  rng = np.random.default_rng(0)
  base = rng.integers(0, 256, (240 // 8, 320 // 8, 3), dtype=np.uint8)
  frames = np.stack([np.roll(np.repeat(np.repeat(base, 8, 0), 8, 1), 4 * t, axis=1)
                     for t in range(250)])  # 10 s at 25 fps
  video = os.path.join(tmp, "v.mp4")
  fixtures.write_mp4(video, frames, fps=25)
  options = records.BuildOptions(video_frames=8, frame_size=256)
  rows.append({"stage": "build", "modality": "video .mp4 10 s 320x240 -> 8 JPEG",
               "items_per_s": rate(lambda: records.encode_video(video, video, "v", options),
                                   max(2, n // 4))})
  return rows


def read_time_rates(n):
  rows = []
  rng = np.random.default_rng(0)
  image = tf.io.encode_jpeg(np.repeat(np.repeat(
      rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), 8, 0), 8, 1), quality=90).numpy()
  config = ml_collections.ConfigDict(dict(kind="image", image_size=224))
  for train in (True, False):
    rows.append({"stage": "read", "modality": f"image 640x480 JPEG -> 224 "
                 f"({'train crop+flip' if train else 'eval centre crop'})",
                 "items_per_s": dataset_rate([image] * 4, preprocess.get_op(
                     "image", config, train), n)})
  jpegs = [tf.io.encode_jpeg(np.repeat(np.repeat(rng.integers(0, 256, (32, 42, 3),
                                                              dtype=np.uint8), 8, 0), 8, 1),
                             quality=90).numpy() for _ in range(8)]  # 256 x 336 frames
  video_config = ml_collections.ConfigDict(dict(kind="video", num_frames=8, frame_size=224,
                                                channels=3, sampling="random"))
  rows.append({"stage": "read", "modality": "video 8 JPEG 256x336 -> 8x224x224",
               "items_per_s": dataset_rate(np.array([jpegs] * 4, dtype=object),
                                           preprocess.get_op("video", video_config, True),
                                           max(8, n // 4))})
  audio = (rng.normal(size=(4, 160_000)) * 3000).astype(np.int16)
  audio_config = ml_collections.ConfigDict(dict(kind="audio", num_samples=160_000))
  rows.append({"stage": "read", "modality": "audio 10 s int16 -> float crop",
               "items_per_s": dataset_rate(audio, preprocess.get_op("audio", audio_config,
                                                                    True), n * 10)})
  text_config = ml_collections.ConfigDict(dict(kind="text", tokenizer="digit_words",
                                               max_length=8))
  tokenize = preprocess.get_batch_op("text", text_config)
  batch = {"text": np.array([b"seven one four two"] * 256, dtype=object)}
  rows.append({"stage": "read", "modality": "text (digit words) tokenized per batch of 256",
               "items_per_s": 256 * rate(lambda: tokenize(batch), max(4, n // 8))})
  return rows


def step_ratio(steps, data_dir):
  """(median s/step with the real pipeline, with one in-memory batch)."""
  from configs import audio_video_text
  from xmodal_jax import parallel
  from xmodal_jax.data import pipeline
  from xmodal_jax.train import experiment as experiment_lib, step as step_lib
  config = audio_video_text.get_config()
  config.data.data_dir = data_dir
  with tempfile.TemporaryDirectory() as workdir:
    experiment = experiment_lib.setup(config, workdir)
  train_fn = jax.jit(functools.partial(
      step_lib.train_step, model=experiment.model, tx=experiment.tx, loss_config=config.loss,
      mesh=experiment.mesh, seed=config.seed))
  batches = pipeline.train_iterator(config, experiment.builder)
  state = experiment.state
  fixed = parallel.shard_batch(next(batches), experiment.mesh)

  def timed(get_batch):
    nonlocal state
    times = []
    for i in range(steps + 3):
      start = time.perf_counter()
      state, metrics = train_fn(state, get_batch())
      jax.block_until_ready(metrics)
      if i >= 3:
        times.append(time.perf_counter() - start)
    return float(np.median(times))
  in_memory = timed(lambda: fixed)
  real = timed(lambda: parallel.shard_batch(next(batches), experiment.mesh))
  return real, in_memory


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--items", type=int, default=64, help="items per read-time measurement")
  parser.add_argument("--steps", type=int, default=30, help="train steps per measurement")
  parser.add_argument("--data_dir", default=None, help="where the default dataset is (built "
                      "if missing)")
  parser.add_argument("--out", default=None, help="JSON file to write")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    rows = build_time_rates(tmp, max(2, args.items // 8)) + read_time_rates(args.items)
  print(f"{'stage':6} {'modality':52} {'items/s/core':>12}")
  for row in rows:
    print(f"{row['stage']:6} {row['modality']:52} {row['items_per_s']:12.1f}")
  real, in_memory = step_ratio(args.steps, args.data_dir)
  print(f"\ndefault config train step ({jax.device_count()} device(s), {os.cpu_count()} CPU "
        f"cores): in-memory batch {1e3 * in_memory:.1f} ms, real pipeline "
        f"{1e3 * real:.1f} ms: ratio {real / in_memory:.3f}")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"per_core": rows, "train_step_s": {"real_pipeline": real,
                                                     "in_memory": in_memory,
                                                     "ratio": real / in_memory},
                 "cpu_count": os.cpu_count(), "device": jax.devices()[0].device_kind,
                 "steps": args.steps}, f, indent=1)


if __name__ == "__main__":
  main()
