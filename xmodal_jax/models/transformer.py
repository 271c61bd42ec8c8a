"""Pre-LN transformer encoder blocks shared by every tower."""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from xmodal_jax.models import pooling


class MlpBlock(nn.Module):
  """Position-wise feed-forward: Dense -> GELU -> Dense."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(width, dtype=self.dtype, name="fc2")(x)


class EncoderBlock(nn.Module):
  """One pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x))."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attention_mask, train):  # positional: nn.remat needs it static
    y = nn.LayerNorm(dtype=self.dtype, name="ln_attn")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, dropout_rate=self.dropout,
        deterministic=not train, name="attn")(y, y, mask=attention_mask)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, name="mlp")(y, train=train)
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class Encoder(nn.Module):
  """A stack of EncoderBlocks and a final LayerNorm over tokens [B, L, W].

  `valid` (bool[B, L], optional) marks real tokens; padding is never attended to.
  `remat` recomputes each block's activations in the backward pass to save memory.
  """
  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, valid: Optional[jnp.ndarray] = None, *, train):
    mask = None if valid is None else nn.make_attention_mask(valid, valid)
    block_cls = nn.remat(EncoderBlock, static_argnums=(3,)) if self.remat else EncoderBlock
    for i in range(self.num_layers):
      block = block_cls(self.num_heads, self.mlp_dim, self.dropout, self.dtype, name=f"block{i}")
      x = block(x, mask, train)
    return nn.LayerNorm(dtype=self.dtype, name="ln_final")(x)


class TrunkOptions(nn.Module):
  """The options every tower's transformer trunk shares (a base for TokenEncoder and towers)."""
  num_layers: int
  num_heads: int
  mlp_dim: int
  pooling: str = "cls"
  gpo_drop_rate: float = 0.0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False

  def trunk(self):
    """A TokenEncoder with these options, to call from a tower's compact __call__."""
    return TokenEncoder(self.num_layers, self.num_heads, self.mlp_dim, self.pooling,
                        self.gpo_drop_rate, self.dropout, self.dtype, self.remat,
                        name="trunk")


class TokenEncoder(TrunkOptions):
  """Prepends a learned [CLS] token, adds learned positions, runs an Encoder, pools.

  The common trunk of every tower: towers only turn their input into tokens [B, L, W].
  """

  @nn.compact
  def __call__(self, tokens, valid=None, *, train):
    batch, length, width = tokens.shape
    cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, width)), tokens], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, length + 1, width))
    if valid is not None:
      valid = jnp.concatenate([jnp.ones((batch, 1), bool), valid.astype(bool)], axis=1)
    x = nn.Dropout(self.dropout, deterministic=not train)(x.astype(self.dtype))
    x = Encoder(self.num_layers, self.num_heads, self.mlp_dim, self.dropout, self.dtype,
                self.remat, name="encoder")(x, valid, train=train)
    return pooling.Pool(self.pooling, self.gpo_drop_rate, name="pool")(x, valid, train=train)
