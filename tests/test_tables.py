"""The objective and evaluator tables: adding one is a function and an entry, the step and
the evaluation loop pick it up, and each entry's options are checked with the field named."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import audio_video_text
from test_models import example_batch, tiny_model
from xmodal_jax import parallel
from xmodal_jax.eval import evaluators
from xmodal_jax.losses import objectives
from xmodal_jax import experiment as experiment_lib, schema
from xmodal_jax.train import step as step_lib


def mean_distance(inputs, loss_config):
  """A global term: mean squared distance between matching audio and text embeddings."""
  del loss_config
  a, b = inputs.emb["audio"], inputs.emb["text"]
  value = jnp.mean(jnp.sum((a - b) ** 2, axis=-1))
  return value, {"audio-text": value}


def diagonal_cosine(inputs, loss_config):
  """A per-device term: 1 - the mean cosine of matching video and text rows, over the
  global batch (it reduces over the data axis itself)."""
  del loss_config
  a, b = inputs.emb["video"], inputs.emb["text"]
  total = jax.lax.psum(jnp.sum(a * b), inputs.axis_name)
  count = jax.lax.psum(a.shape[0], inputs.axis_name)
  return 1.0 - total / count, {}


@pytest.fixture
def table(monkeypatch):
  """OBJECTIVES and EVALUATORS as they are, restored after the test."""
  monkeypatch.setattr(objectives, "OBJECTIVES", dict(objectives.OBJECTIVES))
  monkeypatch.setattr(evaluators, "EVALUATORS", dict(evaluators.EVALUATORS))


def test_toy_objectives_added_to_the_table_train_on_eight_devices(table):
  objectives.register("mean_distance", objectives.Objective(mean_distance))
  objectives.register("diagonal_cosine",
                      objectives.Objective(diagonal_cosine, per_device=True))
  with pytest.raises(ValueError, match="exists already"):
    objectives.register("mean_distance", objectives.Objective(mean_distance))
  model = tiny_model()
  rng = np.random.default_rng(0)
  batch = example_batch(rng, b=16)
  batch["_mask"] = {m: np.ones(16, bool) for m in ("audio", "video", "text")}
  batch["_id"] = np.arange(16)
  params = model.init(jax.random.key(0), batch, train=False)["params"]
  loss_config = ml_collections.ConfigDict(dict(
      weights=dict(contrastive=0.0, mean_distance=2.0, diagonal_cosine=0.5)))
  mesh = parallel.make_mesh()
  assert mesh.size == 8
  loss, metrics = jax.jit(functools.partial(step_lib.compute_loss, model=model,
                                            loss_config=loss_config, mesh=mesh))(
      params, parallel.shard_batch(batch, mesh), jax.random.key(1))
  emb = {m: np.asarray(e, np.float64)
         for m, e in model.apply({"params": params}, batch, train=False).items()}
  distance = np.mean(np.sum((emb["audio"] - emb["text"]) ** 2, axis=1))
  cosine = 1.0 - np.mean(np.sum(emb["video"] * emb["text"], axis=1))
  np.testing.assert_allclose(metrics["mean_distance"], distance, rtol=1e-5)
  np.testing.assert_allclose(metrics["mean_distance/audio-text"], distance, rtol=1e-5)
  np.testing.assert_allclose(metrics["diagonal_cosine"], cosine, rtol=1e-5)
  np.testing.assert_allclose(loss, 2.0 * distance + 0.5 * cosine, rtol=1e-5)
  assert "contrastive" not in metrics  # Weight 0: not computed.


def checked(variant="tiny", **changes):
  config = audio_video_text.get_config(variant)
  for key, value in changes.items():
    node = config
    *parents, leaf = key.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = value
  schema.resolve(config, jax.device_count())


@pytest.mark.parametrize("variant, changes, message", [
    ("tiny", {"loss.weights.bogus": 1.0}, "config.loss.weights.bogus: no such objective"),
    ("tiny", {"loss.weights.contrastive": 0.0}, "every objective has weight 0"),
    ("tiny", {"loss.kind": "hinge"}, "config.loss.kind='hinge'"),
    ("tiny", {"loss.impl": "sparse"}, "config.loss.impl='sparse'"),
    ("tiny", {"loss.pair_weights.audio-image": 2.0}, "config.loss.pair_weights.audio-image"),
    ("tiny", {"loss.kind": "sigmoid"}, "config.model.logit_bias_init"),
    ("tiny,regression", {"loss.regression.target": "cubic"},
     "config.loss.regression.target='cubic'"),
    ("tiny,align_fuse", {"alignment.queue_size": 100}, "config.alignment.queue_size=100"),
    ("tiny,align_fuse", {"alignment.momentum": 1.0}, "config.alignment.momentum=1.0"),
    ("tiny,align_fuse", {"model.local_features": 0}, "config.model.local_features"),
    ("tiny,align_fuse", {"model.fusion.pairs": []}, "config.model.fusion.pairs"),
    ("tiny,align_fuse", {"evals.rerank.pairs": ["audio:image"]},
     "config.evals.rerank.pairs: 'audio:image'"),
    ("tiny,align_fuse", {"evals.rerank.k": 0}, "config.evals.rerank.k=0"),
    ("tiny", {"evals.retrieval.type": "nope"}, "config.evals.retrieval.type='nope'"),
    ("tiny", {"evals.retrieval.every": 0}, "config.evals.retrieval.every=0"),
    ("tiny", {"evals.retrieval.fused": "audio+video,audio+image"},
     "config.evals.retrieval.fused: fused query 'audio+image'"),
    ("tiny", {"total_steps": 0}, "config.total_steps=0"),
    ("tiny", {"keep_checkpoints": 0}, "config.keep_checkpoints=0"),
    ("tiny", {"optimizer.learning_rate": 0.0}, "config.optimizer.learning_rate=0.0"),
    ("tiny", {"optimizer.learning_rate": float("nan")}, "config.optimizer.learning_rate=nan"),
    ("tiny", {"optimizer.b2": 1.0}, "config.optimizer.b2=1.0"),
    ("tiny", {"nonfinite.policy": "ignore"}, "config.nonfinite.policy='ignore'"),
    ("tiny", {"nonfinite.max_in_a_row": 0}, "config.nonfinite.max_in_a_row=0"),
])
def test_each_objective_and_evaluator_names_its_bad_option(variant, changes, message):
  with pytest.raises(ValueError, match=message.replace("+", r"\+")):
    checked(variant, **changes)


def test_shipped_variants_are_valid():
  for variant in ("", "tiny", "regression", "sigmoid", "align_fuse", "tiny,sigmoid,align_fuse"):
    checked(variant)
  with pytest.raises(ValueError, match="unknown variant.*'huge'"):
    audio_video_text.get_config("tiny,huge")
  assert (audio_video_text.get_config("align_fuse,tiny").to_dict()
          == audio_video_text.get_config("tiny,align_fuse").to_dict())


def item_count(embedder, params, embedded, options, prefix):
  """A toy evaluator: how many items of the split have each modality."""
  del embedder, params, options
  return {f"{prefix}/items_with_{m}": int(mask.sum()) for m, mask in embedded.masks.items()}


def test_toy_evaluator_runs_on_its_period_and_shares_the_embedding_pass(table,
                                                                        digit_data_dir,
                                                                        tmp_path):
  evaluators.register("item_count", evaluators.Evaluator(item_count))
  config = audio_video_text.get_config("tiny")
  config.data.data_dir = digit_data_dir
  config.data.eval_split = "test[:40]"
  config.evals.retrieval.update(every=4, fused="none")
  config.evals.count = dict(type="item_count", every=2)
  config.evals.small = dict(type="item_count", every=3, split="test[:8]", prefix="small")
  experiment = experiment_lib.setup(config, str(tmp_path))
  passes = []
  split_fn = experiment.embedder.split
  experiment.embedder.split = lambda params, split, **kw: passes.append(split) or split_fn(
      params, split, **kw)
  params = experiment.state.params
  run = functools.partial(evaluators.run, experiment.config, experiment.embedder, params)

  assert run(step=2) == {f"test[:40]/items_with_{m}": 40 for m in ("audio", "video", "text")}
  assert passes == ["test[:40]"]
  assert run(step=3) == {f"small/items_with_{m}": 8 for m in ("audio", "video", "text")}
  both = run(step=4)
  assert passes == ["test[:40]", "test[:8]", "test[:40]"]  # One pass for both at step 4.
  assert both["test[:40]/items_with_text"] == 40 and "test[:40]/audio->text/R@1" in both
  assert "small/items_with_text" not in both
  every = run(step=None)  # The end of training: every entry.
  assert {"small/items_with_text", "test[:40]/items_with_text",
          "test[:40]/video->audio/MnR"} <= set(every)
  overridden = run(step=None, split="test[:8]")  # evaluate.py --split
  assert overridden["test[:8]/items_with_text"] == 8
  assert overridden["small/items_with_text"] == 8
