"""Float8 matrix products (models/fp8.py) against float8 rounding done by ml_dtypes in NumPy,
and an fp8 train step on the 8-device mesh."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import optax
import pytest

from configs import sizes
from xmodal_jax import parallel, schema
from xmodal_jax.models import fp8, towers
from xmodal_jax.train import state as state_lib, step as step_lib

E4M3, E5M2 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2
MATMUL = (((1,), (0,)), ((), ()))


def numpy_rounded(x, dtype):
  """x through float8 `dtype` with the smallest power-of-two scale that keeps max|x| in range."""
  x = np.asarray(x, np.float64)
  amax, limit = np.abs(x).max(), float(ml_dtypes.finfo(dtype).max)
  if amax == 0:
    return x
  scale = 2.0 ** np.ceil(np.log2(amax / limit))
  return np.clip(x / scale, -limit, limit).astype(dtype).astype(np.float64) * scale


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_rounding_matches_ml_dtypes(dtype):
  x = (np.random.default_rng(0).standard_t(3, size=(64, 48)) * 5).astype(np.float32)
  got = np.asarray(fp8.quantize_dequantize(jnp.asarray(x), dtype), np.float64)
  np.testing.assert_array_equal(got, numpy_rounded(x, dtype))
  q, scale = fp8.quantize(jnp.asarray(x), dtype)
  assert q.dtype == dtype and scale.shape == ()
  # The scale is tight: the largest value lands in the top binade of the format.
  limit = float(ml_dtypes.finfo(dtype).max)
  assert limit / 2 < float(jnp.abs(q.astype(jnp.float32)).max()) <= limit


def test_rounding_known_answers():
  # max 896 = 2 x 448 (e4m3's largest): scale 2; 0.3 / 2 = 0.15 = 1.2 x 2^-3 rounds to
  # 1.25 x 2^-3 (three mantissa bits), i.e. 0.3125 after scaling back.
  x = jnp.array([896.0, -1.0, 0.3], jnp.float32)
  q, scale = fp8.quantize(x, E4M3)
  assert float(scale) == 2.0
  np.testing.assert_array_equal(q.astype(jnp.float32), [448.0, -0.5, 0.15625])
  np.testing.assert_array_equal(fp8.quantize_dequantize(x, E4M3), [896.0, -1.0, 0.3125])
  zeros = jnp.zeros((3,), jnp.float32)
  np.testing.assert_array_equal(fp8.quantize_dequantize(zeros, E4M3), zeros)


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_dot_general_forward_and_gradients_match_numpy(dtype, rtol):
  rng = np.random.default_rng(1)
  x = (rng.normal(size=(24, 16)) * 3).astype(np.float32)
  w = (rng.normal(size=(16, 8)) * 0.1).astype(np.float32)
  g = (rng.normal(size=(24, 8)) * 1e-3).astype(np.float32)
  cast = lambda a: jnp.asarray(a, dtype)
  out, vjp = jax.vjp(lambda a, b: fp8.dot_general(a, b, MATMUL), cast(x), cast(w))
  dx, dw = vjp(cast(g))
  # Operands and the output gradient as the bf16/f32 values the product sees.
  x8, w8 = (numpy_rounded(np.asarray(cast(a), np.float64), E4M3) for a in (x, w))
  g5 = numpy_rounded(np.asarray(cast(g), np.float64), E5M2)
  for got, want in ((out, x8 @ w8), (dx, g5 @ w8.T), (dw, x8.T @ g5)):
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol,
                               atol=rtol * np.abs(want).max())
  # And it is not the unrounded product.
  assert np.abs(np.asarray(out, np.float64) - x @ w).max() > 1e-3 * np.abs(x @ w).max()


def test_dot_general_takes_flax_dense_calls():
  """nn.Dense passes precision; 3-D inputs contract their last axis."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 16)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(3).normal(size=(16, 4)), jnp.float32)
  out = fp8.dot_general(x, w, (((2,), (0,)), ((), ())), precision=None)
  want = np.einsum("blw,wo->blo", numpy_rounded(x, E4M3), numpy_rounded(w, E4M3))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fp8_train_step_on_eight_devices_learns_like_float32():
  """A ViT + CLIP-text train step (contrastive loss over the 8-device mesh, AdamW) with fp8
  towers lowers the loss on a fixed batch about as the float32 one does."""
  rng = np.random.default_rng(0)
  batch_size, length = 16, 8
  lengths = rng.integers(3, length + 1, size=batch_size)
  ids = rng.integers(1, 63, size=(batch_size, length)).astype(np.int32)
  ids[np.arange(batch_size), lengths - 1] = 63
  batch = {"image": {"pixels": rng.normal(size=(batch_size, 16, 16, 3)).astype(np.float32)},
           "text": {"input_ids": ids, "attention_mask": (
               np.arange(length)[None] < lengths[:, None]).astype(np.int32)},
           "_mask": {"image": np.ones(batch_size, bool), "text": np.ones(batch_size, bool)},
           "_id": np.arange(batch_size, dtype=np.int32)}
  loss_config = ml_collections.ConfigDict(dict(
      weights=dict(contrastive=1.0), kind="softmax", pair_weights={}, impl="dense",
      block_size=0))
  mesh = parallel.make_mesh()
  assert mesh.size == 8

  def losses(fp8_towers):
    options = dict(fp8=fp8_towers, num_layers=1)
    model_config = schema.defaults().model
    model_config.update(embed_dim=32, towers=dict(
        image=sizes.vit("tiny", 16, **options) | dict(patch_size=4),
        text=sizes.clip_text("tiny", vocab_size=64, **options)))
    model, _ = towers.build_model(model_config)
    tx = optax.adam(3e-3)
    state = state_lib.init_on_devices(
        functools.partial(state_lib.create_train_state, model, tx, seed=0), batch,
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    step = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx,
                                     loss_config=loss_config, mesh=mesh, seed=0))
    sharded, out = parallel.shard_batch(batch, mesh), []
    for _ in range(12):
      state, metrics = step(state, sharded)
      out.append(float(metrics["loss"]))
    return np.array(out)

  plain, low = losses(False), losses(True)
  assert np.all(np.isfinite(low))
  assert low[0] == pytest.approx(plain[0], rel=0.05)
  assert low[-1] < 0.5 * low[0], low
  assert abs(low[-1] - plain[-1]) < 0.2 * plain[0], (plain, low)
