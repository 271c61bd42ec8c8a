"""The transformer encoder block every tower uses, in the variants pretrained families need.

One block implementation covers pre-LN (ViT, CLIP, AST, our own towers) and post-LN (BERT,
RoBERTa, MiniLM) stacks, each family's activation and LayerNorm epsilon, and causal masking
(CLIP's text transformer).
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal_jax.models import pooling

ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": nn.relu,
}
NORMS = ("pre", "post")


ATTENTION_IMPLS = ("xla", "cudnn")


def attention(query, key, value, mask=None, *, dropout_rng=None, dropout_rate=0.0,
              deterministic=True, dtype=None, implementation="xla", **unused):
  """Scaled dot-product attention with a float32 softmax.

  Without attention dropout this is `jax.nn.dot_product_attention` (`implementation="cudnn"`:
  cuDNN's fused flash attention, GPU and bfloat16/float16 only); with dropout, Flax's
  reference path.
  """
  del unused
  if deterministic or dropout_rate == 0.0:
    if implementation == "cudnn" and query.dtype == jnp.float32:
      implementation = "xla"  # cuDNN's kernel takes half precision only.
    return jax.nn.dot_product_attention(query, key, value, mask=mask,
                                        implementation=implementation)
  return nn.dot_product_attention(query, key, value, mask=mask, dropout_rng=dropout_rng,
                                  dropout_rate=dropout_rate, deterministic=False, dtype=dtype,
                                  force_fp32_for_softmax=True)


class MlpBlock(nn.Module):
  """Position-wise feed-forward: Dense -> activation -> Dense."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x, *, train):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
    x = ACTIVATIONS[self.activation](x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(width, dtype=self.dtype, name="fc2")(x)


class EncoderBlock(nn.Module):
  """One block. pre: x + Attn(LN(x)), then x + MLP(LN(x)); post: LN(x + Attn(x)), then
  LN(x + MLP(x))."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  norm: str = "pre"
  activation: str = "gelu"
  layer_norm_eps: float = 1e-6
  attention_dropout: Optional[float] = None  # None: the same as `dropout`
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x, attention_mask, train):  # positional: nn.remat needs it static
    layer_norm = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name=name)
    residual_dropout = nn.Dropout(self.dropout, deterministic=not train)
    attn = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        attention_fn=functools.partial(attention, implementation=self.attention_impl),
        dropout_rate=self.dropout if self.attention_dropout is None else self.attention_dropout,
        deterministic=not train, name="attn")
    mlp = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.activation, name="mlp")
    if self.norm == "pre":
      y = layer_norm("ln_attn")(x)
      x = x + residual_dropout(attn(y, y, mask=attention_mask))
      return x + residual_dropout(mlp(layer_norm("ln_mlp")(x), train=train))
    x = layer_norm("ln_attn")(x + residual_dropout(attn(x, x, mask=attention_mask)))
    return layer_norm("ln_mlp")(x + residual_dropout(mlp(x, train=train)))


def attention_mask(valid: Optional[jnp.ndarray], length: int, causal: bool):
  """bool[B or 1, 1, L, L]: query q may attend to key k (k is valid, and k <= q if causal).

  Padded queries attend like the others; their outputs are never used.
  """
  mask = None if valid is None else valid.astype(bool)[:, None, None, :]
  if causal:
    lower = jnp.tril(jnp.ones((length, length), bool))[None, None]
    mask = lower if mask is None else mask & lower
  return mask


class Encoder(nn.Module):
  """A stack of EncoderBlocks over tokens [B, L, W], with an optional final LayerNorm.

  `valid` (bool[B, L], optional) marks real tokens; padding is never attended to.
  `remat` recomputes each block's activations in the backward pass to save memory.
  """
  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  norm: str = "pre"
  activation: str = "gelu"
  layer_norm_eps: float = 1e-6
  attention_dropout: Optional[float] = None
  causal: bool = False
  final_norm: bool = True
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x, valid: Optional[jnp.ndarray] = None, *, train):
    if self.norm not in NORMS:
      raise ValueError(f"norm={self.norm!r}: expected one of {NORMS}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}: expected one of "
                       f"{ATTENTION_IMPLS}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r}: expected one of {sorted(ACTIVATIONS)}")
    mask = attention_mask(valid, x.shape[1], self.causal)
    block_cls = nn.remat(EncoderBlock, static_argnums=(3,)) if self.remat else EncoderBlock
    for i in range(self.num_layers):
      block = block_cls(self.num_heads, self.mlp_dim, self.dropout, self.dtype, self.norm,
                        self.activation, self.layer_norm_eps, self.attention_dropout,
                        self.attention_impl, name=f"block{i}")
      x = block(x, mask, train)
    if self.final_norm:
      x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="ln_final")(x)
    return x


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
  attention_impl: str = "xla"  # or "cudnn" (GPU, bfloat16)

  def encoder(self, **kwargs):
    """An Encoder with these options (and family-specific `kwargs`), named "encoder"."""
    return Encoder(self.num_layers, self.num_heads, self.mlp_dim, self.dropout, self.dtype,
                   self.remat, attention_impl=self.attention_impl, name="encoder", **kwargs)

  def pool(self, tokens, valid, *, train, num_prefix_tokens=1):
    """Pools with the tower's `pooling` (cls / mean / gpo) under the name "pool"."""
    return pooling.Pool(self.pooling, self.gpo_drop_rate, num_prefix_tokens, name="pool")(
        tokens, valid, train=train)

  def trunk(self):
    """A TokenEncoder with these options, to call from a tower's compact __call__."""
    return TokenEncoder(self.num_layers, self.num_heads, self.mlp_dim, self.pooling,
                        self.gpo_drop_rate, self.dropout, self.dtype, self.remat,
                        self.attention_impl, name="trunk")


def tower_output(pooled, tokens, valid, grid=None):
  """What every tower returns: the pooled vector [B, W] and the local features it came from.

  `tokens` [B, L, W] with `valid` bool[B, L] are the last layer's token features (the
  alignment objectives and the fusion encoder use them). Patch towers add `grid`
  (prefix tokens, patch rows, patch columns) so local features can be pooled in 2-D.
  """
  if valid is None:
    valid = jnp.ones(tokens.shape[:2], bool)
  out = {"pooled": pooled, "tokens": tokens, "valid": valid.astype(bool)}
  if grid is not None:
    out["grid"] = grid
  return out


class TokenEncoder(TrunkOptions):
  """Prepends a learned [CLS] token, adds learned positions, runs an Encoder, pools.

  The common trunk of the from-scratch towers: they only turn their input into tokens.
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
    x = self.encoder()(x, valid, train=train)
    return tower_output(self.pool(x, valid, train=train), x, valid)
