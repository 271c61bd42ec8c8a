"""Gradient caching (config.grad_accum_steps): the same loss and gradients as one pass over
the global batch, with a fraction of the activations."""

import functools

import jax
import numpy as np
import optax
import pytest

import fixtures

from xmodal_jax import parallel
from xmodal_jax import experiment, schema
from xmodal_jax.train import step as step_lib


def test_micro_batches_take_rows_of_every_device_and_merge_back():
  """Micro-batch i holds rows [i b, (i + 1) b) of each device's share (b = B / (D k)), so
  the split moves nothing between devices; merging restores the order."""
  mesh = parallel.make_mesh(shape=dict(data=2, fsdp=4))
  rows = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
  sharded = jax.device_put(rows, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(parallel.BATCH_AXES)))
  micro = jax.jit(functools.partial(step_lib.split_micro_batches, steps=4, mesh=mesh))(sharded)
  expected = rows.reshape(8, 4, 2, 3).transpose(1, 0, 2, 3).reshape(4, 16, 3)
  np.testing.assert_array_equal(np.asarray(micro), expected)
  held = {shard.device: set(np.asarray(shard.data)[:, 0]) for shard in sharded.addressable_shards}
  for shard in micro.addressable_shards:  # each device's micro-batch rows are its own rows
    assert set(np.asarray(shard.data)[..., 0].ravel()) <= held[shard.device]
  merged = jax.jit(functools.partial(step_lib.merge_micro_batches, mesh=mesh))(micro)
  np.testing.assert_array_equal(np.asarray(merged), rows)


@pytest.fixture(scope="module")
def every_objective():
  """configs/audio_video_text.py:tiny,align_fuse cut to audio + text (one fusion pair, half
  the compile time) with every objective weighted (InfoNCE, regression, ITC, IMS, LMIM, ITM),
  its model, a state on data=2 x fsdp=4, and queues half full of other items."""
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  config = audio_video_text.get_config("tiny,align_fuse")
  del config.modalities["video"], config.model.towers["video"]
  config.model.fusion.pairs = ["text:audio"]
  config.loss.pair_weights = {"audio-text": 1.0}
  config.loss.intra_modalities = ("text",)
  config.loss.weights.update(contrastive=1.0, regression=0.5)
  config.batch_size, config.alignment.queue_size = 64, 128
  config, model, tx, mesh, batch, shardings, state = fixtures.sharded_state(
      config, dict(data=2, fsdp=4))
  rng = np.random.default_rng(1)
  queues = {m: {"emb": rng.normal(size=q["emb"].shape).astype(np.float32),
                "ids": np.where(np.arange(128) < 64, 1000 + np.arange(128), -1).astype(np.int32)}
            for m, q in state.queues.items() if m != "pointer"}
  queues["pointer"] = np.int32(64)
  queues["text"]["ids"][:4] = 3  # queued keys of items in the batch are positives
  return config, model, mesh, state.replace(queues=queues), parallel.shard_batch(batch, mesh)


@pytest.mark.slow  # compiles the step twice; the full suite runs it
def test_accumulation_gives_the_same_step(every_objective):
  """train_step at k = 4 and k = 1 with SGD at learning rate 1 (new params = params -
  gradients): the same loss, terms and gradients; the queues gain the whole global batch
  once (pointer 64 -> 128 = 0) and the EMA moves once."""
  config, model, mesh, state, batch = every_objective
  states, metrics = {}, {}
  for k in (1, 4):
    step = jax.jit(functools.partial(
        step_lib.train_step, model=model, tx=optax.sgd(1.0), loss_config=config.loss,
        mesh=mesh, seed=0, alignment_config=config.alignment, grad_accum_steps=k))
    with jax.set_mesh(mesh):
      states[k], metrics[k] = jax.device_get(step(state, batch))
  np.testing.assert_allclose(metrics[4]["loss"], metrics[1]["loss"], rtol=1e-5)
  for name in ("contrastive", "regression", "itc", "ims", "lmim", "itm", "grad_norm"):
    assert metrics[1][name] > 0, name
    np.testing.assert_allclose(metrics[4][name], metrics[1][name], rtol=1e-5, err_msg=name)
  params = jax.device_get(state.params)
  grads = {k: jax.tree.map(np.subtract, params, states[k].params) for k in (1, 4)}
  flat = jax.tree_util.tree_leaves_with_path(grads[1])
  assert sum(np.abs(g).sum() > 0 for _, g in flat) > 0.9 * len(flat)
  # Float noise of sums in another order: 1e-3 of each leaf's largest gradient (a wrong row
  # or a missing term is off by its whole size), and of the largest one for leaves that are
  # 0 in exact arithmetic, such as attention key biases' (~1e-10 either way).
  scale = max(np.abs(g).max() for _, g in flat)
  for (path, g), g4 in zip(flat, jax.tree.leaves(grads[4])):
    np.testing.assert_allclose(g4, g, rtol=0, atol=max(1e-3 * np.abs(g).max(), 1e-6 * scale),
                               err_msg=jax.tree_util.keystr(path))
  assert int(states[4].queues["pointer"]) == int(states[1].queues["pointer"]) == 0
  for name, tree in (("queues", lambda s: s.queues), ("EMA", lambda s: s.momentum_params)):
    for path, a in jax.tree_util.tree_leaves_with_path(tree(states[1])):
      b = functools.reduce(lambda node, key: node[key.key], path, tree(states[4]))
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{name}{jax.tree_util.keystr(path)}")


@pytest.mark.slow  # compiles the step twice; the full suite runs it
def test_accumulation_cuts_compiled_temporaries(every_objective):
  """The default objective (InfoNCE on every pair) at batch 1,024 on one device: k = 4 needs
  at most half the temporaries of k = 1."""
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  del every_objective
  temps = {}
  for k in (1, 4):
    config = audio_video_text.get_config("tiny")
    config.batch_size, config.grad_accum_steps = 1024, k
    _, report = experiment.compile_train_step(config, jax.devices()[:1])
    temps[k] = report.temp_bytes
  assert temps[4] <= temps[1] / 2, temps


def test_batch_must_divide_into_micro_batches_on_every_device():
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  config = audio_video_text.get_config("tiny")
  config.grad_accum_steps = 3
  with pytest.raises(ValueError,
                     match=r"config.grad_accum_steps=3: .*config.batch_size=16 a multiple"):
    schema.resolve(config, 2)
