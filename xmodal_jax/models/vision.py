"""Image and video towers: ViT-style patch transformers and per-frame video encoders."""

from typing import Any, ClassVar, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from xmodal_jax.models import pooling, transformer

POOLERS = ("dense_tanh", "cls", "prefix_mean", "map")


class AttentionPool(nn.Module):
  """SigLIP's multihead attention pooling (MAP): a learned probe attends to the tokens, then
  a LayerNorm'd MLP is added to it; the probe's output is the pooled vector."""
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    probe = self.param("probe", nn.initializers.normal(0.02), (1, 1, tokens.shape[-1]))
    probe = jnp.broadcast_to(probe, (tokens.shape[0],) + probe.shape[1:]).astype(tokens.dtype)
    x = transformer.Attention(self.num_heads, self.dtype, name="attn")(probe, tokens)
    y = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="ln")(x)
    x = x + transformer.MlpBlock(self.mlp_dim, dtype=self.dtype, activation=self.activation,
                                 name="mlp")(y, train=False)
    return x[:, 0]


class PatchTransformer(transformer.TrunkOptions, kw_only=True):
  """Images [B, H, W, C] -> patches -> prefix tokens + learned positions -> pre-LN blocks.

  Covers Hugging Face's ViTModel (patch_bias, final LayerNorm on every token, pooler =
  tanh(Dense([CLS]))), CLIP's vision tower (no patch bias, LayerNorm before the blocks,
  `final_norm="pooled"`: LayerNorm on the pooled vector only) and the Audio Spectrogram
  Transformer (one channel, overlapping patches via `patch_stride`, [CLS] + distillation
  tokens, pooler = their mean) and SigLIP's vision tower (no prefix token, pooler = "map",
  an attention-pooling head). `pooling="pooler"` selects the family's pooled output;
  cls / mean / gpo pool the last tokens (mean and gpo over patches only).
  """
  DROPS_TOKENS: ClassVar[bool] = True
  width: int
  image_size: Sequence[int] = (224, 224)
  patch_size: int = 16
  patch_stride: Optional[Sequence[int]] = None  # default: patch_size (no overlap)
  num_channels: int = 3
  num_prefix_tokens: int = 1
  patch_bias: bool = True
  pre_norm: bool = False
  final_norm: str = "tokens"  # or "pooled"
  pooler: str = "dense_tanh"
  layer_norm_eps: float = 1e-12
  pooling: str = "pooler"

  def input_size(self):
    """(H, W) of the images this tower takes (its position embeddings fix them)."""
    return tuple(self.image_size)

  def __call__(self, inputs, *, train):
    """{"pixels": float[B, H, W, C]} -> tower output."""
    return self.encode(inputs["pixels"], train=train, token_seed=inputs.get("token_seed"))

  @nn.compact
  def encode(self, images, *, train, token_seed=None):
    """Images as an array (video and audio towers call this directly); `token_seed`
    uint32[B] draws each image's kept patches when training with token_drop_rate."""
    height, width = self.input_size()
    if images.ndim != 4 or tuple(images.shape[1:]) != (height, width, self.num_channels):
      raise ValueError(f"{type(self).__name__}: expected inputs [B, {height}, {width}, "
                       f"{self.num_channels}], got {images.shape}")
    if self.pooler not in POOLERS:
      raise ValueError(f"pooler={self.pooler!r}: expected one of {POOLERS}")
    batch = images.shape[0]
    patches = nn.Conv(self.width, (self.patch_size, self.patch_size),
                      strides=self.patch_stride or self.patch_size, padding="VALID",
                      use_bias=self.patch_bias, dtype=self.dtype, name="patch_embedding")(images)
    grid = (self.num_prefix_tokens,) + tuple(patches.shape[1:3])
    patches = patches.reshape(batch, -1, self.width)
    prefix = self.param("prefix_tokens", nn.initializers.normal(0.02),
                        (1, self.num_prefix_tokens, self.width))
    x = jnp.concatenate(
        [jnp.broadcast_to(prefix, (batch,) + prefix.shape[1:]).astype(patches.dtype), patches],
        axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:])
    if train and self.token_drop_rate and token_seed is not None:
      x, _ = transformer.drop_tokens(x, jnp.ones(x.shape[:2], bool), token_seed,
                                     self.token_drop_rate, self.num_prefix_tokens)
      grid = None  # the kept patches no longer tile the image
    if self.pre_norm:
      x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="ln_pre")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x).astype(self.dtype)
    x = self.encoder(final_norm=self.final_norm == "tokens")(x, train=train)
    if self.pooling != "pooler":
      pooled = self.pool(x, None, train=train, num_prefix_tokens=self.num_prefix_tokens)
    elif self.pooler == "dense_tanh":
      pooled = jnp.tanh(nn.Dense(self.width, dtype=self.dtype, name="pooler")(x[:, 0]))
    elif self.pooler == "prefix_mean":
      pooled = x[:, :self.num_prefix_tokens].mean(axis=1)
    elif self.pooler == "map":
      pooled = AttentionPool(self.num_heads, self.mlp_dim, self.activation, self.layer_norm_eps,
                             self.dtype, name="map_head")(x)
    else:
      pooled = x[:, 0]
    if self.final_norm == "pooled":
      pooled = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="ln_post")(pooled)
    return transformer.tower_output(pooled, x, None, grid=grid)


