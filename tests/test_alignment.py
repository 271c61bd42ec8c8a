"""ALBEF-style alignment: ITC / IMS / LMIM / matching against NumPy formulas, the queue kept
in place on 8 devices, hard negatives, the queue's FIFO order, the EMA formula, checkpoint restore of
queues, 8 devices against 1, and re-ranking."""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from xmodal_jax import parallel, schema
from xmodal_jax.eval import rerank
from xmodal_jax.losses import alignment
from xmodal_jax.models import pooling


def normalized(rng, *shape):
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_queue_contrastive(q, qm, k, queue, s, ids, key_mask, query_mask, queue_ids, alpha):
  """Row by row, as docs/methods.md writes it."""
  cols = np.concatenate([k, queue])
  col_ids = np.concatenate([ids, queue_ids])
  col_ok = np.concatenate([key_mask, queue_ids >= 0])
  losses = []
  for i in range(len(q)):
    y = ((col_ids == ids[i]) & col_ok).astype(np.float64)
    if not query_mask[i] or not y.sum():
      continue
    y /= y.sum()
    logits = s * cols[col_ok] @ q[i]
    if alpha is not None:
      p = np.exp(np_log_softmax(s * cols[col_ok] @ qm[i]))
      y_ok = alpha * p + (1 - alpha) * y[col_ok]
    else:
      y_ok = y[col_ok]
    losses.append(-(y_ok * np_log_softmax(logits)).sum())
  return np.mean(losses)


@pytest.mark.parametrize("alpha", [None, 0.4])
def test_queue_contrastive_matches_numpy_with_positive_aware_targets(alpha):
  rng = np.random.default_rng(0)
  batch, size, dim = 6, 10, 8
  ids = np.array([3, 7, 7, 11, 12, 13])  # two captions of item 7 in the batch
  queue_ids = np.array([7, 3, 99, -1, 11, 98, -1, 7, 50, 51])  # batch ids in the queue too
  key_mask = np.array([True, True, False, True, True, True])
  query_mask = np.array([True, True, True, True, False, True])
  q, qm, k = normalized(rng, batch, dim), normalized(rng, batch, dim), normalized(rng, batch, dim)
  queue = normalized(rng, size, dim)
  got, count = alignment.queue_contrastive(q, qm, k, queue, 4.0, ids=ids, key_mask=key_mask,
                                           query_mask=query_mask, queue_ids=queue_ids,
                                           alpha=alpha)
  want = np_queue_contrastive(q, qm, k, queue, 4.0, ids, key_mask, query_mask, queue_ids,
                              alpha)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert int(count) == 5  # the query without its modality is not counted


def test_queue_stays_in_place_on_eight_devices():
  """With the queue's rows sharded, scores against it stay sharded by columns: no collective
  moves anything of the queue's length, and value and query gradient are the 1-device ones."""
  mesh = parallel.make_mesh()
  assert mesh.size == 8
  rng = np.random.default_rng(3)
  batch, size, dim = 16, 96, 8
  ids = rng.integers(0, 12, size=batch).astype(np.int32)
  queue_ids = rng.integers(-1, 30, size=size).astype(np.int32)
  key_mask, query_mask = rng.random(batch) > 0.2, rng.random(batch) > 0.2
  q, qm, k = (normalized(rng, batch, dim) for _ in range(3))
  queue = normalized(rng, size, dim)

  def loss(q, qm, k, queue, ids, key_mask, query_mask, queue_ids, columns):
    return alignment.queue_contrastive(q, qm, k, queue, 5.0, ids=ids, key_mask=key_mask,
                                       query_mask=query_mask, queue_ids=queue_ids, alpha=0.4,
                                       queue_columns=columns)[0]
  args = (q, qm, k, queue, ids, key_mask, query_mask, queue_ids)
  rows = NamedSharding(mesh, P(parallel.DATA_AXIS))
  sharded = jax.jit(jax.value_and_grad(functools.partial(
      loss, columns=NamedSharding(mesh, P(None, parallel.DATA_AXIS)))))
  sharded_args = [jax.device_put(x, rows) for x in args]
  hlo = sharded.lower(*sharded_args).compile().as_text()
  collectives = [line for line in hlo.splitlines() if re.search(
      r"= \S+ (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)\(", line)]
  assert collectives  # the queries are gathered
  for line in collectives:
    shapes = re.findall(r"\[([\d,]*)\]", line.split("=", 1)[1].split("(", 1)[0])
    assert all(str(size) not in dims.split(",") for dims in shapes), line
  value, grad = sharded(*sharded_args)
  want_value, want_grad = jax.value_and_grad(functools.partial(loss, columns=None))(*args)
  np.testing.assert_allclose(value, np_queue_contrastive(
      q, qm, k, queue, 5.0, ids, key_mask, query_mask, queue_ids, 0.4), rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)


