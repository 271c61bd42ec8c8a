"""Test helpers: small media files in real formats written by the tests (nothing is
downloaded), manifests of them and their builds, random batches and sharded train states of
a config, and ranks written out plainly."""

import itertools
import json
import os
import subprocess
import sys
import wave

import jax
import numpy as np

import conftest


def write_jpeg(path, seed, size=(24, 32)):
  """A random-coloured JPEG of `size` (H, W); returns its uint8 pixels."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  pixels = np.repeat(np.repeat(rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3),
                                            dtype=np.uint8), 8, 0), 8, 1)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(tf.io.encode_jpeg(pixels, quality=95).numpy())
  return pixels


def write_wav(path, seed, seconds=0.5, rate=16_000):
  """A 16-bit mono tone with noise; returns its int16 samples."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * rate)) / rate
  x = 0.5 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * rng.normal(size=t.size)
  samples = np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with wave.open(path, "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(rate)
    f.writeframes(samples.tobytes())
  return samples


def write_audio(path, samples, rate, codec):
  """Encodes int16 mono `samples` with PyAV's `codec` (flac, libopus for .ogg, mp3); PyAV
  converts them to the sample format and frame size the codec takes."""
  import av  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with av.open(path, "w") as container:
    stream = container.add_stream(codec, rate=rate, layout="mono")
    frame = av.AudioFrame.from_ndarray(samples[None], format="s16", layout="mono")
    frame.sample_rate = rate
    for packet in stream.encode(frame):
      container.mux(packet)
    for packet in stream.encode(None):
      container.mux(packet)


def write_mp4(path, frames, fps=8, options=(("crf", "10"),)):
  """Encodes uint8 RGB frames [T, H, W, 3] (H, W even; any iterable of [H, W, 3] with its
  first frame's size) as H.264 in the container the extension names (.mp4, .mkv, ...)."""
  import av  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  frames = iter(frames)
  first = next(frames)
  with av.open(path, "w") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.height, stream.width = first.shape[:2]
    stream.pix_fmt = "yuv420p"
    stream.options = dict(options)
    for f in itertools.chain([first], frames):
      for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode(None):
      container.mux(packet)


def random_batch(config, size, seed):
  """A batch of the config's shapes with random contents, ids in pairs (two rows of one item)
  and about a fifth of each modality's rows missing."""
  from xmodal_jax.data import source  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)

  def fill(path, x):
    if path[0].key == "_mask":
      return rng.random(x.shape) < 0.8
    if path[0].key == "_id":
      return (np.arange(size) // 2).astype(x.dtype)
    if np.issubdtype(x.dtype, np.integer):
      return rng.integers(1, 12, x.shape).astype(x.dtype)
    return rng.normal(size=x.shape).astype(x.dtype)
  from xmodal_jax import schema  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map_with_path(
      fill, source.abstract_batch(schema.fill_defaults(config), size))


def sharded_state(config, mesh_shape):
  """(config with tokenizers resolved, model, optimizer, mesh of `mesh_shape`, a random
  batch of config.batch_size, the state's shardings, a fresh state placed in them)."""
  from xmodal_jax import parallel, schema  # pylint: disable=g-import-not-at-top
  from xmodal_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from xmodal_jax import experiment  # pylint: disable=g-import-not-at-top
  config = schema.resolve(config, jax.device_count())
  model, _, tx, _, _ = experiment.build_model_and_optimizer(config)
  mesh = parallel.make_mesh(shape=mesh_shape)
  batch = random_batch(config, config.batch_size, seed=0)
  create = experiment.state_creator(config, model, tx)
  example = jax.tree.map(lambda x: x[:1], batch)
  shardings = sharding.state_shardings(jax.eval_shape(create, example), mesh, config.sharding)
  state = jax.jit(create, out_shardings=shardings)(example)
  return config, model, tx, mesh, batch, shardings, state


def numpy_ranks(query, gallery, query_ids, gallery_ids):
  """1 + #gallery items scoring strictly above the best positive, written out plainly."""
  scores = query @ gallery.T
  ranks = []
  for i in range(len(query)):
    positive = scores[i][gallery_ids == query_ids[i]].max()
    ranks.append(1 + int((scores[i] > positive).sum()))
  return np.array(ranks)


def write_manifest(path, items):
  """A JSONL manifest (xmodal_jax.data.build --manifest) of `items`."""
  with open(path, "w", encoding="utf-8") as f:
    for item in items:
      f.write(json.dumps(item) + "\n")


def build_cli(*args, check=True):
  """python -m xmodal_jax.data.build with `args`; its stderr raised when it fails."""
  proc = subprocess.run([sys.executable, "-m", "xmodal_jax.data.build", *args],
                        cwd=conftest.REPO, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if check and proc.returncode:
    raise AssertionError(proc.stderr[-3000:])
  return proc


def digit_manifest(root, num_train=40, num_test=10):
  """The embedded dataset's kind of items (4 handwritten digits, their spoken words, the
  words) written as files under `root` (a pathlib.Path): 8 kHz wav, H.264 MP4, and a JSONL
  manifest, items.jsonl. Built with DIGIT_FLAGS, they are the dataset digit_records."""
  from scipy.io import wavfile  # pylint: disable=g-import-not-at-top
  from xmodal_jax.data.builders import digit_sequences  # pylint: disable=g-import-not-at-top
  train, test = digit_sequences.split_sequences(0, 1000)
  pools = digit_sequences.split_handwriting(0)
  spoken = digit_sequences.load_spoken_digits()
  items = []
  os.makedirs(root / "media", exist_ok=True)
  for split, sequences, first in (("train", train[:num_train], 0),
                                  ("test", test[:num_test], 5000)):
    for key, ex in digit_sequences.make_items(sequences, pools[split], spoken, 1, first):
      audio = f"media/{key}.wav"
      wavfile.write(str(root / audio), digit_sequences.SAMPLE_RATE, ex["audio"])
      write_mp4(str(root / f"media/{key}.mp4"), np.repeat(ex["video"], 3, -1), fps=4)
      items.append({"id": f"clips/naïve/seq{key}", "split": split, "audio": audio,
                    "video": f"media/{key}.mp4", "text": ex["text"],
                    "label": ex["text"].split()[0]})  # its first digit, as a class
  write_manifest(root / "items.jsonl", items)
  return items


DIGIT_FLAGS = ("--modalities=audio:audio,video:video,text:text", "--name=digit_records",
               "--sample_rate=8000", "--video_frames=4", "--frame_size=8")
