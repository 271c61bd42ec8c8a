"""GPU-only checks: cuDNN's fused attention against a dense float64 NumPy reference; float8
matmuls compiled to FP8 GEMMs.

Skipped where no GPU is present (CI); run on a lent GPU with `pytest tests/test_gpu.py`.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from xmodal_jax.models import attention, towers, vision
from configs import sizes

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def numpy_attention(q, k, v, valid, causal):
  """Dense reference over [B, L, H, D] in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  allowed = np.broadcast_to(valid[:, None, None, :], logits.shape).copy()
  if causal:
    allowed &= np.tril(np.ones(logits.shape[-2:], bool))
  logits = np.where(allowed, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("length,causal", [(197, False), (77, True), (64, False)])
def test_cudnn_attention_matches_numpy_with_right_padding(length, causal):
  rng = np.random.default_rng(length)
  q, k, v = (rng.normal(size=(4, length, 12, 64)).astype(np.float32) for _ in range(3))
  lengths = np.array([length, length - 5, 9, 1])
  valid = np.arange(length)[None, :] < lengths[:, None]
  reference = numpy_attention(q, k, v, valid, causal)
  bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
  out = attention.attention(bf16(q), bf16(k), bf16(v), jnp.asarray(valid), causal=causal,
                              implementation="cudnn")
  out = np.asarray(out, np.float64)
  # Rows whose query sees no valid key (causal, padded) are undefined: compare the rest.
  seen = valid if not causal else np.ones_like(valid)
  error = np.linalg.norm((out - reference)[seen]) / np.linalg.norm(reference[seen])
  assert error < 1e-2, error


def test_cudnn_and_xla_two_tower_gradients_agree():
  """ViT + CLIP text in bfloat16: cuDNN attention gives XLA's loss gradients (bf16 tolerance)."""
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 17, size=8)
  ids = rng.integers(1, 500, size=(8, 16)).astype(np.int32)
  ids[np.arange(8), lengths - 1] = 511  # The end-of-text token CLIP's tower pools at.
  batch = {"image": {"pixels": rng.normal(size=(8, 64, 64, 3)).astype(np.float32)},
           "text": {"input_ids": ids,
                    "attention_mask": (np.arange(16)[None] < lengths[:, None]).astype(np.int32)}}

  def embeddings_and_grads(impl):
    options = dict(dtype="bfloat16", attention_impl=impl)
    config = ml_collections.ConfigDict(dict(embed_dim=64, towers=dict(
        image=sizes.vit("tiny", 64, **options) | dict(patch_size=8),
        text=sizes.clip_text("tiny", vocab_size=512, **options))))
    model, _ = towers.build_model(config)
    params = model.init(jax.random.key(0), batch, train=False)["params"]
    embed = lambda p: model.apply({"params": p}, batch, train=False)
    loss = lambda p: sum(jnp.sum(e[:, :8].astype(jnp.float32) ** 2) for e in embed(p).values())
    return embed(params), jax.grad(loss)(params)

  relative = lambda a, b: (np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                           / (np.linalg.norm(np.asarray(a, np.float64)) + 1e-12))
  (xla_emb, xla_grads), (cudnn_emb, cudnn_grads) = map(embeddings_and_grads, ("xla", "cudnn"))
  for m in xla_emb:
    assert relative(xla_emb[m], cudnn_emb[m]) < 1e-2, m
  # A key bias shifts every logit of a query equally, so its gradient is zero up to rounding:
  # it is compared with the whole gradient's norm, every other leaf with its own.
  scale = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2)
                      for g in jax.tree.leaves(xla_grads)))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(xla_grads),
                          jax.tree.leaves(cudnn_grads)):
    name = jax.tree_util.keystr(path)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if name.endswith("['key']['bias']"):
      assert np.linalg.norm(b) < 1e-3 * scale, name
    else:
      assert np.linalg.norm(a - b) < 5e-2 * max(np.linalg.norm(a), 1e-3 * scale), name


def test_auto_attention_is_cudnn_on_gpu_for_half_precision():
  assert attention.resolve_attention_impl("auto", jnp.bfloat16, 64) == "cudnn"
  assert attention.resolve_attention_impl("auto", jnp.float32, 64) == "xla"
  assert attention.resolve_attention_impl("auto", jnp.bfloat16, 12) == "xla"


def test_fp8_matmuls_compile_to_cublaslt_fp8_gemms():
  """fp8=True: every block product, forward (q/k/v, out, fc1, fc2) and both backward ones,
  becomes a cuBLASLt FP8 GEMM (XLA's rewrite of the quantize-dequantize pattern)."""
  tower = vision.PatchTransformer(width=64, image_size=(32, 32), patch_size=8, num_layers=2,
                                  num_heads=2, mlp_dim=128, dtype=jnp.bfloat16, fp8=True)
  pixels = jnp.asarray(np.random.default_rng(0).normal(size=(16, 32, 32, 3)), jnp.float32)
  params = tower.init(jax.random.key(0), {"pixels": pixels}, train=False)["params"]
  loss = lambda p: jnp.sum(
      tower.apply({"params": p}, {"pixels": pixels}, train=False)["pooled"]
      .astype(jnp.float32) ** 2)
  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  gemms = hlo.count('custom_call_target="__cublas$lt$matmul$f8"')
  assert gemms == 2 * 4 * 3, gemms
