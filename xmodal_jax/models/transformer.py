"""The transformer encoder block every tower uses, in the variants pretrained families need.

One block implementation covers pre-LN (ViT, CLIP, AST, our own towers) and post-LN (BERT,
RoBERTa, MiniLM) stacks, each family's activation and LayerNorm epsilon, and causal masking
(CLIP's text transformer).
"""

import contextlib
import contextvars
import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")
# The platform "auto" resolves for; None: JAX's default backend. Set by `target_platform`.
_TARGET_PLATFORM = contextvars.ContextVar("attention_target_platform", default=None)


@contextlib.contextmanager
def target_platform(platform):
  """Resolves attention_impl="auto" for `platform` ("tpu", "gpu", "cpu") while tracing, as
  when compiling ahead of time for TPU chips on a CPU host (train/aot.py)."""
  token = _TARGET_PLATFORM.set(platform)
  try:
    yield
  finally:
    _TARGET_PLATFORM.reset(token)


def resolve_attention_impl(implementation, dtype, head_dim):
  """"xla", "cudnn" or "pallas". "auto" is the Pallas flash-attention kernel on TPUs (head
  dims up to 128 or multiples of it), cuDNN's flash attention on GPUs for bfloat16/float16
  compute and head dims its kernel takes (multiples of 8 up to 128), XLA's elsewhere. cuDNN's
  kernel is half precision only: float32 compute takes XLA's."""
  if implementation not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={implementation!r}: expected one of {ATTENTION_IMPLS}")
  platform = _TARGET_PLATFORM.get() or jax.default_backend()
  if implementation == "auto":
    if platform == "tpu" and (head_dim <= 128 or head_dim % 128 == 0):
      return "pallas"
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    supported = platform == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if supported else "xla"
  if implementation == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return "xla"
  return implementation


def pallas_attention(query, key, value, kv_valid=None, *, causal=False, block=128):
  """Flash attention as the Pallas TPU kernel computes it, over [B, L, heads, head_dim].

  The kernel takes [B, heads, L, head_dim] in whole blocks of `block` tokens, and masks by
  segment ids: a query attends to the keys of its own segment. Queries and keys are padded
  to whole blocks; every query is in segment 1 (padded ones attend like the others, as in
  `attention`), valid keys too, padding keys in segment 0; a row with no valid key attends
  to all its keys (its output is unused). Under a mesh context (`jax.set_mesh`), the batch is
  split over every mesh axis and each device runs the kernel on its rows. Runs on CPU under
  `pltpu.force_tpu_interpret_mode()`.
  """
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=g-import-not-at-top
  batch, num_queries, _, head_dim = query.shape
  num_keys = key.shape[1]
  pad_q, pad_k = -num_queries % block, -num_keys % block
  valid = (jnp.ones((batch, num_keys), bool) if kv_valid is None else kv_valid.astype(bool))
  valid = valid | ~valid.any(axis=1, keepdims=True)
  segment_kv = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, pad_k)))
  segment_q = jnp.ones((batch, num_queries + pad_q), jnp.int32)
  heads_first = lambda x, pad: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(
      0, 2, 1, 3)
  sizes = fa.BlockSizes(block_q=block, block_k_major=block, block_k=block, block_b=1,
                        block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block,
                        block_q_dkv=block, block_k_major_dq=block, block_k_dq=block,
                        block_q_dq=block)

  def kernel(q, k, v, segment_q, segment_kv):
    return fa.flash_attention(q, k, v, segment_ids=fa.SegmentIds(segment_q, segment_kv),
                              causal=causal, sm_scale=head_dim ** -0.5, block_sizes=sizes)
  # XLA cannot split a Mosaic kernel over devices itself: under a mesh (jax.set_mesh), each
  # device runs it on its rows, the batch being split over every mesh axis.
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    rows = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
    kernel = jax.shard_map(kernel, mesh=mesh, in_specs=rows, out_specs=rows,
                           check_vma=False)
  out = kernel(heads_first(query, pad_q), heads_first(key, pad_k), heads_first(value, pad_k),
               segment_q, segment_kv)
  return out.transpose(0, 2, 1, 3)[:, :num_queries]


def key_mask(kv_valid: Optional[jnp.ndarray], num_queries: int, num_keys: int, causal: bool):
  """bool[B or 1, 1, Lq, Lk]: query q may attend to key k (k is valid, and k <= q if causal).

  None when every query may attend to every key. Padded queries attend like the others;
  their outputs are never used.
  """
  mask = None if kv_valid is None else kv_valid.astype(bool)[:, None, None, :]
  if causal:
    lower = jnp.tril(jnp.ones((num_queries, num_keys), bool))[None, None]
    mask = lower if mask is None else mask & lower
  return mask


def attention(query, key, value, kv_valid=None, *, causal=False, implementation="auto",
              dropout_rate=0.0, dropout_rng=None):
  """Scaled dot-product attention over [B, L, heads, head_dim] with a float32 softmax.

  `implementation` (see `resolve_attention_impl`): "pallas" runs the Pallas TPU flash
  attention kernel (`pallas_attention`); "cudnn" runs cuDNN's fused flash attention, with
  padding given as per-row key counts: it requires right-padded `kv_valid`
  (every valid key before every padded one), which is what our tokenizers and towers produce,
  and even lengths in training (`Encoder` pads). "xla" takes any `kv_valid` as a dense mask.
  Attention dropout (training only) uses Flax's reference path.
  """
  implementation = resolve_attention_impl(implementation, query.dtype, query.shape[-1])
  training_dropout = dropout_rate > 0.0 and dropout_rng is not None
  if implementation == "pallas" and not training_dropout:
    return pallas_attention(query, key, value, kv_valid, causal=causal)
  if implementation == "cudnn" and not training_dropout:
    lengths = None
    if kv_valid is not None:
      lengths = jnp.sum(kv_valid.astype(jnp.int32), axis=-1)
    return jax.nn.dot_product_attention(query, key, value, is_causal=causal,
                                        key_value_seq_lengths=lengths, implementation="cudnn")
  mask = key_mask(kv_valid, query.shape[1], key.shape[1], causal)
  if training_dropout:
    return nn.dot_product_attention(query, key, value, mask=mask, dropout_rng=dropout_rng,
                                    dropout_rate=dropout_rate, deterministic=False,
                                    force_fp32_for_softmax=True)
  return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="xla")


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
    out = attention(query, key, value, kv_valid, causal=causal,
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
  attention_impl: str = "auto"  # see resolve_attention_impl
  fp8: bool = False  # the blocks' matrix products in float8 (see fp8.py)
  lora_rank: int = 0  # LoRA adapters on the blocks' matrix products (0: none)

  @nn.compact
  def __call__(self, x, valid: Optional[jnp.ndarray] = None, *, train):
    if self.norm not in NORMS:
      raise ValueError(f"norm={self.norm!r}: expected one of {NORMS}")
    impl = resolve_attention_impl(self.attention_impl, self.dtype,
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
  attention_impl: str = "auto"  # or "xla", "cudnn", "pallas": see resolve_attention_impl
  activation: str = "gelu"
  layer_norm_eps: float = 1e-6
  attention_dropout: Optional[float] = None  # None: the same as `dropout`
  fp8: bool = False  # the blocks' matrix products in float8 (see fp8.py; H100 and newer)
  # LoRA adapters of this rank on every block's attention and MLP products (0: none); with
  # the tower's trainable="none" only they train (train/optimizer.py).
  lora_rank: int = 0

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