def test_lmim_matches_numpy():
  rng = np.random.default_rng(1)
  batch, locals_, dim, s = 5, 4, 8, 3.0
  g = normalized(rng, batch, dim)
  local = normalized(rng, batch, locals_, dim)
  valid = rng.random((batch, locals_)) > 0.3
  valid[:, 0] = True
  mask = np.array([True, True, False, True, True])
  got = alignment.lmim(g, local, valid, s, mask=mask)
  terms = []
  for i in range(batch):
    if not mask[i]:
      continue
    negatives = [s * g[i] @ local[j, k] for j in range(batch) for k in range(locals_)
                 if j != i and mask[j] and valid[j, k]]
    for k in range(locals_):
      if valid[i, k]:
        positive = s * g[i] @ local[i, k]
        logits = np.array([positive] + negatives)
        terms.append(-np_log_softmax(logits)[0])
  np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)


def test_intra_modalities_choose_what_ims_and_lmim_run_on():
  """config.loss.intra_modalities = ("text", "video"): IMS and LMIM are the means of those
  modalities' terms (each the NumPy-checked formula above), audio left out; a name that is
  not a modality is an error naming the field."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  from xmodal_jax.losses import objectives  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  modalities, batch, dim = ("audio", "text", "video"), 6, 8
  emb = {m: normalized(rng, batch, dim) for m in modalities}
  masks = {m: np.ones(batch, bool) for m in modalities}
  inputs = objectives.Inputs(
      emb, masks, 3.0, ids=np.arange(batch),
      locals={m: (normalized(rng, batch, 3, dim), np.ones((batch, 3), bool)) for m in modalities},
      momentum=objectives.Momentum(
          {m: normalized(rng, batch, dim) for m in modalities},
          {m: {"emb": normalized(rng, 12, dim), "ids": np.full(12, -1)} for m in modalities}))
  chosen = ml_collections.ConfigDict(dict(intra_modalities=("text", "video")))
  everyone = ml_collections.ConfigDict(dict(intra_modalities=()))
  for term in (objectives.ims_term, objectives.lmim_term):
    value, metrics = term(inputs, chosen)
    _, all_metrics = term(inputs, everyone)
    assert sorted(metrics) == ["text", "video"] and sorted(all_metrics) == list(modalities)
    np.testing.assert_allclose(value, (all_metrics["text"] + all_metrics["video"]) / 2,
                               rtol=1e-6)
  config = audio_video_text.get_config("align_fuse")
  config.loss.intra_modalities = ("text", "speech")
  with pytest.raises(ValueError, match=r"config.loss.intra_modalities: \['speech'\]"):
    schema.resolve(config, jax.device_count())


def test_ims_with_a_second_view_takes_that_views_keys():
  """With the momentum model's embeddings of video's second view, video's IMS is the NumPy
  formula with those as the batch keys (the queue unchanged); audio, without one,
  keeps its own momentum keys."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from xmodal_jax.losses import objectives  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  batch, dim = 6, 8
  modalities = ("audio", "video")
  emb, momentum = ({m: normalized(rng, batch, dim) for m in modalities} for _ in range(2))
  views = {"video": normalized(rng, batch, dim)}
  queue_ids = np.array([2, -1, 40, 41, -1, 5, 42, 43])
  queues = {m: {"emb": normalized(rng, 8, dim), "ids": queue_ids} for m in modalities}
  ids, ones = np.arange(batch), np.ones(batch, bool)
  inputs = objectives.Inputs(emb, {m: ones for m in modalities}, 3.0, ids=ids,
                             momentum=objectives.Momentum(momentum, queues, view_emb=views))
  _, metrics = objectives.ims_term(inputs, ml_collections.ConfigDict(dict(intra_modalities=())))
  for m, keys in (("video", views["video"]), ("audio", momentum["audio"])):
    want = np_queue_contrastive(emb[m], momentum[m], keys, queues[m]["emb"], 3.0, ids, ones,
                                ones, queue_ids, None)
    np.testing.assert_allclose(metrics[m], want, rtol=1e-5, err_msg=m)


