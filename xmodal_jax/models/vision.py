"""Video: space-time patches of the frames through one transformer."""


import flax.linen as nn

from xmodal_jax.models import transformer


class VideoTransformer(transformer.TrunkOptions, kw_only=True):
  """Frames float[B, T, H, W, C] -> patches of `patch_size`^2 per frame -> TokenEncoder.

  Attention runs jointly over space and time (T * H/p * W/p tokens), with a learned position
  for every (frame, patch).
  """
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
    return self.trunk()(tokens, train=train)
