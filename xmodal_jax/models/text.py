"""Text: token embeddings through a transformer, padding masked out."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from xmodal_jax.models import transformer


class TextTransformer(nn.Module):
  """{"input_ids": int[B, L], "attention_mask": int[B, L]} -> TokenEncoder features [B, W]."""
  vocab_size: int
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  pooling: str = "cls"
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, inputs, *, train):
    tokens = nn.Embed(self.vocab_size, self.width, name="token_embedding")(inputs["input_ids"])
    return transformer.TokenEncoder(
        self.num_layers, self.num_heads, self.mlp_dim, self.pooling, self.dropout, self.dtype,
        self.remat, name="trunk")(tokens, inputs["attention_mask"].astype(bool), train=train)
