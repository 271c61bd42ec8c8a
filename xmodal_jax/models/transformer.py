"""The transformer encoder block every tower uses, in the variants pretrained families need.

One block implementation covers pre-LN (ViT, CLIP, AST, our own towers) and post-LN (BERT,
RoBERTa, MiniLM) stacks, each family's activation and LayerNorm epsilon, and causal masking
(CLIP's text transformer).
"""

import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xmodal_jax.models import attention as attention_lib
from xmodal_jax.models import fp8 as fp8_lib
from xmodal_jax.models import pooling

ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": nn.relu,
}
NORMS = ("pre", "post")


class ProjectionWeights(nn.Module):
  """A kernel [*in, *out] and bias [*out], initialized and named as nn.DenseGeneral's (so
  checkpoints and `load_hf` keep their layout), returned rather than applied.

  With `lora_rank` r > 0, also LoRA's adapters (Hu et al., 2021): lora_a [in, r] (normal,
  std 1/sqrt(in)) and lora_b [r, out] (zeros), and the kernel returned is kernel + A B, so
  the product starts as the kernel's and a frozen kernel trains through A and B only.
  """
  in_shape: Tuple[int, ...]
  out_shape: Tuple[int, ...]
  lora_rank: int = 0

  @nn.compact
  def __call__(self):
    flat = (int(np.prod(self.in_shape)), int(np.prod(self.out_shape)))
    kernel = self.param("kernel", lambda rng: nn.initializers.lecun_normal()(rng, flat).reshape(
        self.in_shape + self.out_shape))
    if self.lora_rank:
      a = self.param("lora_a", nn.initializers.normal(flat[0] ** -0.5),
                     (flat[0], self.lora_rank))
      b = self.param("lora_b", nn.initializers.zeros, (self.lora_rank, flat[1]))
      kernel = kernel + (a @ b).reshape(kernel.shape)
    return kernel, self.param("bias", nn.initializers.zeros, self.out_shape)


def project(x, kernel, bias, *, fp8=False):
  """x [..., *in] times kernel [*in, *out] plus bias [*out] -> [..., *out].

  One 2-D matrix product over the flattened leading and `in` axes (the shape XLA's GEMM
  rewrites take, also for the weight gradient); with `fp8`, in float8 (see fp8.py).
  """
  num_in = kernel.ndim - bias.ndim
  in_size = int(np.prod(kernel.shape[:num_in]))
  if x.shape[x.ndim - num_in:] != kernel.shape[:num_in]:
    raise ValueError(f"inputs {x.shape} do not end in the kernel's input axes {kernel.shape}")
  dot_general = fp8_lib.dot_general if fp8 else jax.lax.dot_general
  out = dot_general(x.reshape(-1, in_size), kernel.reshape(in_size, -1),
                    (((1,), (0,)), ((), ())))
  return out.reshape(x.shape[:x.ndim - num_in] + bias.shape) + bias


