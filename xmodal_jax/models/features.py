"""Precomputed features (from another model or a signal pipeline) as a modality."""

import flax.linen as nn
import jax.numpy as jnp

from xmodal_jax.models import transformer


class FeatureEncoder(transformer.TrunkOptions, kw_only=True):
  """{"features": float[B, D]} through an MLP, or float[B, L, D] (with optional "valid"
  bool[B, L]) projected to `width` and through a TokenEncoder.

  The MLP has `num_layers` hidden layers of `mlp_dim` (GELU, dropout) and a `width` output;
  num_heads only matters for sequences.
  """
  width: int

  @nn.compact
  def __call__(self, inputs, *, train):
    x = inputs["features"].astype(self.dtype)
    if x.ndim == 2:
      for i in range(self.num_layers):
        x = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name=f"hidden{i}")(x),
                    approximate=False)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
      x = nn.Dense(self.width, dtype=self.dtype, name="output")(x)
      return transformer.tower_output(x, x[:, None], None)
    if x.ndim != 3:
      raise ValueError(f"features must be [B, D] or [B, L, D], got shape {x.shape}")
    tokens = nn.Dense(self.width, dtype=self.dtype, name="input_projection")(x)
    valid = inputs.get("valid", jnp.ones(x.shape[:2], bool))
    return self.trunk()(tokens, valid, train=train)