class VideoTransformer(transformer.TrunkOptions, kw_only=True):
  """Frames float[B, T, H, W, C] -> patches of `patch_size`^2 per frame -> TokenEncoder.

  Attention runs jointly over space and time (T * H/p * W/p tokens), with a learned position
  for every (frame, patch).
  """
  DROPS_TOKENS: ClassVar[bool] = True
  width: int
  patch_size: int = 4

  @nn.compact
  def __call__(self, inputs, *, train):
    frames = inputs["frames"]
    if frames.ndim != 5:
      raise ValueError(f"video frames must be [B, T, H, W, C], got shape {frames.shape}")
    batch = frames.shape[0]
    p = self.patch_size
    patches = nn.Conv(self.width, (1, p, p), strides=(1, p, p), padding="VALID",
                      dtype=self.dtype, name="patch_embedding")(frames)
    tokens = patches.reshape(batch, -1, self.width)
    return self.trunk()(tokens, train=train, token_seed=inputs.get("token_seed"))


class FrameVideoEncoder(nn.Module):
  """Video as frames through an image tower, then over time (CLIP4Clip's two options).

  Frames float[B, T, H, W, C] (and optional "frame_mask" bool[B, T]) -> each frame's pooled
  image feature -> `temporal="mean"`: the mean over valid frames; `"transformer"`: learned
  frame positions + `temporal_layers` pre-LN blocks with a residual around them (CLIP4Clip's
  seqTransf), then the mean. Local features are the per-frame vectors.
  """
  image: nn.Module  # a PatchTransformer
  num_frames: int
  temporal: str = "mean"
  temporal_layers: int = 2
  temporal_heads: int = 8
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, inputs, *, train):
    frames = inputs["frames"]
    if frames.ndim != 5 or frames.shape[1] != self.num_frames:
      raise ValueError(f"video frames must be [B, {self.num_frames}, H, W, C] "
                       f"(num_frames={self.num_frames}), got shape {frames.shape}")
    batch, length = frames.shape[:2]
    valid = inputs.get("frame_mask", jnp.ones((batch, length), bool)).astype(bool)
    seed = inputs.get("token_seed")
    if seed is not None:  # each frame of a clip its own draw
      seed = (seed[:, None] * jnp.uint32(length) + jnp.arange(length, dtype=jnp.uint32))
      seed = seed.reshape(-1)
    per_frame = self.image.encode(
        frames.reshape((batch * length,) + frames.shape[2:]), train=train, token_seed=seed)
    x = per_frame["pooled"].reshape(batch, length, -1)
    if self.temporal == "transformer":
      width = x.shape[-1]
      positions = self.param("frame_positions", nn.initializers.normal(0.02),
                             (1, length, width))
      y = transformer.Encoder(self.temporal_layers, self.temporal_heads, 4 * width,
                              dtype=self.dtype, remat=self.remat, name="temporal")(
                                  x + positions, valid, train=train)
      x = x + y.astype(x.dtype)
    elif self.temporal != "mean":
      raise ValueError(f"temporal={self.temporal!r}: expected 'mean' or 'transformer'")
    return transformer.tower_output(pooling.masked_mean(x, valid), x, valid)