class Attention(nn.Module):
  """Multi-head attention of queries [B, Lq, W] to keys/values [B, Lk, Wkv] -> [B, Lq, W].

  Parameters as nn.MultiHeadDotProductAttention's (query/key/value/out). Self-attention
  projects q, k and v with one matrix product, cross-attention k and v with one; `fp8` runs
  the projections in float8.
  """
  num_heads: int
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  implementation: str = "auto"
  fp8: bool = False
  lora_rank: int = 0

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, kv_valid=None, *, causal=False, train=False):
    width = inputs_q.shape[-1]
    heads = (self.num_heads, width // self.num_heads)
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads={self.num_heads}")
    weights = {name: ProjectionWeights((x.shape[-1],), heads, self.lora_rank, name=name)()
               for name, x in (("query", inputs_q), ("key", inputs_kv), ("value", inputs_kv))}
    cast = lambda x: jnp.asarray(x, self.dtype)
    names = ("query", "key", "value") if inputs_q is inputs_kv else ("key", "value")
    kernel = jnp.stack([cast(weights[n][0]) for n in names], axis=1)  # [W, n, heads, dim]
    bias = jnp.stack([cast(weights[n][1]) for n in names])
    projected = project(cast(inputs_kv), kernel, bias, fp8=self.fp8)
    if inputs_q is inputs_kv:
      query, key, value = (projected[:, :, i] for i in range(3))
    else:
      key, value = projected[:, :, 0], projected[:, :, 1]
      query = project(cast(inputs_q), *map(cast, weights["query"]), fp8=self.fp8)
    dropout_rng = None
    if train and self.dropout_rate > 0.0:
      dropout_rng = self.make_rng("dropout")
    out = attention_lib.attention(query, key, value, kv_valid, causal=causal,
                    implementation=self.implementation, dropout_rate=self.dropout_rate,
                    dropout_rng=dropout_rng)
    out_weights = ProjectionWeights(heads, (width,), self.lora_rank, name="out")()
    return project(out, *map(cast, out_weights), fp8=self.fp8)


class MlpBlock(nn.Module):
  """Position-wise feed-forward: Dense -> activation -> Dense (params as nn.Dense's)."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  activation: str = "gelu"
  fp8: bool = False
  lora_rank: int = 0

  @nn.compact
  def __call__(self, x, *, train):
    width = x.shape[-1]
    cast = lambda a: jnp.asarray(a, self.dtype)

    def dense(y, size, name):
      kernel, bias = ProjectionWeights((y.shape[-1],), (size,), self.lora_rank, name=name)()
      return project(cast(y), cast(kernel), cast(bias), fp8=self.fp8)

    x = ACTIVATIONS[self.activation](dense(x, self.mlp_dim, "fc1"))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return dense(x, width, "fc2")


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
  attention_impl: str = "auto"
  causal: bool = False
  fp8: bool = False  # the matrix products in float8 (see fp8.py)
  lora_rank: int = 0  # LoRA adapters of this rank on every matrix product (0: none)

  @nn.compact
  def __call__(self, x, valid, train):  # positional: nn.remat needs `train` static
    layer_norm = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name=name)
    residual_dropout = nn.Dropout(self.dropout, deterministic=not train)
    attn = Attention(
        self.num_heads, self.dtype,
        self.dropout if self.attention_dropout is None else self.attention_dropout,
        self.attention_impl, self.fp8, self.lora_rank, name="attn")
    attend = lambda y: attn(y, y, valid, causal=self.causal, train=train)
    mlp = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.activation, self.fp8,
                   self.lora_rank, name="mlp")
    if self.norm == "pre":
      x = x + residual_dropout(attend(layer_norm("ln_attn")(x)))
      return x + residual_dropout(mlp(layer_norm("ln_mlp")(x), train=train))
    x = layer_norm("ln_attn")(x + residual_dropout(attend(x)))
    return layer_norm("ln_mlp")(x + residual_dropout(mlp(x, train=train)))


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
  attention_impl: str = "auto"  # see attention_lib.resolve_attention_impl
  fp8: bool = False  # the blocks' matrix products in float8 (see fp8.py)
  lora_rank: int = 0  # LoRA adapters on the blocks' matrix products (0: none)

  @nn.compact
  def __call__(self, x, valid: Optional[jnp.ndarray] = None, *, train):
    if self.norm not in NORMS:
      raise ValueError(f"norm={self.norm!r}: expected one of {NORMS}")
    impl = attention_lib.resolve_attention_impl(self.attention_impl, self.dtype,
                                  x.shape[-1] // self.num_heads)
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r}: expected one of {sorted(ACTIVATIONS)}")
    length = x.shape[1]
    if impl == "cudnn" and length % 2:
      # cuDNN trains only on even lengths: one padded token, masked out as a key.
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
      valid = jnp.ones((x.shape[0], length), bool) if valid is None else valid.astype(bool)
      valid = jnp.pad(valid, ((0, 0), (0, 1)))
    block_cls = nn.remat(EncoderBlock, static_argnums=(3,)) if self.remat else EncoderBlock
    for i in range(self.num_layers):
      block = block_cls(self.num_heads, self.mlp_dim, self.dropout, self.dtype, self.norm,
                        self.activation, self.layer_norm_eps, self.attention_dropout,
                        impl, self.causal, self.fp8, self.lora_rank, name=f"block{i}")
      x = block(x, valid, train)
    x = x[:, :length]
    if self.final_norm:
      x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="ln_final")(x)
    return x


class TrunkOptions(nn.Module):
  """The options every tower's transformer trunk shares (a base for TokenEncoder and towers).

  Pretrained families override the defaults of `activation` and `layer_norm_eps`.
  """
  num_layers: int
  num_heads: int
  mlp_dim: int
  pooling: str = "cls"
  gpo_drop_rate: float = 0.0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  # or "xla", "cudnn", "pallas": see attention.resolve_attention_impl
  attention_impl: str = "auto"
  activation: str = "gelu"
  layer_norm_eps: float = 1e-6
  attention_dropout: Optional[float] = None  # None: the same as `dropout`
  fp8: bool = False  # the blocks' matrix products in float8 (see fp8.py; H100 and newer)
  # LoRA adapters of this rank on every block's attention and MLP products (0: none); with
  # the tower's trainable="none" only they train (train/optimizer.py).
  lora_rank: int = 0
  # FLIP: in training, each example keeps a random (1 - rate) of its patch tokens (towers
  # whose class sets DROPS_TOKENS; drawn from the rows' token_seed, see drop_tokens).
  token_drop_rate: float = 0.0

  def encoder(self, **kwargs):
    """An Encoder with these options (and family-specific `kwargs`: norm, causal,
    final_norm), named "encoder"."""
    return Encoder(self.num_layers, self.num_heads, self.mlp_dim, self.dropout, self.dtype,
                   self.remat, activation=self.activation, layer_norm_eps=self.layer_norm_eps,
                   attention_dropout=self.attention_dropout,
                   attention_impl=self.attention_impl, fp8=self.fp8,
                   lora_rank=self.lora_rank, name="encoder",
                   **kwargs)

  def pool(self, tokens, valid, *, train, num_prefix_tokens=1):
    """Pools with the tower's `pooling` (cls / mean / gpo) under the name "pool"."""
    return pooling.Pool(self.pooling, self.gpo_drop_rate, num_prefix_tokens, name="pool")(
        tokens, valid, train=train)

  def trunk(self):
    """A TokenEncoder with these options, to call from a tower's compact __call__."""
    options = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrunkOptions)
               if f.name not in ("parent", "name")}
    return TokenEncoder(**options, name="trunk")


