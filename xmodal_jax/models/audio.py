"""Audio: log-mel spectrogram frontends computed on device, and transformers over them."""

import dataclasses
from typing import ClassVar, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xmodal_jax.models import transformer, vision

MEL_SCALES = ("htk", "kaldi", "slaney")
# Slaney's scale (librosa's default, Whisper's): linear up to 1 kHz, logarithmic above.
SLANEY_BREAK_HZ, SLANEY_BREAK_MEL, SLANEY_LOG_STEP = 1000.0, 15.0, np.log(6.4) / 27.0


def hz_to_mel(hz, scale="htk"):
  hz = np.asarray(hz, np.float64)
  if scale == "kaldi":
    return 1127.0 * np.log(1.0 + hz / 700.0)
  if scale == "slaney":
    return np.where(hz < SLANEY_BREAK_HZ, 3.0 * hz / 200.0, SLANEY_BREAK_MEL + np.log(
        np.maximum(hz, 1e-10) / SLANEY_BREAK_HZ) / SLANEY_LOG_STEP)
  return 2595.0 * np.log10(1.0 + hz / 700.0)


def mel_to_hz(mel, scale="htk"):
  mel = np.asarray(mel, np.float64)
  if scale == "kaldi":
    return 700.0 * (np.exp(mel / 1127.0) - 1.0)
  if scale == "slaney":
    return np.where(mel < SLANEY_BREAK_MEL, 200.0 * mel / 3.0, SLANEY_BREAK_HZ * np.exp(
        SLANEY_LOG_STEP * (mel - SLANEY_BREAK_MEL)))
  return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(num_mels, fft_length, sample_rate, fmin, fmax, scale="htk",
                   triangles_in_mel=False, area_normalize=False):
  """Triangular mel filters as a float32 matrix [fft_length // 2 + 1, num_mels].

  `triangles_in_mel` draws the triangles linear in mel rather than in Hz (Kaldi's fbank);
  `area_normalize` scales each by 2 / its width in Hz (Slaney's norm: equal area).
  """
  if scale not in MEL_SCALES:
    raise ValueError(f"mel scale {scale!r}: expected one of {MEL_SCALES}")
  bin_hz = np.arange(fft_length // 2 + 1) * (sample_rate / fft_length)
  edges_mel = np.linspace(hz_to_mel(fmin, scale), hz_to_mel(fmax, scale), num_mels + 2)
  if triangles_in_mel:
    bins, edges = hz_to_mel(bin_hz, scale), edges_mel
  else:
    bins, edges = bin_hz, mel_to_hz(edges_mel, scale)
  lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
  rising = (bins[:, None] - lower) / (center - lower)
  falling = (upper - bins[:, None]) / (upper - center)
  filters = np.maximum(0.0, np.minimum(rising, falling))
  if area_normalize:
    hz = mel_to_hz(edges_mel, scale)
    filters *= 2.0 / (hz[2:] - hz[:-2])
  return filters.astype(np.float32)


def hann_window(length, periodic=True):
  n = length if periodic else length - 1
  return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / n)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LogMel:
  """Waveforms float[B, N] -> log-mel spectrograms float[B, frames, num_mels].

  Frames of `frame_length` samples every `hop_length` (no padding, or with `center` the
  waveform reflected by fft_length / 2 at both ends first, as STFTs centre frames), each
  optionally made zero-mean and pre-emphasized (Kaldi), windowed (Hann, periodic or
  symmetric), zero-padded to `fft_length`; power spectrum, mel filterbank, natural log (or
  log10 with `log10`) with floor `log_floor`.
  The defaults are the small frontend of the from-scratch audio tower; `kaldi_fbank` gives
  the Audio Spectrogram Transformer's. A plain function object: it has no parameters.
  """
  sample_rate: int
  fft_length: int = 256
  hop_length: int = 160
  num_mels: int = 40
  fmin: float = 20.0
  fmax: Optional[float] = None
  log_floor: float = 1e-6
  frame_length: Optional[int] = None  # default: fft_length
  periodic_window: bool = True
  remove_dc_offset: bool = False
  preemphasis: float = 0.0
  mel_scale: str = "htk"
  triangles_in_mel: bool = False
  area_normalize: bool = False
  center: bool = False
  log10: bool = False

  def __call__(self, waveform):
    frame_length = self.frame_length or self.fft_length
    if self.center:
      pad = self.fft_length // 2
      waveform = jnp.pad(waveform, [(0, 0)] * (waveform.ndim - 1) + [(pad, pad)],
                         mode="reflect")
    n = waveform.shape[-1]
    if frame_length > self.fft_length:
      raise ValueError(f"frame_length={frame_length} is longer than fft_length="
                       f"{self.fft_length}")
    if n < frame_length:
      raise ValueError(f"waveform of {n} samples is shorter than a frame ({frame_length})")
    num_frames = 1 + (n - frame_length) // self.hop_length
    index = np.arange(num_frames)[:, None] * self.hop_length + np.arange(frame_length)
    frames = waveform[..., index].astype(jnp.float32)
    if self.remove_dc_offset:
      frames = frames - frames.mean(axis=-1, keepdims=True)
    if self.preemphasis:
      previous = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
      frames = frames - self.preemphasis * previous
    frames = frames * hann_window(frame_length, self.periodic_window)
    # The real DFT as two products with cos/sin matrices instead of an FFT: XLA's SPMD
    # partitioner does not split an FFT over the batch (it all-gathered every device's
    # waveforms), and TPUs run matmuls far faster than FFTs.
    bins = np.arange(self.fft_length // 2 + 1)
    angle = 2 * np.pi * np.outer(np.arange(frame_length), bins) / self.fft_length
    product = lambda m: jnp.matmul(frames, m.astype(np.float32),
                                   precision=jax.lax.Precision.HIGHEST)
    power = product(np.cos(angle)) ** 2 + product(np.sin(angle)) ** 2
    fbank = mel_filterbank(self.num_mels, self.fft_length, self.sample_rate, self.fmin,
                           self.fmax or self.sample_rate / 2, self.mel_scale,
                           self.triangles_in_mel, self.area_normalize)
    mel = jnp.maximum(jnp.matmul(power, fbank, precision=jax.lax.Precision.HIGHEST),
                      self.log_floor)
    return jnp.log10(mel) if self.log10 else jnp.log(mel)


def kaldi_fbank(sample_rate=16000, num_mels=128):
  """The log-mel frontend of Hugging Face's ASTFeatureExtractor (Kaldi fbank: 25 ms frames,
  10 ms hop, DC removal, pre-emphasis 0.97, symmetric Hann, Kaldi mel triangles)."""
  return LogMel(sample_rate, fft_length=512, hop_length=sample_rate // 100, num_mels=num_mels,
                fmin=20.0, log_floor=1.192092955078125e-07, frame_length=sample_rate // 40,
                periodic_window=False, remove_dc_offset=True, preemphasis=0.97,
                mel_scale="kaldi", triangles_in_mel=True)


def random_bands(rng, batch, count, width, size, *, exact=False):
  """bool[batch, size]: per example, the union of `count` bands of up to `width` positions
  (exactly `width` with `exact`) at uniform random starts within `size`."""
  k_width, k_start = jax.random.split(rng)
  widths = (jnp.full((batch, count), width) if exact
            else jax.random.randint(k_width, (batch, count), 0, width + 1))
  starts = jax.random.randint(k_start, (batch, count), 0, size)
  starts = jnp.minimum(starts, size - widths)
  positions = jnp.arange(size)
  inside = ((positions >= starts[..., None]) &
            (positions < (starts + widths)[..., None]))  # [B, count, size]
  return inside.any(axis=1)


def whisper_log_mel(sample_rate=16000, num_mels=80):
  """The log-mel frontend of Hugging Face's WhisperFeatureExtractor before its clamping:
  400-sample periodic Hann frames every 10 ms, centred, Slaney mels with Slaney's norm up to
  8 kHz, log10 with floor 1e-10."""
  return LogMel(sample_rate, fft_length=400, hop_length=sample_rate // 100, num_mels=num_mels,
                fmin=0.0, fmax=8000.0, log_floor=1e-10, mel_scale="slaney",
                area_normalize=True, center=True, log10=True)


def spec_augment(rng, spec, *, time_masks, time_width, freq_masks, freq_width, fill=0.0):
  """SpecAugment's masking (Park et al. 2019) on spectrograms [B, frames, mels]: per example,
  `time_masks` bands of up to `time_width` frames and `freq_masks` bands of up to
  `freq_width` mel bins set to `fill`."""
  batch, frames, mels = spec.shape
  k_time, k_freq = jax.random.split(rng)
  masked = jnp.zeros((batch, frames, mels), bool)
  if time_masks:
    masked |= random_bands(k_time, batch, time_masks, time_width, frames)[:, :, None]
  if freq_masks:
    masked |= random_bands(k_freq, batch, freq_masks, freq_width, mels)[:, None, :]
  return jnp.where(masked, fill, spec)


class SpecAugmentOptions(nn.Module, kw_only=True):
  """Training-time SpecAugment for the audio towers (0 masks: off)."""
  time_masks: int = 0
  time_mask_width: int = 0
  freq_masks: int = 0
  freq_mask_width: int = 0

  def augment(self, spec, train):
    if not train or not (self.time_masks or self.freq_masks):
      return spec
    return spec_augment(self.make_rng("dropout"), spec, time_masks=self.time_masks,
                        time_width=self.time_mask_width, freq_masks=self.freq_masks,
                        freq_width=self.freq_mask_width)


class AudioTransformer(transformer.TrunkOptions, SpecAugmentOptions, kw_only=True):
  """Log-mel frontend, time patches of `patch_frames` x all mel bins, TokenEncoder.

  Input: {"waveform": float[B, N]}. Each spectrogram is standardized over its own time and
  frequency, so the tower does not depend on recording gain.
  """
  DROPS_TOKENS: ClassVar[bool] = True
  sample_rate: int
  width: int
  patch_frames: int = 8
  fft_length: int = 256
  hop_length: int = 160
  num_mels: int = 40

  @nn.compact
  def __call__(self, inputs, *, train):
    spec = LogMel(self.sample_rate, self.fft_length, self.hop_length, self.num_mels)(
        inputs["waveform"])
    spec = (spec - spec.mean(axis=(1, 2), keepdims=True)) / (
        spec.std(axis=(1, 2), keepdims=True) + 1e-5)
    spec = self.augment(spec, train)
    batch, frames, mels = spec.shape
    num_patches = frames // self.patch_frames
    patches = spec[:, :num_patches * self.patch_frames].reshape(
        batch, num_patches, self.patch_frames * mels)
    tokens = nn.Dense(self.width, dtype=self.dtype, name="patch_embedding")(patches)
    return self.trunk()(tokens, train=train, token_seed=inputs.get("token_seed"))


class SpectrogramTransformer(vision.PatchTransformer, SpecAugmentOptions, kw_only=True):
  """The Audio Spectrogram Transformer (Hugging Face's ASTModel), with its frontend on device.

  {"waveform": float[B, N]} (at `sample_rate`, in [-1, 1]) -> Kaldi fbank -> cropped or
  zero-padded to `max_frames` -> normalized as ASTFeatureExtractor does ((x - mean) /
  (2 std)); or {"spectrogram": float[B, max_frames, num_mels]} already computed. The
  spectrogram is an image [num_mels, max_frames, 1] for the patch transformer, whose
  pooled output ("pooler") is the mean of the [CLS] and distillation tokens.
  """
  INPUT_VALUES: ClassVar[str] = "spectrogram"  # what load_hf's input_values are for this tower
  sample_rate: int = 16000
  num_mels: int = 128
  max_frames: int = 1024
  mean: float = -4.2677393
  std: float = 4.5689974
  patch_stride: Sequence[int] = (10, 10)
  num_channels: int = 1
  num_prefix_tokens: int = 2
  pooler: str = "prefix_mean"

  def input_size(self):
    return (self.num_mels, self.max_frames)

  def spectrogram(self, waveform):
    """float[B, N] -> the normalized spectrogram [B, max_frames, num_mels] the tower reads."""
    spec = kaldi_fbank(self.sample_rate, self.num_mels)(waveform)
    frames = spec.shape[1]
    if frames < self.max_frames:
      spec = jnp.pad(spec, ((0, 0), (0, self.max_frames - frames), (0, 0)))
    return (spec[:, :self.max_frames] - self.mean) / (2 * self.std)

  def __call__(self, inputs, *, train):
    spec = inputs["spectrogram"] if "spectrogram" in inputs else self.spectrogram(
        inputs["waveform"])
    spec = self.augment(spec, train)
    return self.encode(jnp.swapaxes(spec, 1, 2)[..., None], train=train,
                       token_seed=inputs.get("token_seed"))
