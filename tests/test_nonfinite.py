"""Non-finite steps: no update is applied, the run stops as config.nonfinite says with finite
checkpoints, and retrieval refuses non-finite embeddings instead of ranking them first."""

import functools

import jax
import ml_collections
import numpy as np
import optax
import pytest

from conftest import CONFIG, run_train
from test_models import example_batch, tiny_model
from xmodal_jax import parallel
from xmodal_jax.eval import retrieval
from xmodal_jax.train import checkpoint, nonfinite, state as state_lib, step as step_lib

MODALITIES = ("audio", "video", "text")


def batch_of(rng, size=16):
  batch = example_batch(rng, b=size)
  batch["_mask"] = {m: np.ones(size, bool) for m in MODALITIES}
  batch["_id"] = np.arange(size)
  return batch


def test_a_nonfinite_step_applies_no_update_and_is_counted():
  model, tx = tiny_model(), optax.adamw(1e-2)
  rng = np.random.default_rng(0)
  mesh = parallel.make_mesh()
  state = state_lib.create_train_state(model, tx, batch_of(rng, 1), seed=0)
  loss_config = ml_collections.ConfigDict(dict(
      weights=dict(contrastive=1.0), kind="softmax", pair_weights={}, impl="dense",
      block_size=0))
  train_fn = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx,
                                       loss_config=loss_config, mesh=mesh, seed=0))
  poisoned = batch_of(rng)
  poisoned["audio"]["waveform"][3, 100] = np.nan  # One sample of one row.
  after, metrics = train_fn(state, parallel.shard_batch(poisoned, mesh))
  assert int(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
  assert int(after.step) == 1  # The step counts...
  jax.tree.map(np.testing.assert_array_equal, (after.params, after.opt_state),
               (state.params, state.opt_state))  # ...but changes nothing.
  clean, metrics = train_fn(after, parallel.shard_batch(batch_of(rng), mesh))
  assert int(metrics["nonfinite"]) == 0 and int(clean.step) == 2
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), clean.params, after.params)
  assert any(jax.tree.leaves(changed))


@pytest.mark.parametrize("policy, flags, stopped_at", [
    ("skip", [0, 1, 1, 0, 1, 1, 1, 0], 7),  # A finite step resets the count.
    ("stop", [0, 0, 1, 0], 3),
])
def test_guard_stops_as_the_policy_says_naming_the_newest_checkpoint(tmp_path, policy, flags,
                                                                    stopped_at):
  config = ml_collections.ConfigDict(dict(nonfinite=dict(policy=policy, max_in_a_row=3),
                                          keep_checkpoints=2, checkpoint_every=1))
  manager = checkpoint.make_manager(str(tmp_path), config)
  checkpoint.save(manager, 1, {"w": np.ones(2, np.float32)})
  guard = nonfinite.Guard(config.nonfinite, manager)
  with pytest.raises(nonfinite.NonFiniteError, match=rf"stopped at step {stopped_at}: .*"
                     r"newest checkpoint, step 1, holds finite params"):
    for step, flag in enumerate(flags, start=1):
      guard.after(step, np.int32(flag))
    guard.finish()
  assert guard.total == sum(flags[:stopped_at])


@pytest.mark.slow
def test_a_diverging_run_stops_naming_the_step_and_keeps_finite_checkpoints(digit_data_dir,
                                                                            tmp_path):
  """A learning rate of 1e30 makes every update from step 2 on non-finite (step 1's warm-up
  rate is 0): training stops after 3 in a row with exit status 3, nothing is evaluated, and
  every kept checkpoint is finite."""
  policy, stopped_at = "skip", 4
  workdir = str(tmp_path / "run")
  proc = run_train([f"--config={CONFIG}:tiny", f"--workdir={workdir}",
                    f"--config.data.data_dir={digit_data_dir}",
                    "--config.optimizer.learning_rate=1e30", "--config.checkpoint_every=1",
                    f"--config.nonfinite.policy={policy}", "--config.nonfinite.max_in_a_row=3"],
                   check=False)
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert f"training stopped at step {stopped_at}:" in proc.stderr
  assert f"policy='{policy}'" in proc.stderr
  assert "R@1" not in proc.stdout  # Nothing evaluated a diverged model.
  manager = checkpoint.make_manager(workdir, ml_collections.ConfigDict(dict(
      keep_checkpoints=2, checkpoint_every=1)))
  assert manager.all_steps() and f"step {manager.latest_step()}, holds finite" in proc.stderr
  for saved in manager.all_steps():
    restored = manager.restore(saved)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored["params"]))


def test_retrieval_refuses_nonfinite_embeddings():
  rng = np.random.default_rng(1)
  emb = {m: rng.normal(size=(6, 4)).astype(np.float32) for m in ("audio", "text")}
  emb["audio"][2, 1] = np.nan
  masks = {m: np.ones(6, bool) for m in emb}
  with pytest.raises(ValueError, match="test/audio: 1 of 6 embeddings are not finite"):
    retrieval.evaluate_pairs(emb, masks, np.arange(6), "test")
  with pytest.raises(ValueError, match="queries: 1 of 6 embeddings are not finite"):
    retrieval.retrieval_metrics(emb["audio"], emb["text"], np.arange(6), np.arange(6))
  masks["audio"][2] = False  # A row without the modality is never ranked: no error.
  assert "test/audio->text/R@1" in retrieval.evaluate_pairs(emb, masks, np.arange(6), "test")