def drop_tokens(x, valid, seeds, rate, num_prefix):
  """FLIP's token dropping: each row keeps its `num_prefix` tokens and round((1 - rate) n) of
  the other n, in their order, chosen by a uniform draw from its own uint32 seed (a row's,
  not the batch's: micro-batching and resuming draw the same). x [B, L, W], valid [B, L]."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"token_drop_rate={rate}: expected 0 <= rate < 1")
  n = x.shape[1] - num_prefix
  keep = max(1, int(round((1.0 - rate) * n)))
  scores = jax.vmap(lambda s: jax.random.uniform(jax.random.key(s), (n,)))(seeds)
  kept = jnp.sort(jnp.argsort(scores, axis=1)[:, :keep], axis=1) + num_prefix
  take = lambda a: jnp.concatenate(
      [a[:, :num_prefix], jnp.take_along_axis(a, kept.reshape(kept.shape + (1,) * (
          a.ndim - 2)), axis=1)], axis=1)
  return take(x), take(valid)


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
  def __call__(self, tokens, valid=None, *, train, token_seed=None):
    batch, length, width = tokens.shape
    cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, width)), tokens], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, length + 1, width))
    if valid is not None:
      valid = jnp.concatenate([jnp.ones((batch, 1), bool), valid.astype(bool)], axis=1)
    if train and self.token_drop_rate and token_seed is not None:
      x, valid = drop_tokens(x, jnp.ones((batch, length + 1), bool) if valid is None
                             else valid, token_seed, self.token_drop_rate, 1)
    x = nn.Dropout(self.dropout, deterministic=not train)(x.astype(self.dtype))
    x = self.encoder()(x, valid, train=train)
    return tower_output(self.pool(x, valid, train=train), x, valid)
