"""Reading media files into the raw arrays a dataset feature holds (int16 samples, uint8
frames), for queries and builders."""

import os

import numpy as np


def read_wav(path):
  """(samples int16 or float32 [N] mono, sample rate) from a .wav file."""
  from scipy.io import wavfile  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such audio file")
  rate, samples = wavfile.read(path)
  if samples.ndim != 1:
    raise ValueError(f"{path}: expected mono audio, got {samples.shape[1]} channels")
  return samples, rate


def sample_indices(count, num_frames):
  """`num_frames` indices spread uniformly over `count` frames (centres of equal segments)."""
  if count < 1:
    raise ValueError("the video has no frames")
  return np.minimum(((np.arange(num_frames) + 0.5) * count / num_frames).astype(int),
                    count - 1)


def read_video(path, shape):
  """uint8 frames of `shape` [T, H, W, C] from a video file: T frames sampled uniformly,
  area-resized to H x W, RGB (C = 3) or luma (C = 1)."""
  import av  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such video file")
  num_frames, height, width, channels = shape
  if channels not in (1, 3):
    raise ValueError(f"video frames with {channels} channels: expected 1 or 3")
  try:
    with av.open(path) as container:
      frames = [f.to_ndarray(format="gray" if channels == 1 else "rgb24")
                for f in container.decode(video=0)]
  except av.error.FFmpegError as e:
    raise ValueError(f"{path}: cannot decode video ({e})") from e
  picked = np.stack([frames[i] for i in sample_indices(len(frames), num_frames)])
  if picked.ndim == 3:
    picked = picked[..., None]
  resized = tf.image.resize(tf.cast(picked, tf.float32), (height, width), method="area")
  return np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)