def test_second_view_is_another_draw_of_the_same_example(digit_data_dir):
  """The pipeline's second view of video: the same items and shapes, other random shifts;
  a second view that IMS does not read, or that cannot differ, is a config error."""
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  from xmodal_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = audio_video_text.get_config("tiny,align_fuse")
  config.data.data_dir = digit_data_dir
  config.modalities.video.update(max_shift=2, second_view=True)
  resolved = schema.resolve(config, jax.device_count())
  batch = next(pipeline.train_iterator(resolved, pipeline.get_builder(config.data)))
  assert list(batch["_views"]) == ["video"]
  first, second = batch["video"]["frames"], batch["_views"]["video"]["frames"]
  assert first.shape == second.shape and not np.array_equal(first, second)
  config.loss.intra_modalities = ("text",)
  with pytest.raises(ValueError, match="video.second_view: only IMS reads"):
    schema.resolve(config, jax.device_count())
  config.loss.intra_modalities = ("video",)
  config.modalities.video.augment = False
  with pytest.raises(ValueError, match="both views are the same"):
    schema.resolve(config, jax.device_count())


@pytest.mark.slow  # compiles towers and their gradients; the full suite runs it
def test_lmim_gradients_are_finite_when_a_local_run_is_all_padding():
  """Text of 9 tokens pooled into 4 runs: a short caption's last runs hold only padding, so
  their local feature is exactly 0 before normalization; its gradient must stay finite (the
  norm's is 0/0 there). l2_normalize equals x / max(|x|, eps) in NumPy."""
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  from xmodal_jax.models import towers  # pylint: disable=g-import-not-at-top
  from xmodal_jax import experiment, schema  # pylint: disable=g-import-not-at-top
  from xmodal_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-8, 0.0]], np.float32)
  np.testing.assert_allclose(towers.l2_normalize(x), x / np.maximum(
      np.linalg.norm(x, axis=1, keepdims=True), 1e-6), rtol=1e-6)
  assert np.isfinite(jax.grad(lambda v: towers.l2_normalize(v).sum())(x)).all()
  config = audio_video_text.get_config("tiny,align_fuse")
  config.model.local_features = 4
  config.loss.weights = dict(lmim=1.0)
  del config.modalities["audio"], config.model.towers["audio"]
  config.model.fusion.pairs = ["text:video"]
  config = schema.resolve(config, jax.device_count())
  model, *_ = experiment.build_model_and_optimizer(config)
  rng = np.random.default_rng(0)
  batch = {"video": {"frames": rng.random((4, 4, 8, 8, 1)).astype(np.float32)},
           "text": {"input_ids": np.full((4, 8), 5, np.int32),
                    "attention_mask": np.array([[1] * 3 + [0] * 5] * 4, np.int32)},
           "_mask": {m: np.ones(4, bool) for m in ("video", "text")},
           "_id": np.arange(4)}
  params = model.init(jax.random.key(0), batch, train=False, method=model.init_all)["params"]
  mesh = parallel.make_mesh(jax.devices()[:1])
  loss_fn = lambda p: step_lib.compute_loss(p, batch, jax.random.key(1), model=model,
                                            loss_config=config.loss, mesh=mesh)[0]
  grads = jax.jit(jax.grad(loss_fn))(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_pool_locals_is_the_valid_weighted_mean_of_equal_runs():
  rng = np.random.default_rng(2)
  tokens = rng.normal(size=(2, 10, 3)).astype(np.float32)
  valid = np.ones((2, 10), bool)
  valid[1, 7:] = False
  pooled, ok = pooling.pool_locals(jnp.asarray(tokens), jnp.asarray(valid), 4)
  runs = [range(0, 3), range(3, 5), range(5, 8), range(8, 10)]  # i * 4 // 10
  for b in range(2):
    for r, positions in enumerate(runs):
      kept = [p for p in positions if valid[b, p]]
      assert bool(ok[b, r]) == bool(kept)
      if kept:
        np.testing.assert_allclose(pooled[b, r], tokens[b, kept].mean(0), rtol=1e-5)


def test_pool_grid_averages_patch_cells():
  rng = np.random.default_rng(6)
  tokens = rng.normal(size=(2, 1 + 6 * 5, 3)).astype(np.float32)  # [CLS] + 6 x 5 patches
  pooled, ok = pooling.pool_grid(jnp.asarray(tokens), 1, 6, 5, 2)
  patches = tokens[:, 1:].reshape(2, 6, 5, 3)
  cells = [(slice(0, 3), slice(0, 3)), (slice(0, 3), slice(3, 5)),
           (slice(3, 6), slice(0, 3)), (slice(3, 6), slice(3, 5))]  # r * 2 // n
  for c, (rows, cols) in enumerate(cells):
    np.testing.assert_allclose(pooled[:, c], patches[:, rows, cols].mean(axis=(1, 2)),
                               rtol=1e-5)
  assert ok.all() and pooled.shape == (2, 4, 3)


def test_hard_negatives_follow_softmax_over_other_items():
  rng = np.random.default_rng(3)
  n = 5
  sim = rng.normal(size=(n, n)).astype(np.float32) * 2
  ids = np.array([0, 1, 1, 2, 3])  # items 1 and 2 are the same item
  mask_b = np.array([True, True, True, True, False])
  draws = jax.vmap(lambda key: alignment.hard_negatives(
      key, sim, ids, ids, np.ones(n, bool), mask_b))(jax.random.split(jax.random.key(0), 4000))
  neg_col, row_ok = np.asarray(draws[0]), np.asarray(draws[1])
  for i in range(n):
    allowed = (ids != ids[i]) & mask_b
    assert row_ok[0, i] == allowed.any()
    p = np.where(allowed, np.exp(sim[i] - sim[i].max()), 0)
    p /= p.sum()
    freq = np.bincount(neg_col[:, i], minlength=n) / len(neg_col)
    np.testing.assert_allclose(freq, p, atol=0.035)


def test_matching_loss_matches_numpy():
  rng = np.random.default_rng(4)
  pos, neg_b, neg_a = (rng.normal(size=(4, 2)).astype(np.float32) for _ in range(3))
  ok = [np.array([1, 1, 0, 1], bool), np.array([1, 0, 1, 1], bool), np.ones(4, bool)]
  loss, _ = alignment.matching_loss(pos, neg_b, neg_a, *ok)
  terms = ([-np_log_softmax(pos[i])[1] for i in range(4) if ok[0][i]]
           + [-np_log_softmax(neg_b[i])[0] for i in range(4) if ok[1][i]]
           + [-np_log_softmax(neg_a[i])[0] for i in range(4) if ok[2][i]])
  np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-5)


