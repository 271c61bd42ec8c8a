"""ALBEF's fusion encoder: one modality's tokens attend to themselves and,
by cross-attention, to another modality's tokens; a 2-way head on the first token says
whether the two are a matching pair."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from xmodal_jax.models import transformer


class FusionBlock(nn.Module):
  """Pre-LN: self-attention over the query tokens, cross-attention to the context, MLP."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, x_valid, context, context_valid, *, train):
    def attend(name, queries, keys, key_valid):
      # XLA attention: fusion inputs have any lengths (cuDNN trains on even ones only).
      return transformer.Attention(self.num_heads, self.dtype, self.dropout, "xla", name=name)(
          queries, keys, key_valid, train=train)
    y = nn.LayerNorm(dtype=self.dtype, name="norm_self")(x)
    x = x + attend("self_attention", y, y, x_valid)
    y = nn.LayerNorm(dtype=self.dtype, name="norm_cross")(x)
    x = x + attend("cross_attention", y, context, context_valid)
    y = nn.LayerNorm(dtype=self.dtype, name="norm_mlp")(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_in")(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(nn.gelu(y, approximate=False))
    return x + nn.Dense(x.shape[-1], dtype=self.dtype, name="mlp_out")(y)


class FusionEncoder(nn.Module):
  """(query tokens [B, Lq, Wq], valid, context tokens [B, Lc, Wc], valid) -> matching logits
  [B, 2] (index 1: "matched"). Both inputs are projected to `width` first."""
  width: int
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 256
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query, query_valid, context, context_valid, *, train):
    x = nn.Dense(self.width, dtype=self.dtype, name="query_projection")(query)
    c = nn.Dense(self.width, dtype=self.dtype, name="context_projection")(context)
    for i in range(self.num_layers):
      x = FusionBlock(self.num_heads, self.mlp_dim, self.dropout, self.dtype,
                      name=f"block{i}")(x, query_valid, c, context_valid, train=train)
    x = nn.LayerNorm(dtype=self.dtype, name="final_norm")(x)
    return nn.Dense(2, dtype=jnp.float32, name="matching_head")(x[:, 0]).astype(jnp.float32)
