"""Reading media files into the raw arrays a dataset feature holds (int16 samples, uint8
frames), for builders and queries, and writing stored arrays back as files a browser plays
(WAV, WebM). Decoding goes through FFmpeg (PyAV): wav, flac, ogg, mp3, mp4, ... all take the
same path. A `source` is a local file's path or a file's bytes (read through any filesystem,
or out of a tar shard)."""

import io
import itertools
import os
import struct
import wave

import numpy as np

MIN_SOURCE_RATE = 1000  # Hz: below this a stream's header is taken to be wrong
MAX_AUDIO_SECONDS = 600.0  # the default longest audio file decoded (builds and queries)
MAX_PIXELS = 64 << 20  # the default largest image or video frame decoded (width x height)
MAX_VIDEO_FRAMES = 216_000  # the default longest video decoded: 2 hours at 30 frames/s


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


def check_pixels(path, height, width, max_pixels):
  if height * width > max_pixels:
    raise ValueError(f"{path}: {width}x{height} pixels, over the {max_pixels:,}-pixel bound "
                     "(decoding refused)")


def image_size(data):
  """(height, width) from an encoded image's header (JPEG, PNG, GIF, BMP), without decoding
  it; None for other formats."""
  if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
    width, height = struct.unpack(">II", data[16:24])
    return height, width
  if data[:4] == b"GIF8" and len(data) >= 10:
    width, height = struct.unpack("<HH", data[6:10])
    return height, width
  if data[:2] == b"BM" and len(data) >= 26:
    width, height = struct.unpack("<ii", data[18:26])
    return abs(height), abs(width)
  if data[:2] == b"\xff\xd8":  # JPEG: the first start-of-frame marker holds the size
    i = 2
    while i + 9 <= len(data) and data[i] == 0xFF:
      marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
      if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
        height, width = struct.unpack(">HH", data[i + 5:i + 9])
        return height, width
      i += 2 + length
  return None


def _frame_count(source, max_pixels=MAX_PIXELS, max_frames=MAX_VIDEO_FRAMES):
  """Frames in a video file's first video stream: the header's count when it has one, else
  the number of packets (demuxing only, no decoding). Frames over `max_pixels` or more than
  `max_frames` of them are refused before any is decoded."""
  with _open(source) as container:
    if not container.streams.video:
      raise ValueError(f"{_name(source)}: no video stream")
    stream = container.streams.video[0]
    check_pixels(_name(source), stream.codec_context.height, stream.codec_context.width,
                 max_pixels)
    count = stream.frames
    if count <= 0:
      count = 0
      for packet in container.demux(stream):
        count += bool(packet.size)
        if count > max_frames:
          break
    if count > max_frames:
      raise ValueError(f"{_name(source)}: more than {max_frames:,} frames, the bound "
                       "(decoding refused)")
    return count


def _decode_frames(source, indices, pixel_format):
  """({index: frame} for the wanted `indices`, total decoded frames): one decoding pass that
  keeps only the wanted frames, so memory does not grow with the video's length."""
  wanted, kept, total = set(int(i) for i in indices), {}, 0
  with _open(source) as container:
    for total, frame in enumerate(container.decode(video=0), 1):
      if total - 1 in wanted:
        kept[total - 1] = frame.to_ndarray(format=pixel_format)
  return kept, total


def decode_video(source, num_frames, channels=3, max_pixels=MAX_PIXELS,
                 max_frames=MAX_VIDEO_FRAMES):
  """uint8 [num_frames, H, W, channels] sampled uniformly over a video file's frames, at the
  file's size; RGB (channels = 3) or luma (channels = 1). Only the sampled frames are kept:
  when the container does not state its frame count, packets are counted first, and a count
  that decoding proves wrong costs one more pass rather than keeping every frame. Frames of
  more than `max_pixels`, or more than `max_frames` frames, are refused before decoding."""
  import av  # pylint: disable=g-import-not-at-top
  _check_exists(source, "video")
  path = _name(source)
  if channels not in (1, 3):
    raise ValueError(f"video frames with {channels} channels: expected 1 or 3")
  pixel_format = "gray" if channels == 1 else "rgb24"
  try:
    count = _frame_count(source, max_pixels, max_frames)
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
