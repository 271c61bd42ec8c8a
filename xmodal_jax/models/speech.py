"""Speech towers with the layouts of Hugging Face's models, so that `pretrained.load_hf`
fills them from their folders: wav2vec 2.0 and HuBERT (Baevski et al., 2020; Hsu et al.,
2021) over raw waveforms, and Whisper's encoder over its log-mel spectrogram."""

from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal_jax.models import audio, transformer

FEATURE_NORMS = ("group", "layer")


class ConvFeatureEncoder(nn.Module):
  """Waveforms float[B, N] -> frame features [B, T, C]: 1-D convolutions without padding.

  feature_norm "group": a per-channel GroupNorm after the first convolution only (wav2vec 2.0
  base, HuBERT base); "layer": a LayerNorm over the channels after every one (the large
  models). Every convolution is followed by `activation`.
  """
  channels: Sequence[int]
  kernels: Sequence[int]
  strides: Sequence[int]
  bias: bool = False
  feature_norm: str = "group"
  activation: str = "gelu"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, waveform):
    if self.feature_norm not in FEATURE_NORMS:
      raise ValueError(f"feature_norm={self.feature_norm!r}: expected one of {FEATURE_NORMS}")
    if not len(self.channels) == len(self.kernels) == len(self.strides):
      raise ValueError(f"conv_channels {self.channels}, conv_kernels {self.kernels} and "
                       f"conv_strides {self.strides} must have one entry per layer")
    x = waveform[..., None].astype(self.dtype)
    for i, (channels, kernel, stride) in enumerate(
        zip(self.channels, self.kernels, self.strides)):
      x = nn.Conv(channels, (kernel,), (stride,), padding="VALID", use_bias=self.bias,
                  dtype=self.dtype, name=f"conv{i}")(x)
      if self.feature_norm == "layer":
        x = nn.LayerNorm(1e-5, dtype=self.dtype, name=f"norm{i}")(x)
      elif i == 0:
        x = nn.GroupNorm(num_groups=channels, epsilon=1e-5, dtype=self.dtype, name="norm0")(x)
      x = transformer.ACTIVATIONS[self.activation](x)
    return x


def num_frames(num_samples, kernels, strides):
  """How many frames ConvFeatureEncoder makes of `num_samples` samples."""
  for kernel, stride in zip(kernels, strides):
    num_samples = (num_samples - kernel) // stride + 1
  return num_samples


