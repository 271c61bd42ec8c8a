"""Frozen and partly trained towers (a tower's `trainable` and `lr_multiplier`): frozen
parameters keep their exact bytes and have no optimizer state; a multiplier scales the
update, checked against Adam's known first step."""

import json

import jax
import numpy as np
import pytest

import fixtures
from fixtures import random_batch
from xmodal_jax import parallel
from xmodal_jax import experiment, experiment as experiment_lib, schema
from xmodal_jax.train import optimizer, step as step_lib


def nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def by_path(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.array(x, copy=True)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.slow  # compiles a train step (9 s); the full suite runs it
def test_frozen_tower_keeps_its_bytes_and_multipliers_scale_adams_first_step():
  """Tiny default config: text frozen (its tower; the head, fresh from its initializer, still
  trains) with rank-2 LoRA adapters, video
  training only its LayerNorms (and head), audio at 0.1x the learning rate, one temperature
  per pair of modalities. Two steps on 8 devices (data=2 x fsdp=4)."""
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  config = audio_video_text.get_config("tiny")
  config.model.towers.text.lora_rank = 2
  config.train_policy = dict(text=dict(trainable="none"),
                             video=dict(trainable=(".*/ln_[a-z]+/.*",)),
                             audio=dict(lr_multiplier=0.1))
  config.model.per_pair_temperature = True
  config.optimizer.update(warmup_steps=0, weight_decay=0.0, grad_clip_norm=1e9)
  config.batch_size = 16
  config, model, tx, mesh, batch, shardings, state = fixtures.sharded_state(
      config, dict(data=2, fsdp=4))
  before = by_path(state.params)
  frozen = by_path(optimizer.frozen(optimizer.tower_rules(config.train_policy), state.params))
  train_step = step_lib.jit_train_step(config, model, tx, mesh, shardings)

  # No optimizer state for frozen parameters: AdamW's mu and nu cover the others only.
  trainable_bytes = sum(x.nbytes for p, x in before.items() if not frozen[p])
  float_state = [x for x in jax.tree.leaves(state.opt_state) if x.dtype == np.float32]
  assert sum(x.size * 4 for x in float_state) == 2 * trainable_bytes

  state, _ = train_step(state, parallel.shard_batch(batch, mesh))
  first = by_path(state.params)
  state, metrics = train_step(state, parallel.shard_batch(random_batch(
      config, config.batch_size, seed=1), mesh))
  assert int(metrics["nonfinite"]) == 0
  after = by_path(state.params)
  lr = config.optimizer.learning_rate
  for path, value in after.items():
    moved = value.tobytes() != before[path].tobytes()
    if path.endswith(("/lora_a", "/lora_b")):  # only the adapters train in the text tower
      assert path.startswith("towers_text/") and moved and not frozen[path], path
      continue
    if path.startswith("towers_text/") or (
        path.startswith("towers_video/") and "/ln_" not in path):
      assert not moved, path  # bit for bit, signs of zeros included
      assert frozen[path]
    elif not path.startswith("towers_text"):
      assert moved or not np.any(before[path]), path
    # Adam's first step moves each parameter by lr x multiplier (m / sqrt(v) = g / |g|).
    step_one = np.abs(first[path] - before[path])[np.abs(first[path] - before[path]) > 0]
    if "attn/key/bias" in path:  # its gradient is 0 up to rounding (softmax's shift)
      continue
    if path.startswith(("towers_audio/", "heads_audio/")):
      np.testing.assert_allclose(np.median(step_one), 0.1 * lr, rtol=1e-3, err_msg=path)
    elif path.startswith("logit_scale/"):  # each pair's own scale, with its own gradient
      np.testing.assert_allclose(step_one, lr, rtol=1e-3)
      assert f"logit_scale/{path.split('/')[1]}" in metrics
    elif path.startswith(("towers_video/", "heads_video/", "heads_text/")) and not frozen[path]:
      np.testing.assert_allclose(np.median(step_one), lr, rtol=1e-3, err_msg=path)
  assert any(p.startswith("towers_video/") and "/ln_" in p and not np.array_equal(
      after[p], before[p]) for p in after)
  assert sorted(p for p in after if p.startswith("logit_scale/")) == [
      "logit_scale/audio-text", "logit_scale/audio-video", "logit_scale/text-video"]


def abstract_state(text_policy):
  """(resolved config, the default experiment's state from shapes only) with
  config.train_policy.text = `text_policy`."""
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  config = audio_video_text.get_config()
  config.train_policy.text = text_policy
  config = schema.resolve(config, jax.device_count())
  model, _, tx, _, _ = experiment.build_model_and_optimizer(config)
  example = jax.tree.map(lambda x: x[:1], random_batch(config, 2, seed=0))
  return config, jax.eval_shape(experiment.state_creator(config, model, tx), example)


def test_freezing_the_text_tower_cuts_the_state_by_twice_its_share():
  """The default experiment's state (params + AdamW's mu and nu), from shapes only: freezing
  the text tower removes its mu and nu, 2 x its parameters' bytes (its head, fresh from
  its initializer, keeps training)."""
  sizes = {}
  for trainable in ("all", "none"):
    _, state = abstract_state(dict(trainable=trainable))
    text = nbytes(state.params["towers_text"])
    sizes[trainable] = (nbytes(state.params) + nbytes(state.opt_state), text)
  (full, text), (frozen, _) = sizes["all"], sizes["none"]
  assert text > 0 and full - frozen == 2 * text


def test_a_frozen_head_on_a_training_tower_has_no_state_and_the_tower_trains():
  """head="freeze" with trainable="all" (SigLIP's identity heads): the head is frozen and has
  no AdamW state, 2 x its bytes less, while its tower trains."""
  sizes = {}
  for head in ("auto", "freeze"):
    config, state = abstract_state(dict(head=head))
    sizes[head] = nbytes(state.params) + nbytes(state.opt_state)
    rules = optimizer.tower_rules(config.train_policy)
    frozen = {p for p, f in by_path(optimizer.frozen(rules, state.params)).items() if f}
  assert frozen == {p for p in by_path(state.params) if p.startswith("heads_text/")}
  assert sizes["auto"] - sizes["freeze"] == 2 * nbytes(state.params["heads_text"]) > 0


@pytest.mark.parametrize("field, value, message", [
    ("trainable", "some", r"train_policy.text.trainable='some': expected \"all\", \"none\""),
    ("trainable", ("blocks_(",), r"train_policy.text.trainable: 'blocks_\(' is not a regex"),
    ("lr_multiplier", 0.0, r"train_policy.text.lr_multiplier=0.0: expected a number > 0"),
])
def test_bad_tower_training_options_name_the_field(field, value, message):
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  config = audio_video_text.get_config("tiny")
  config.train_policy.text = {field: value}
  with pytest.raises(ValueError, match=message):
    schema.resolve(config, jax.device_count())


def test_a_pattern_matching_no_parameter_is_an_error_showing_a_path():
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  config = audio_video_text.get_config("tiny")
  config.train_policy.text = dict(trainable=("trunk/encoder/block99/.*",))
  config = schema.resolve(config, jax.device_count())
  model, _, tx, _, _ = experiment.build_model_and_optimizer(config)
  example = jax.tree.map(lambda x: x[:1], random_batch(config, 2, seed=0))
  with pytest.raises(ValueError, match=r"matches no parameter of the tower \(its paths look "
                     r"like '.+/.+'\)"):
    jax.eval_shape(experiment.state_creator(config, model, tx), example)


def test_lora_adapters_start_as_the_block_without_them():
  """lora_b starts at zero, so an encoder block with adapters on its six products (q, k, v,
  out, fc1, fc2) computes exactly what the same weights do without them."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from xmodal_jax.models import transformer  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)), jnp.float32)
  valid = jnp.ones((2, 5), bool)
  outputs = []
  for rank in (0, 2):
    block = transformer.EncoderBlock(num_heads=2, mlp_dim=16, attention_impl="xla",
                                     lora_rank=rank)
    params = jax.jit(lambda k, b=block: b.init(k, x, valid, False))(jax.random.key(0))
    if rank:
      flat = by_path(params)
      assert sorted(p.rsplit("/", 2)[-2] for p in flat if p.endswith("/lora_b")) == [
          "fc1", "fc2", "key", "out", "query", "value"]
      assert all(not np.any(v) for p, v in flat.items() if p.endswith("/lora_b"))
      params = jax.tree_util.tree_map_with_path(
          lambda path, v: reference.get("/".join(str(getattr(k, "key", k)) for k in path), v),
          params)
    else:
      reference = by_path(params)
    outputs.append(jax.jit(lambda p, b=block: b.apply(p, x, valid, False))(params))
  np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.slow  # trains the tiny config twice in this process (about 20 s)
def test_cached_frozen_tower_trains_the_others_exactly_as_running_it(digit_data_dir, tmp_path,
                                                                    capsys):
  """ImageBind's recipe: the frozen video tower's embeddings of the training split, computed
  once, stand in for the tower; with no augmentation the other towers see the same
  embeddings, so every step's loss equals that of running the frozen tower each step."""
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  losses = {}
  for cached in (False, True):
    config = audio_video_text.get_config("tiny")
    config.data.data_dir = digit_data_dir
    config.log_every = 1
    config.evals = {}  # the steps are what differs
    config.modalities.video.augment = False
    config.train_policy.video = dict(trainable="none", head="freeze", cache_embeddings=cached)
    workdir = tmp_path / f"cached_{cached}"
    experiment_lib.train(config, str(workdir))
    with open(workdir / "metrics.jsonl") as f:
      losses[cached] = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
  assert "Cached the frozen video tower's embeddings of" in capsys.readouterr().out
  assert len(losses[True]) == config.total_steps
  np.testing.assert_allclose(losses[True], losses[False], rtol=2e-5)
  assert len(set(losses[True])) == len(losses[True])  # the other towers do train


@pytest.mark.parametrize("change,message", [
    ({"train_policy.video.trainable": "all"}, "only a frozen tower"),
    ({"augment": True}, "must not augment"),
    ({"loss.weights.ims": 1.0}, "token features"),
])
def test_a_cache_needs_a_frozen_unaugmented_tower_without_token_objectives(change, message):
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  config = audio_video_text.get_config("tiny")
  config.train_policy.video = dict(trainable="none", cache_embeddings=True)
  config.modalities.video.augment = change.pop("augment", False)
  for key, value in change.items():
    node, leaf = config, key.rsplit(".", 1)
    for name in leaf[0].split("."):
      node = node[name]
    node[leaf[1]] = value
  with pytest.raises(ValueError, match=f"cache_embeddings.*{message}"):
    schema.resolve(config, jax.device_count())


@pytest.mark.slow  # trains the tiny config twice (about 25 s); the full suite runs it
def test_a_run_starts_from_another_runs_towers_by_rules(digit_data_dir, tmp_path, capsys):
  """LiT/ImageBind-style binding: the video and text towers of a trained run, mapped by
  config.init's rules, the video tower frozen, a new audio tower. Every loaded path holds the
  source checkpoint's bytes and every other path the initializer's; training moves the
  fresh heads (a frozen tower's random head would project its space at random forever) but
  not the frozen tower. Rules that send a path nowhere or to another shape name both."""
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  from xmodal_jax.train import warm_start  # pylint: disable=g-import-not-at-top
  saved_params = lambda workdir: warm_start.saved_params(warm_start.item_folder(workdir))

  def config(**init):
    c = audio_video_text.get_config("tiny")
    c.update_from_flattened_dict({"data.data_dir": digit_data_dir, "total_steps": 2,
                                  "checkpoint_every": 2})
    c.evals = {}  # nothing to evaluate here
    c.init.update(init)
    return c
  source = str(tmp_path / "source")
  experiment_lib.train(config(), source)
  saved = saved_params(source)
  rules = [(r"(towers_(video|text)/.*)", r"\1")]
  lit = config(checkpoint=source, rules=rules)
  lit.train_policy.video = dict(trainable="none")
  start = experiment_lib.setup(lit, str(tmp_path / "lit"))
  fresh = by_path(experiment_lib.setup(config(), str(tmp_path / "fresh")).state.params)
  params = by_path(start.state.params)
  assert "Initialized from" in capsys.readouterr().out
  for path, value in params.items():
    loaded = path.startswith(("towers_video", "towers_text"))
    np.testing.assert_array_equal(value, saved[path] if loaded else fresh[path], path)
  assert not np.array_equal(fresh["towers_video/trunk/pos_embedding"],
                            saved["towers_video/trunk/pos_embedding"])  # the test can tell
  experiment_lib.train(lit, str(tmp_path / "lit"))
  printed = capsys.readouterr().out
  assert "M trainable, " in printed and "M frozen)" in printed
  trained = saved_params(str(tmp_path / "lit"))
  for path in params:
    moved = not np.array_equal(trained[path], params[path])
    assert moved != path.startswith("towers_video/"), path  # frozen exactly, the rest trains

  text_fc = "towers_text/trunk/encoder/block0/mlp/fc{}/kernel"
  for bad, message in [
      ([(r"towers_audio/(.*)", r"towers_none/\1")], "which .* does not hold"),
      ([(text_fc.format(2), text_fc.format(1))], r"\(64, 32\) cannot take .*fc1/kernel "
       r"\(32, 64\)")]:
    with pytest.raises(ValueError, match=message):
      experiment.assemble(config(checkpoint=source, rules=bad), jax.devices()[:1])
