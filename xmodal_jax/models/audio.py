"""Audio: a log-mel spectrogram frontend computed on device, and a patch transformer over it."""


import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from xmodal_jax.models import transformer


def hz_to_mel(hz):
  """HTK mel scale."""
  return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel):
  return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def mel_filterbank(num_mels, fft_length, sample_rate, fmin, fmax):
  """Triangular HTK-mel filters as a float32 matrix [fft_length // 2 + 1, num_mels]."""
  bin_hz = np.linspace(0.0, sample_rate / 2.0, fft_length // 2 + 1)
  edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), num_mels + 2))
  lower, center, upper = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]
  rising = (bin_hz[:, None] - lower) / (center - lower)
  falling = (upper - bin_hz[:, None]) / (upper - center)
  return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


class LogMel(nn.Module):
  """Waveforms float[B, N] -> log-mel spectrograms float[B, frames, num_mels].

  Frames of `fft_length` samples every `hop_length` (no padding), periodic Hann window,
  power spectrum, mel filterbank, natural log with floor `log_floor`.
  """
  sample_rate: int
  fft_length: int = 256
  hop_length: int = 160
  num_mels: int = 40
  fmin: float = 20.0
  fmax: float = None
  log_floor: float = 1e-6

  def __call__(self, waveform):
    n = waveform.shape[-1]
    if n < self.fft_length:
      raise ValueError(f"waveform of {n} samples is shorter than fft_length={self.fft_length}")
    num_frames = 1 + (n - self.fft_length) // self.hop_length
    index = (np.arange(num_frames)[:, None] * self.hop_length + np.arange(self.fft_length))
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(self.fft_length) / self.fft_length)
    frames = waveform[..., index].astype(jnp.float32) * window.astype(np.float32)
    power = jnp.abs(jnp.fft.rfft(frames, axis=-1)) ** 2
    fbank = mel_filterbank(self.num_mels, self.fft_length, self.sample_rate, self.fmin,
                           self.fmax or self.sample_rate / 2)
    return jnp.log(jnp.maximum(power @ fbank, self.log_floor))


class AudioTransformer(transformer.TrunkOptions, kw_only=True):
  """Log-mel frontend, time patches of `patch_frames` x all mel bins, TokenEncoder.

  Input: {"waveform": float[B, N]}. Each spectrogram is standardized over its own time and
  frequency, so the tower does not depend on recording gain.
  """
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
    batch, frames, mels = spec.shape
    num_patches = frames // self.patch_frames
    patches = spec[:, :num_patches * self.patch_frames].reshape(
        batch, num_patches, self.patch_frames * mels)
    tokens = nn.Dense(self.width, dtype=self.dtype, name="patch_embedding")(patches)
    return self.trunk()(tokens, train=train)