class SpeechTransformer(transformer.TrunkOptions, kw_only=True):
  """{"waveform": float[B, N]} at `sample_rate` -> wav2vec 2.0 / HuBERT frame features.

  The waveform is standardized on device when `normalize` (the processors' do_normalize),
  turned into frames by ConvFeatureEncoder (20 ms apart with the standard convolutions),
  LayerNorm'd (unless `feature_projection_norm` is False, as some HuBERT configs) and
  projected to `width`; a grouped convolution over time adds relative positions; then the
  transformer: post-LN blocks after a LayerNorm ("base" models), or with
  `stable_layer_norm` pre-LN blocks and a final LayerNorm ("large" ones). In training,
  `mask_time_prob` replaces spans of `mask_time_length` frames by a learned vector (as their
  fine-tuning does: about mask_time_prob * T / mask_time_length spans per example, at
  uniform starts, possibly overlapping). No token is a [CLS]: pooling covers every frame.
  """
  INPUT_VALUES: ClassVar[str] = "waveform"  # what load_hf's input_values are for this tower
  width: int
  sample_rate: int = 16000
  normalize: bool = True
  conv_channels: Sequence[int] = (512,) * 7
  conv_kernels: Sequence[int] = (10, 3, 3, 3, 3, 2, 2)
  conv_strides: Sequence[int] = (5, 2, 2, 2, 2, 2, 2)
  conv_bias: bool = False
  feature_norm: str = "group"
  feature_activation: str = "gelu"
  feature_projection_norm: bool = True
  pos_conv_kernel: int = 128
  pos_conv_groups: int = 16
  stable_layer_norm: bool = False
  mask_time_prob: float = 0.0
  mask_time_length: int = 10
  pooling: str = "mean"
  layer_norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, inputs, *, train):
    waveform = inputs["waveform"].astype(jnp.float32)
    if self.normalize:
      waveform = (waveform - waveform.mean(-1, keepdims=True)) * jax.lax.rsqrt(
          waveform.var(-1, keepdims=True) + 1e-7)
    x = ConvFeatureEncoder(self.conv_channels, self.conv_kernels, self.conv_strides,
                           self.conv_bias, self.feature_norm, self.feature_activation,
                           self.dtype, name="feature_encoder")(waveform)
    if self.feature_projection_norm:
      x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="feature_ln")(x)
    x = nn.Dense(self.width, dtype=self.dtype, name="feature_projection")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    if self.mask_time_prob > 0:
      embed = self.param("masked_spec_embed", nn.initializers.uniform(1.0), (self.width,))
      if train:
        x = self.mask_spans(x, embed)
    positions = nn.Conv(self.width, (self.pos_conv_kernel,),
                        padding=[(self.pos_conv_kernel // 2,) * 2],
                        feature_group_count=self.pos_conv_groups, dtype=self.dtype,
                        name="pos_conv")(x)
    positions = positions[:, :x.shape[1]]  # an even kernel makes one frame too many
    x = x + transformer.ACTIVATIONS[self.feature_activation](positions)
    if not self.stable_layer_norm:
      x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="ln_pre")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = self.encoder(norm="pre" if self.stable_layer_norm else "post",
                     final_norm=self.stable_layer_norm)(x, None, train=train)
    return transformer.tower_output(self.pool(x, None, train=train, num_prefix_tokens=0),
                                    x, None)

  def mask_spans(self, x, embed):
    batch, frames, _ = x.shape
    spans = max(1, round(self.mask_time_prob * frames / self.mask_time_length))
    masked = audio.random_bands(self.make_rng("dropout"), batch, spans,
                                min(self.mask_time_length, frames), frames, exact=True)
    return jnp.where(masked[..., None], embed.astype(x.dtype), x)


class WhisperEncoder(transformer.TrunkOptions, audio.SpecAugmentOptions, kw_only=True):
  """Whisper's audio encoder (Radford et al., 2022; Hugging Face's WhisperEncoder layout),
  with its feature extraction on device.

  {"waveform": float[B, N]} at 16 kHz -> zero-padded or cut to `max_frames` x 10 ms (30 s,
  as the released models were trained; fewer cost less) -> WhisperFeatureExtractor's log-mel
  (each spectrogram clamped to 8 below its maximum, then (x + 4) / 4); or {"spectrogram":
  float[B, frames, num_mels]} already computed. Two convolutions (the second with stride 2)
  halve the frames, the first of `max_positions` learned positions are added, pre-LN blocks
  and a final LayerNorm follow.
  """
  INPUT_VALUES: ClassVar[str] = "waveform"
  width: int
  sample_rate: int = 16000
  num_mels: int = 80
  max_frames: int = 3000
  max_positions: int = 1500
  pooling: str = "mean"
  layer_norm_eps: float = 1e-5

  def spectrogram(self, waveform):
    """float[B, N] -> the normalized log-mel [B, max_frames, num_mels] the encoder reads."""
    samples = self.max_frames * (self.sample_rate // 100)
    waveform = waveform[:, :samples]
    waveform = jnp.pad(waveform, ((0, 0), (0, samples - waveform.shape[1])))
    spec = audio.whisper_log_mel(self.sample_rate, self.num_mels)(waveform)[:, :-1]
    spec = jnp.maximum(spec, spec.max(axis=(1, 2), keepdims=True) - 8.0)
    return (spec + 4.0) / 4.0

  @nn.compact
  def __call__(self, inputs, *, train):
    spec = inputs["spectrogram"] if "spectrogram" in inputs else self.spectrogram(
        inputs["waveform"].astype(jnp.float32))
    spec = self.augment(spec, train)
    gelu = transformer.ACTIVATIONS["gelu"]
    x = gelu(nn.Conv(self.width, (3,), padding=[(1, 1)], dtype=self.dtype, name="conv1")(
        spec.astype(self.dtype)))
    x = gelu(nn.Conv(self.width, (3,), (2,), padding=[(1, 1)], dtype=self.dtype,
                     name="conv2")(x))
    positions = self.param("pos_embedding", nn.initializers.normal(0.02),
                           (self.max_positions, self.width))
    if x.shape[1] > self.max_positions:
      raise ValueError(f"{spec.shape[1]} spectrogram frames: this encoder takes at most "
                       f"{2 * self.max_positions} (max_positions={self.max_positions})")
    x = x + positions[:x.shape[1]].astype(x.dtype)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = self.encoder(norm="pre", final_norm=True)(x, None, train=train)
    return transformer.tower_output(self.pool(x, None, train=train, num_prefix_tokens=0),
                                    x, None)
