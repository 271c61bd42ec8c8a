"""FLIP's token dropping: which tokens a row keeps, evaluation untouched, the same step with
gradient caching, and fewer FLOPs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixtures
from xmodal_jax import parallel
from xmodal_jax.models import transformer
from xmodal_jax.train import step as step_lib


def test_each_row_keeps_its_prefix_and_a_seeded_subset_in_order():
  x = jnp.arange(4 * 11, dtype=jnp.float32).reshape(4, 11, 1) + 0.5  # 1 prefix + 10 patches
  valid = jnp.ones((4, 11), bool).at[3, 7:].set(False)
  seeds = jnp.array([1, 2, 1, 3], jnp.uint32)
  kept, kept_valid = transformer.drop_tokens(x, valid, seeds, 0.5, 1)
  kept = np.asarray(kept)[..., 0]
  assert kept.shape == (4, 6)  # the prefix and round(0.5 x 10) patches
  for row in range(4):
    original = np.asarray(x)[row, :, 0]
    assert kept[row, 0] == original[0]  # the [CLS] token stays
    assert set(kept[row, 1:]) <= set(original[1:]) and np.all(np.diff(kept[row]) > 0)
  np.testing.assert_array_equal(kept[0] - x[0, 0, 0], kept[2] - x[2, 0, 0])  # same seed
  assert not np.array_equal(kept[0] - x[0, 0, 0], kept[1] - x[1, 0, 0])
  positions = (kept[3] - 0.5 - 33).astype(int)  # each kept token keeps its own validity
  np.testing.assert_array_equal(np.asarray(kept_valid)[3], positions < 7)
  with pytest.raises(ValueError, match="token_drop_rate=1.0: expected 0 <= rate < 1"):
    transformer.drop_tokens(x, valid, seeds, 1.0, 1)


@pytest.fixture(scope="module")
def dropping():
  """The tiny default config with the audio and video towers dropping half their tokens,
  batch 32 on data=2 x fsdp=4."""
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  config = audio_video_text.get_config("tiny")
  for m in ("audio", "video"):
    config.model.towers[m].token_drop_rate = 0.5
  config.batch_size = 32
  config.optimizer.grad_clip_norm = 1e9
  return fixtures.sharded_state(config, dict(data=2, fsdp=4))


@pytest.mark.slow  # builds a sharded state (20 s); the full suite runs it
def test_evaluation_ignores_the_rate_and_training_drops(dropping):
  _, model, _, _, batch, _, state = dropping
  plain = at_rate(model, 0.0)
  with_rate = model.apply({"params": state.params}, batch, train=False)
  without = plain.apply({"params": state.params}, batch, train=False)
  for m in with_rate:
    np.testing.assert_array_equal(with_rate[m], without[m], err_msg=m)
  seeded = step_lib.with_token_seeds(batch, model, jax.random.key(0))
  assert "token_seed" not in seeded["text"]
  tokens = model.apply({"params": state.params}, seeded, train=True,
                       rngs={"dropout": jax.random.key(1)}, method=model.details)["tokens"]
  assert tokens["audio"][0].shape[1] == 1 + round(0.5 * (
      model.apply({"params": state.params}, batch, train=False,
                  method=model.details)["tokens"]["audio"][0].shape[1] - 1))


@pytest.mark.slow  # compiles the step twice; the full suite runs it
def test_gradient_caching_draws_the_same_tokens(dropping):
  """k = 4 micro-batches give k = 1's step: each row's kept tokens come from its own seed."""
  config, model, tx, mesh, batch, shardings, state = dropping
  sharded = parallel.shard_batch(batch, mesh)
  after = {}
  for k in (1, 4):
    step = jax.jit(functools.partial(
        step_lib.train_step, model=model, tx=tx, loss_config=config.loss, mesh=mesh,
        seed=0, alignment_config=config.alignment, grad_accum_steps=k))
    with jax.set_mesh(mesh):
      new_state, metrics = step(state, sharded)
    after[k] = (jax.device_get(new_state.params), float(metrics["loss"]))
  assert after[4][1] == pytest.approx(after[1][1], rel=1e-5)
  for a, b in zip(jax.tree.leaves(after[1][0]), jax.tree.leaves(after[4][0])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def at_rate(model, rate):
  """`model` with its token-dropping towers at `rate`."""
  return model.clone(towers={m: t.clone(token_drop_rate=rate) if step_lib.drop_rate(t) else t
                             for m, t in model.towers.items()})


def test_dropping_half_the_tokens_cuts_the_step_flops():
  """configs/image_text.py:tiny (a ViT on 32 x 32 images, 64 patches) with the image tower
  dropping half its patches: XLA's count of the train step, before partitioning."""
  from configs import image_text  # pylint: disable=g-import-not-at-top
  from xmodal_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = image_text.get_config("tiny")
  config.model.towers.image.token_drop_rate = 0.5
  config.modalities.text.tokenizer = "digit_words"
  config, model, tx, mesh, batch, shardings, state = fixtures.sharded_state(
      config, dict(data=8, fsdp=1))
  flops = {}
  for rate in (0.0, 0.5):
    train_fn = step_lib.jit_train_step(config, at_rate(model, rate), tx, mesh, shardings)
    with jax.set_mesh(mesh):
      flops[rate] = loop.step_flops(train_fn, state, parallel.shard_batch(batch, mesh))
  print(f"train step FLOPs at rate 0.5 / rate 0: {flops[0.5] / flops[0.0]:.3f}")
  assert flops[0.5] < 0.7 * flops[0.0]
