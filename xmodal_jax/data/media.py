"""Reading media files into the raw arrays a dataset feature holds (int16 samples, uint8
frames), for builders and queries, and writing stored arrays back as files a browser plays
(WAV, WebM). Decoding goes through FFmpeg (PyAV): wav, flac, ogg, mp3, mp4, ... all take the
same path. A `source` is a local file's path or a file's bytes (read through any filesystem,
or out of a tar shard)."""

import io
import itertools
import os
import wave

import numpy as np

MIN_SOURCE_RATE = 1000  # Hz: below this a stream's header is taken to be wrong
MAX_AUDIO_SECONDS = 600.0  # the default longest audio file decoded (builds and queries)


def _check_exists(source, what):
  if isinstance(source, str) and not os.path.exists(source):
    raise FileNotFoundError(f"{source}: no such {what} file")


def _open(source):
  import av  # pylint: disable=g-import-not-at-top
  return av.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def _name(source):
  return source if isinstance(source, str) else f"<{len(source)} bytes>"


def decode_audio(source, sample_rate, max_seconds=MAX_AUDIO_SECONDS):
  """int16 mono samples [N] of an audio file, downmixed and resampled to `sample_rate` Hz.
  A stream that says it has fewer than MIN_SOURCE_RATE samples a second (a header whose rate
  would turn a few bytes into hours), or that goes on past `max_seconds`, is refused;
  decoding stops there, so memory stays bounded."""
  import av  # pylint: disable=g-import-not-at-top
  _check_exists(source, "audio")
  path = _name(source)
  chunks, count, limit = [], 0, int(max_seconds * sample_rate)
  try:
    with _open(source) as container:
      if not container.streams.audio:
        raise ValueError(f"{path}: no audio stream")
      rate = container.streams.audio[0].sample_rate
      if not rate or rate < MIN_SOURCE_RATE:
        raise ValueError(f"{path}: the audio stream says {rate} samples a second; expected "
                         f"at least {MIN_SOURCE_RATE}")
      resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
      for frame in itertools.chain(container.decode(audio=0), [None]):
        for resampled in resampler.resample(frame):
          chunks.append(resampled.to_ndarray().reshape(-1))
          count += len(chunks[-1])
        if count > limit:
          raise ValueError(f"{path}: longer than {max_seconds:g} s (decoding stopped there)")
  except av.error.FFmpegError as e:
    raise ValueError(f"{path}: cannot decode audio ({e})") from e
  if not chunks:
    raise ValueError(f"{path}: the audio stream has no samples")
  return np.concatenate(chunks).astype(np.int16)


def sample_indices(count, num_frames):
  """`num_frames` indices spread uniformly over `count` frames (centres of equal segments)."""
  if count < 1:
    raise ValueError("the video has no frames")
  return np.minimum(((np.arange(num_frames) + 0.5) * count / num_frames).astype(int),
                    count - 1)


def _frame_count(source):
  """Frames in a video file's first video stream: the header's count when it has one, else
  the number of packets (demuxing only, no decoding)."""
  with _open(source) as container:
    if not container.streams.video:
      raise ValueError(f"{_name(source)}: no video stream")
    stream = container.streams.video[0]
    if stream.frames > 0:
      return stream.frames
    return sum(1 for packet in container.demux(stream) if packet.size)


def _decode_frames(source, indices, pixel_format):
  """({index: frame} for the wanted `indices`, total decoded frames): one decoding pass that
  keeps only the wanted frames, so memory does not grow with the video's length."""
  wanted, kept, total = set(int(i) for i in indices), {}, 0
  with _open(source) as container:
    for total, frame in enumerate(container.decode(video=0), 1):
      if total - 1 in wanted:
        kept[total - 1] = frame.to_ndarray(format=pixel_format)
  return kept, total


def decode_video(source, num_frames, channels=3):
  """uint8 [num_frames, H, W, channels] sampled uniformly over a video file's frames, at the
  file's size; RGB (channels = 3) or luma (channels = 1). Only the sampled frames are kept:
  when the container does not state its frame count, packets are counted first, and a count
  that decoding proves wrong costs one more pass rather than keeping every frame."""
  import av  # pylint: disable=g-import-not-at-top
  _check_exists(source, "video")
  path = _name(source)
  if channels not in (1, 3):
    raise ValueError(f"video frames with {channels} channels: expected 1 or 3")
  pixel_format = "gray" if channels == 1 else "rgb24"
  try:
    count = _frame_count(source)
    if count < 1:
      raise ValueError(f"{path}: the video stream has no frames")
    frames, total = _decode_frames(source, sample_indices(count, num_frames), pixel_format)
    if total != count:
      if total < 1:
        raise ValueError(f"{path}: the video stream has no frames")
      count = total
      frames, _ = _decode_frames(source, sample_indices(count, num_frames), pixel_format)
  except av.error.FFmpegError as e:
    raise ValueError(f"{path}: cannot decode video ({e})") from e
  picked = np.stack([frames[i] for i in sample_indices(count, num_frames)])
  return picked[..., None] if picked.ndim == 3 else picked


def resize_frames(frames, height, width):
  """uint8 [T, h, w, C] -> uint8 [T, height, width, C] by area averaging."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if frames.shape[1:3] == (height, width):
    return frames
  resized = tf.image.resize(tf.cast(frames, tf.float32), (height, width), method="area")
  return np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)


def read_video(path, shape):
  """uint8 frames of `shape` [T, H, W, C] from a video file: T frames sampled uniformly,
  area-resized to H x W, RGB (C = 3) or luma (C = 1)."""
  num_frames, height, width, channels = shape
  return resize_frames(decode_video(path, num_frames, channels), height, width)


def encode_wav(samples, sample_rate):
  """The bytes of a mono 16-bit WAV file holding int16 `samples` at `sample_rate` Hz."""
  buffer = io.BytesIO()
  with wave.open(buffer, "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(int(sample_rate))
    f.writeframes(np.asarray(samples, "<i2").tobytes())
  return buffer.getvalue()


def encode_webm(frames, frame_rate):
  """The bytes of a WebM (VP8) file showing uint8 frames [T, H, W, C] (C = 3 or 1) at
  `frame_rate` per second; odd heights and widths lose their last row or column (VP8's
  4:2:0 chroma needs even sizes)."""
  import av  # pylint: disable=g-import-not-at-top
  frames = np.asarray(frames, np.uint8)
  if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or not len(frames):
    raise ValueError(f"frames of shape {frames.shape}: expected [T, H, W, 1 or 3], T > 0")
  height, width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
  if not height or not width:
    raise ValueError(f"frames of {frames.shape[1]}x{frames.shape[2]} pixels are too small")
  frames = np.ascontiguousarray(np.broadcast_to(
      frames[:, :height, :width], (len(frames), height, width, 3)))
  buffer = io.BytesIO()
  with av.open(buffer, "w", format="webm") as container:
    stream = container.add_stream("libvpx", rate=int(frame_rate))
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"crf": "10", "b:v": "1M"}
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode(None))
  return buffer.getvalue()
