"""Scaled dot-product attention with masks, by implementation: XLA's, cuDNN's fused kernel,
or a Pallas flash-attention kernel; "auto" picks for the platform being compiled for."""

import contextlib
import contextvars
from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

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
