"""Video: space-time patches of the frames through one transformer."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from xmodal_jax.models import transformer


class VideoTransformer(nn.Module):
  """Frames float[B, T, H, W, C] -> patches of `patch_size`^2 per frame -> TokenEncoder.

  Attention runs jointly over space and time (T * H/p * W/p tokens), with a learned position
  for every (frame, patch).
  """
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  patch_size: int = 4
  pooling: str = "cls"
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, inputs, *, train):
    frames = inputs["frames"]
    if frames.ndim != 5:
      raise ValueError(f"video frames must be [B, T, H, W, C], got shape {frames.shape}")
    batch, time = frames.shape[:2]
    p = self.patch_size
    patches = nn.Conv(self.width, (1, p, p), strides=(1, p, p), padding="VALID",
                      dtype=self.dtype, name="patch_embedding")(frames)
    tokens = patches.reshape(batch, -1, self.width)
    return transformer.TokenEncoder(
        self.num_layers, self.num_heads, self.mlp_dim, self.pooling, self.dropout, self.dtype,
        self.remat, name="trunk")(tokens, train=train)
