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
Part 4 (--parts=mixture): examples/s of the default config's train input with the digit
  train split as one source and as a mixture of its three thirds (the same total data),
  whose sources provide every modality or different ones, and the ratio to one source.
Part 3 (--parts=pod): examples/s of the real train input (records read by position, decoded,
  preprocessed, batched, tokenized) of each pod variant on synthetic items in its stored
  format, using every core of this host, for the tf.data settings that matter (private
  thread pool, autotune RAM budget, records cached or read per batch); against what one
  host of a v5e-256 consumes: its 8 chips' share of the global batch per step, the step time
  taken as the compiled step's FLOPs per chip (benchmarks/results/pod_compile_*.json) over
  the chip's 197 bf16 TFLOP/s at an assumed 50% utilization (a faster step needs more input).
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import ml_collections
import numpy as np
import tensorflow as tf

import fixtures  # tests/fixtures.py: media files in real formats
from xmodal_jax.data import encoding, media, preprocess, records


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
  options = encoding.BuildOptions(video_frames=8, frame_size=256)
  rows.append({"stage": "build", "modality": "video .mp4 10 s 320x240 -> 8 JPEG",
               "items_per_s": rate(lambda: encoding.encode_video(video, video, "v", options),
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
  from xmodal_jax import experiment as experiment_lib
  from xmodal_jax.train import step as step_lib
  config = audio_video_text.get_config()
  config.data.data_dir = data_dir
  with tempfile.TemporaryDirectory() as workdir:
    experiment = experiment_lib.setup(config, workdir)
  train_fn = step_lib.jit_train_step(config, experiment.model, experiment.tx, experiment.mesh,
                                     experiment.shardings, experiment.rules)
  batches = experiment.train_batches(0)
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


# One v5e-256 host (Cloud TPU v5e docs: 16x16 is 32 hosts of 8 chips, 224 vCPUs each).
HOST_CHIPS, HOST_VCPUS, CHIP_BF16_FLOPS, ASSUMED_MFU = 8, 224, 197e12, 0.5
# (pod variant, its compile result file and row, micro-batches the row's FLOPs count once)
POD_VARIANTS = [
    ("image_text.py:L", "pod_compile_v5e256.json", "image_text:L (ViT-L/14 + text-L), fsdp=16"),
    ("audio_video_text.py:pod", "pod_compile_v5e256_pod.json",
     "audio_video_text:pod (AST-B + ViT-B/16 frames + text-B)"),
]
SETTINGS = {  # name -> config.data overrides
    "as shipped (tf.data's shared pool, AUTOTUNE)": {},
    "private thread pool = cores": {"threads": os.cpu_count()},
    "autotune RAM budget 2 GiB": {"ram_budget_gb": 2},
    "records cached in memory": {"cache": True},
}


def needed_rate(config, result_file, row_name):
  """(examples/s one host consumes, step seconds, TFLOP per chip) for a pod variant."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", result_file)
  with open(path, encoding="utf-8") as f:
    row = next(r for r in json.load(f)["rows"] if r["row"] == row_name)
  # XLA counts a loop's body once: with k micro-batches the step runs it k times.
  flops = row["flops"] * row.get("grad_accum_steps", 1)
  step = flops / (CHIP_BF16_FLOPS * ASSUMED_MFU)
  per_host = config.batch_size // row["devices"] * HOST_CHIPS
  return per_host / step, step, flops / 1e12


def synthetic_items(root, config, count):
  """`count` items in `config`'s modalities, as files a manifest names: 640x480 JPEG images,
  10 s 44.1 kHz wav audio, 10 s 320x240 H.264 video, captions of 12 words."""
  rng = np.random.default_rng(0)
  kinds = {name: m.kind for name, m in config.modalities.items()}
  clip = None
  items = []
  for i in range(count):
    item = {"id": i, "split": "train"}
    for name, kind in kinds.items():
      path = os.path.join(root, f"{name}{i}")
      if kind == "image":
        fixtures.write_jpeg(path + ".jpg", i, size=(480, 640))
        item[name] = path + ".jpg"
      elif kind == "audio":
        fixtures.write_wav(path + ".wav", i, seconds=10.0, rate=44_100)
        item[name] = path + ".wav"
      elif kind == "video":
        if clip is None:
          clip = os.path.join(root, "clip.mp4")
          base = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
          fixtures.write_mp4(clip, np.stack([np.roll(np.repeat(np.repeat(base, 8, 0), 8, 1),
                                                     4 * t, axis=1) for t in range(250)]),
                             fps=25)
        item[name] = clip
      elif kind == "text":
        item[name] = [" ".join(f"t{w}" for w in rng.integers(2, 49_408, 12))
                      for _ in range(5)]
    items.append(item)
  return items, kinds


def pod_rates(batch_size, batches, items):
  """Rows of examples/s per pod variant and setting, with the host's need."""
  from configs import audio_video_text, image_text
  from xmodal_jax.data import pipeline
  from pod_compile import placeholder_tokenizer
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = placeholder_tokenizer(os.path.join(tmp, "tokenizer"))
    for variant, result_file, row_name in POD_VARIANTS:
      module, name = variant.split(".py:")
      get_config = {"image_text": image_text, "audio_video_text": audio_video_text}[module]
      config = get_config.get_config(name)
      need, step, tflop = needed_rate(config, result_file, row_name)
      folder = os.path.join(tmp, module)
      os.makedirs(folder)
      manifest_items, kinds = synthetic_items(folder, config, items)
      manifest = os.path.join(folder, "items.jsonl")
      with open(manifest, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(item) + "\n" for item in manifest_items)
      video = [m for m in config.modalities.values() if m.kind == "video"]
      options = encoding.BuildOptions(
          sample_rate=16_000, video_frames=video[0].num_frames if video else 8,
          frame_size=256)
      builder = records.manifest_builder(f"pod_{module}", manifest, kinds, options=options,
                                         data_dir=os.path.join(tmp, "data"))
      builder.download_and_prepare()
      config.modalities.text.tokenizer = tokenizer
      config.data.update(name=f"pod_{module}", data_dir=os.path.join(tmp, "data"))
      config.batch_size = batch_size
      for setting, overrides in SETTINGS.items():
        trial = config.copy_and_resolve_references()
        trial.data.update(overrides)
        stream = pipeline.train_iterator(trial, builder, process_index=0, process_count=1)
        for _ in range(2):
          next(stream)
        start = time.perf_counter()
        for _ in range(batches):
          next(stream)
        rate_here = batches * batch_size / (time.perf_counter() - start)
        per_core = rate_here / os.cpu_count()
        rows.append({"variant": variant, "setting": setting, "examples_per_s": rate_here,
                     "per_core": per_core, "host_needs": need, "step_s": step,
                     "tflop_per_chip": tflop, "cores_needed": need / per_core})
        print(f"  {variant:24} {setting:46} {rate_here:8.1f} ex/s here, {per_core:7.1f} "
              f"per core; a host needs {need:7.1f} ({need / per_core:5.1f} of its "
              f"{HOST_VCPUS} vCPUs)", flush=True)
        del stream
  return rows


def mixture_rates(batches, data_dir, repeats=3):
  """Examples/s of the default config's train input: the digit train split read as one
  source, and as 3 sources of its thirds (config.data.sources, weights by size), each
  providing every modality or, as a real mixture's datasets do, different ones (audio+text,
  video+text, all); records cached in memory (the default) or read per batch. The median
  over `repeats` fresh streams of `batches` each, the variants measured in turn (in reverse
  order every other repeat); each repeat's ratio to its own one-source stream, whose median
  and range show the ratio apart from the machine's drift between repeats, and the process's
  CPU seconds per batch (all threads), which scheduling noise moves less than the rate."""
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  from xmodal_jax import schema  # pylint: disable=g-import-not-at-top
  from xmodal_jax.data import source as source_lib  # pylint: disable=g-import-not-at-top
  thirds = {"a": ("train[:3000]", ("audio", "text")), "b": ("train[3000:6000]",
                                                          ("video", "text")),
            "c": ("train[6000:]", ("audio", "video", "text"))}
  variants = {"one source": {}, "3 sources, every modality": {
      name: (split, ()) for name, (split, _) in thirds.items()},
              "3 sources, different modalities": thirds}
  rows = []
  for cache in (True, False):
    rates = {variant: [] for variant in variants}
    cpu = {variant: [] for variant in variants}
    for repeat in range(repeats):
      order = list(variants.items())[::-1 if repeat % 2 else 1]
      for variant, sources in order:  # one stream at a time: none in background
        config = audio_video_text.get_config()
        config.data.update(data_dir=data_dir, cache=cache)
        config.data.sources = {
            name: dict(name="digit_sequences", data_dir=data_dir, split=split,
                       features={m: m for m in provided})
            for name, (split, provided) in sources.items()}
        config = schema.resolve(config, 1)
        stream = source_lib.Source.open(source_lib.input_config(config)).train_batches()
        for _ in range(3):
          next(stream)
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
          next(stream)
        rates[variant].append(batches * config.batch_size / (time.perf_counter() - start))
        cpu[variant].append((time.process_time() - start_cpu) / batches)
        stream.close()
    for variant, measured in rates.items():
      rate_ = float(np.median(measured))
      paired = np.array(measured) / np.array(rates["one source"])
      cpu_paired = np.array(cpu[variant]) / np.array(cpu["one source"])
      rows.append({"cache": cache, "sources": variant, "examples_per_s": rate_,
                   "runs": measured,
                   "ratio_to_one_source": rate_ / float(np.median(rates["one source"])),
                   "paired_ratios": paired.tolist(),
                   "median_paired_ratio": float(np.median(paired)),
                   "cpu_s_per_batch": cpu[variant],
                   "median_paired_cpu_ratio": float(np.median(cpu_paired))})
      print(f"cache={cache!s:5} {variant:32}: {rate_:8.0f} examples/s "
            f"({rows[-1]['ratio_to_one_source']:.2f}x; per repeat: median "
            f"{np.median(paired):.2f}x, {paired.min():.2f}-{paired.max():.2f}; CPU per batch "
            f"{1e3 * np.median(cpu[variant]):.1f} ms, {np.median(cpu_paired):.2f}x)", flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parts", default="per_core,step,pod,mixture",
                      help="comma-separated: per_core, step, pod, mixture")
  parser.add_argument("--items", type=int, default=64, help="items per read-time measurement "
                      "and synthetic items per pod dataset")
  parser.add_argument("--steps", type=int, default=30, help="train steps per measurement")
  parser.add_argument("--pod_batch", type=int, default=128, help="batch of the pod input "
                      "measurements (the rate hardly depends on it)")
  parser.add_argument("--pod_batches", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3, help="fresh streams per mixture "
                      "measurement (their median is reported)")
  parser.add_argument("--data_dir", default=None, help="where the default dataset is (built "
                      "if missing)")
  parser.add_argument("--out", default=None, help="JSON file to write")
  args = parser.parse_args()
  parts = set(args.parts.split(","))
  out = {"cpu_count": os.cpu_count(), "device": jax.devices()[0].device_kind}
  if "per_core" in parts:
    with tempfile.TemporaryDirectory() as tmp:
      rows = build_time_rates(tmp, max(2, args.items // 8)) + read_time_rates(args.items)
    print(f"{'stage':6} {'modality':52} {'items/s/core':>12}")
    for row in rows:
      print(f"{row['stage']:6} {row['modality']:52} {row['items_per_s']:12.1f}")
    out["per_core"] = rows
  if "step" in parts:
    real, in_memory = step_ratio(args.steps, args.data_dir)
    print(f"\ndefault config train step ({jax.device_count()} device(s), {os.cpu_count()} CPU "
          f"cores): in-memory batch {1e3 * in_memory:.1f} ms, real pipeline "
          f"{1e3 * real:.1f} ms: ratio {real / in_memory:.3f}")
    out["train_step_s"] = {"real_pipeline": real, "in_memory": in_memory,
                           "ratio": real / in_memory, "steps": args.steps}
  if "pod" in parts:
    print(f"\npod input, {os.cpu_count()} cores, batch {args.pod_batch}:")
    out["pod"] = pod_rates(args.pod_batch, args.pod_batches, args.items)
    out["pod_assumptions"] = {"host_chips": HOST_CHIPS, "host_vcpus": HOST_VCPUS,
                              "chip_bf16_flops": CHIP_BF16_FLOPS, "mfu": ASSUMED_MFU}
  if "mixture" in parts:
    print(f"\nmixture input, default config, {os.cpu_count()} cores:")
    out["mixture"] = mixture_rates(args.steps, args.data_dir, args.repeats)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