def ring_rows(step, batch, size, shards):
  """Queue rows of the batch enqueued at `step` (0-based), in batch order: block k of
  size / shards rows takes batch rows k * run .. (k + 1) * run - 1 (run = batch / shards)."""
  run, block = batch // shards, size // shards
  offset = step * batch % size // shards
  return np.concatenate([k * block + offset + np.arange(run) for k in range(shards)])


@pytest.mark.parametrize("shards", [1, 2])
def test_queue_keeps_the_most_recent_entries_in_order(shards):
  size, batch, dim = 12, 4, 3
  queue = jnp.zeros((size, dim))
  ids = jnp.full((size,), -1, jnp.int32)
  pointer = jnp.zeros((), jnp.int32)
  history = []
  enqueue = jax.jit(functools.partial(alignment.enqueue, shards=shards))
  for step in range(7):
    keys = jnp.full((batch, dim), float(step)) + jnp.arange(batch)[:, None] / 10
    step_ids = jnp.arange(batch) + 100 * step
    valid = jnp.arange(batch) != (step % batch)  # one item per step lacks the modality
    queue, ids, pointer = enqueue(queue, ids, pointer, keys, step_ids, valid)
    history += [(np.asarray(k), int(i) if v else -1) for k, i, v in zip(keys, step_ids, valid)]
    assert int(pointer) == (step + 1) * batch % size
    recent = history[-size:]
    # The latest size / batch steps' keys, each batch where ring_rows puts it.
    for back in range(min(step + 1, size // batch)):
      rows = ring_rows(step - back, batch, size, shards)
      entries = history[(step - back) * batch:(step - back + 1) * batch]
      np.testing.assert_array_equal(np.asarray(ids)[rows], [i for _, i in entries])
      np.testing.assert_array_equal(np.asarray(queue)[rows], np.stack([k for k, _ in entries]))
    if shards == 1:  # one ring: oldest first from the pointer on
      order = (int(pointer) + np.arange(size)) % size
      filled = min(len(history), size)
      np.testing.assert_array_equal(np.asarray(ids)[order][size - filled:],
                                    [i for _, i in recent])
    filled = sorted(i for i in np.asarray(ids) if i >= 0)
    assert filled == sorted(i for _, i in recent if i >= 0)  # the same entries either way


def test_rerank_with_an_oracle_and_with_the_embedding_scores():
  rng = np.random.default_rng(5)
  q, g = normalized(rng, 30, 8), normalized(rng, 40, 8)
  q_ids, g_ids = np.arange(30) % 20, np.arange(40) % 20  # two positives each
  from xmodal_jax.eval import retrieval  # pylint: disable=g-import-not-at-top
  emb_ranks = retrieval.query_ranks(q, g, q_ids, g_ids)
  # Scoring with the embedding similarity itself changes nothing.
  ranks, _ = rerank.rerank(q, g, q_ids, g_ids,
                           lambda top: np.take_along_axis(q @ g.T, top, axis=1), k=10)
  np.testing.assert_array_equal(ranks, emb_ranks)
  # An oracle head puts a positive first whenever one is in the top k.
  oracle = lambda top: (g_ids[top] == q_ids[:, None]).astype(float)
  ranks, reranked = rerank.rerank(q, g, q_ids, g_ids, oracle, k=10)
  np.testing.assert_array_equal(ranks, np.where(emb_ranks <= 10, 1, emb_ranks))
  assert reranked.shape == (30, 10)


# --- The train step on the embedded data (tiny towers, align_fuse) -------------------------


@pytest.fixture(scope="module")
def aligned_run(digit_data_dir, tmp_path_factory):
  """configs/audio_video_text.py:tiny,align_fuse trained 4 steps through train_and_evaluate
  (a checkpoint after every step; queue of 64 = 4 batches; the text pairs' fusion encoders)."""
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  from xmodal_jax import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  config = audio_video_text.get_config("tiny,align_fuse")
  config.data.data_dir = digit_data_dir
  config.alignment.queue_size = 64
  config.total_steps, config.checkpoint_every, config.log_every = 4, 1, 1
  config.keep_checkpoints = 4
  config.data.eval_split = "test[:100]"  # re-ranking 4 directions x 100 queries x 4
  config.evals.retrieval.update(every=4, fused="none")
  config.evals.rerank.update(every=4, k=4)
  config.model.fusion.pairs = ("text:audio", "text:video")  # two fusion encoders are enough
  # IMS on video takes the momentum keys of a second view (frames shifted by other draws).
  config.modalities.video.update(max_shift=2, second_view=True)
  workdir = str(tmp_path_factory.mktemp("aligned"))
  metrics = experiment_lib.train(config, workdir)
  return config, workdir, metrics


@pytest.mark.slow
def test_align_fuse_trains_logs_each_term_and_reranks(aligned_run):
  config, workdir, metrics = aligned_run
  split = config.data.eval_split
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  for term in ("itc", "ims", "lmim", "itm"):
    assert all(np.isfinite(r[f"train/{term}"]) for r in records if "train/loss" in r)
  for direction in ("text->video", "video->text", "text->audio", "audio->text"):
    assert f"{split}/{direction} (rerank)/R@1" in metrics
    assert metrics[f"{split}/{direction} (rerank)/ms_per_query"] > 0
  assert f"{split}/audio->video/R@1" in metrics
  assert f"{split}/audio->video (rerank)/R@1" not in metrics  # no fusion pair for it


@pytest.mark.slow
def test_queues_and_ema_across_steps_and_checkpoint_restores(aligned_run):
  """Restored checkpoints of steps 1..4: step n's momentum keys (the batch's ids, and the
  embeddings its EMA params give) sit at the rows `ring_rows` gives (each device's 2 batch
  rows in its block of 8 queue rows) and stay there at later steps; the EMA follows
  ema_n = m ema_(n-1) + (1 - m) params_(n-1)."""
  import flax  # pylint: disable=g-import-not-at-top
  from xmodal_jax import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  config, workdir, _ = aligned_run
  states = {n: experiment_lib.setup(config, workdir, step=n) for n in range(1, 5)}
  first = states[1]
  embed = jax.jit(functools.partial(first.model.apply, train=False))
  batches = first.source.train_batches()
  m, flat = config.alignment.momentum, flax.traverse_util.flatten_dict
  for n in range(1, 5):
    queues = states[n].state.queues
    assert int(queues["pointer"]) == 16 * n % 64
    batch = parallel.shard_batch(next(batches), first.mesh)
    keys = embed({"params": states[n].state.momentum_params}, batch)
    shards = first.mesh.shape[parallel.DATA_AXIS]
    assert shards == 8
    rows = ring_rows(n - 1, 16, 64, shards)
    written = np.concatenate([ring_rows(i, 16, 64, shards) for i in range(n)])
    for modality, emb in keys.items():
      for later in range(n, 5):  # kept, in place, by every later step
        queue = states[later].state.queues[modality]
        np.testing.assert_array_equal(np.asarray(queue["ids"])[rows], np.asarray(batch["_id"]))
        np.testing.assert_allclose(np.asarray(queue["emb"])[rows], np.asarray(emb), atol=1e-5)
      assert (np.delete(np.asarray(queues[modality]["ids"]), written) == -1).all()
    if n > 1:
      previous = states[n - 1].state
      expected = jax.tree.map(lambda e, p: m * np.asarray(e) + (1 - m) * np.asarray(p),
                              previous.momentum_params, previous.params)
      got = flat(jax.tree.map(np.asarray, states[n].state.momentum_params))
      for path, value in flat(expected).items():
        np.testing.assert_allclose(got[path], value, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_eight_devices_give_the_single_device_losses(aligned_run):
  from xmodal_jax import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from xmodal_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  from xmodal_jax.losses import objectives  # pylint: disable=g-import-not-at-top
  config, workdir, _ = aligned_run
  experiment = experiment_lib.setup(config, workdir)
  state = experiment.state
  batch = next(experiment.source.train_batches(7))
  results = []
  for mesh in (parallel.make_mesh(jax.devices()[:1]), parallel.make_mesh()):
    assert mesh.size in (1, 8)
    sharded = parallel.shard_batch(batch, mesh)
    put = functools.partial(jax.device_put, device=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    momentum_emb = jax.jit(functools.partial(experiment.model.apply, train=False))(
        {"params": put(state.momentum_params)}, sharded)
    fn = jax.jit(functools.partial(step_lib.compute_loss, model=experiment.model,
                                   loss_config=config.loss, mesh=mesh))
    loss, metrics = fn(put(state.params), sharded, jax.random.key(3),
                       objectives.Momentum(momentum_emb, put(state.queues), 0.4))
    results.append(jax.tree.map(np.asarray, (loss, metrics)))
  (loss1, metrics1), (loss8, metrics8) = results
  np.testing.assert_allclose(loss8, loss1, rtol=2e-5)
  for name in ("itc", "ims", "lmim", "itm"):
    np.testing.assert_allclose(metrics8[name], metrics1[name], rtol=2e-5, err_msg=name)


@pytest.mark.slow
def test_the_service_reranks_a_text_query_by_the_matching_head(aligned_run, tmp_path):
  """serve/searcher.py's re-ranked search: the exact top 6 of a caption, re-ordered by the
  matching logits of the caption's tokens with each candidate's, as the evaluation pass
  computes them (Embedder.split with tokens, embed.match_step)."""
  from xmodal_jax import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from xmodal_jax.eval import embed, export  # pylint: disable=g-import-not-at-top
  from xmodal_jax.serve import searcher as searcher_lib  # pylint: disable=g-import-not-at-top
  config, workdir, _ = aligned_run
  experiment = experiment_lib.setup(config, workdir, require_checkpoint=True)
  params, split = experiment.state.params, config.data.eval_split
  out = str(tmp_path / "export")
  signature = {"split": split, "step": experiment.step, "workdir": workdir,
               "dataset": config.data.name}
  export.write_shards(out, experiment.embedder, params, split, signature=signature,
                      shard_rows=1000, log=lambda _: None)
  export.finish(out, signature, "float32")
  searcher = searcher_lib.Searcher(experiment, export.read_export(out), log=lambda _: None)
  evaluated = experiment.embedder.split(params, split, tokens=("text", "video"))
  query_row = 3
  caption = experiment.source.item_texts(split, [evaluated.ids[query_row]])[
      int(evaluated.ids[query_row])][0]
  plain = searcher.search({"text": caption}, "video", k=6, exact=True)
  reranked = searcher.search({"text": caption}, "video", k=6, exact=True, rerank=6)
  assert "re-ranked by the matching head of text:video" in reranked["how"]
  rows = np.array([hit["row"] for hit in plain["hits"]])
  text, video = evaluated.tokens["text"], evaluated.tokens["video"]
  logits = embed.match_step(
      params, "text:video", np.repeat(text["tokens"][query_row][None], 6, 0),
      np.repeat(text["valid"][query_row][None], 6, 0), video["tokens"][rows],
      video["valid"][rows], model=experiment.model)
  order = np.argsort(-np.asarray(logits), kind="stable")
  assert [hit["row"] for hit in reranked["hits"]] == list(rows[order])
  np.testing.assert_allclose([hit["score"] for hit in reranked["hits"]],
                             np.asarray(logits)[order], atol=1e-4)
  with pytest.raises(searcher_lib.QueryError, match="no fusion encoder"):
    searcher.search({"audio": b"RIFF"}, "video", k=3, rerank=3)
