"""Training mixtures (config.data.sources): shares by weight, exact resume, masks and the
per-source loss against NumPy, and the config errors."""

import itertools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import distributed_worker
from conftest import REPO, free_port
from configs import audio_video_text as avt_config
from xmodal_jax import experiment, schema
from xmodal_jax.data import mixed_input, mixture, source as source_lib
from xmodal_jax.losses import contrastive
from xmodal_jax.train import metrics as metrics_lib


def positions(seed, quotas, n):
  ds = tf.data.Dataset.range(n).map(
      lambda g: mixed_input.mixture_position(g, seed, quotas)).batch(n)
  return [np.asarray(x) for x in next(iter(ds))]


def test_shares_match_the_weights_and_each_source_reads_its_positions_in_order():
  quotas = mixture.quotas([0.6, 0.3, 0.1])
  assert quotas.tolist() == [6000, 3000, 1000]
  source, local = positions(3, quotas, 50_000)
  shares = np.bincount(source, minlength=3) / 50_000
  np.testing.assert_allclose(shares, [0.6, 0.3, 0.1], atol=0.01)
  for s in range(3):  # whole blocks: every own position exactly once
    assert sorted(local[source == s].tolist()) == list(range(5 * quotas[s]))
  shorter_source, _ = positions(3, quotas, 1234)  # a pure function of (seed, g)
  np.testing.assert_array_equal(shorter_source, source[:1234])
  assert not np.array_equal(positions(4, quotas, 1234)[0], shorter_source)


def tiny_mixture(data_dir, weights=None):
  config = avt_config.get_config("tiny,mixture")
  config.data.data_dir = data_dir
  for name, weight in (weights or {}).items():
    config.data.sources[name].weight = weight
  return config


def open_source(config):
  config = schema.resolve(config, 1)
  return config, source_lib.Source.open(source_lib.input_config(config))


def test_masks_follow_each_source_and_weight_zero_gives_no_rows(digit_data_dir):
  config, src = open_source(tiny_mixture(digit_data_dir, {"audiocaps": 0.0}))
  assert src.mixture_names == ["valor", "webvid"]
  batch = next(src.train_batches())
  which = batch["_source"].argmax(1)
  assert batch["_source"].sum(1).tolist() == [1] * len(which)
  assert set(which.tolist()) == {0, 1}
  masks = batch["_mask"]
  np.testing.assert_array_equal(masks["audio"], which == 0)  # webvid: video + text only
  assert masks["video"].all() and masks["text"].all()
  # Row i is stream position i: the example its source's own seeded permutation puts there.
  quotas = mixture.quotas([config.data.sources[n].weight for n in src.mixture_names])
  source, local = positions(config.seed, quotas, len(which))
  np.testing.assert_array_equal(which, source)
  for s, (builder, split, _) in enumerate(src.mixed):
    in_shard_order = tfds.ReadConfig(interleave_cycle_length=1)
    ids = [int(x["id"]) for x in builder.as_dataset(split=split, shuffle_files=False,
                                                    read_config=in_shard_order)]
    for row in np.flatnonzero(source == s):
      epoch, offset = divmod(int(local[row]), len(ids))
      seed = tf.constant([config.seed, epoch * len(src.mixed) + s], tf.int64)
      example = tf.random.experimental.index_shuffle(
          tf.constant(offset, tf.int64), seed, tf.constant(len(ids) - 1, tf.int64))
      assert batch["_id"][row] == ids[int(example)], row


def test_resume_and_process_count_give_byte_identical_batches(digit_data_dir):
  config, src = open_source(tiny_mixture(digit_data_dir))
  first = src.train_batches()
  batches = [next(first) for _ in range(3)]
  resumed = next(src.train_batches(start_step=2))
  jax.tree.map(np.testing.assert_array_equal, resumed, batches[2])
  assert not config.data.cache  # the same batches from the records held in memory:
  in_memory = tiny_mixture(digit_data_dir)
  in_memory.data.cache = True
  cached = open_source(in_memory)[1].train_batches()
  for batch in batches:
    jax.tree.map(np.testing.assert_array_equal, next(cached), batch)
  halves = [next(mixed_input.train_iterator(src.config, src.mixed, start_step=2,
                                            process_index=h, process_count=2))
            for h in range(2)]
  jax.tree.map(lambda x, a, b: np.testing.assert_array_equal(x, np.concatenate([a, b])),
               batches[2], *halves)


@pytest.mark.slow
def test_two_processes_resumed_read_the_global_batch_of_one(digit_data_dir, tmp_path):
  """2 processes x 4 CPU devices (jax.distributed), each resuming at step 2: their shares
  concatenate to the batch an uninterrupted single-process stream reads at step 2."""
  config, src = open_source(tiny_mixture(digit_data_dir))  # writes the random-access copies
  stream = src.train_batches()
  expected = [next(stream) for _ in range(3)][2]
  out, port = str(tmp_path / "share"), free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, distributed_worker.__file__, str(port),
                             str(rank), out, digit_data_dir], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for rank in (0, 1)]
  for proc in procs:
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
  shares = [np.load(f"{out}.{rank}.npz") for rank in (0, 1)]
  leaves = jax.tree_util.tree_flatten_with_path(expected)[0]
  assert len(leaves) == len(shares[0].files) > 5
  for path, value in leaves:
    key = jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.concatenate([s[key] for s in shares]), value, key)
  assert config.batch_size == len(expected["_source"])


def numpy_pair_rows(q, g, s, col_valid):
  logits = s * q.astype(np.float64) @ g.T.astype(np.float64)
  logits = np.where(col_valid[None], logits, -np.inf)
  top = logits.max(1, keepdims=True)
  lse = top[:, 0] + np.log(np.exp(logits - top).sum(1))
  return lse - s * np.sum(q.astype(np.float64) * g, axis=1)


def test_mixed_step_loss_and_source_losses_equal_numpy(digit_data_dir):
  config = tiny_mixture(digit_data_dir, {"valor": 0.0})  # audio+text and video+text only
  assembly = experiment.assemble(config, jax.devices()[:1])
  batch = next(assembly.source.train_batches())
  masks = {m: np.asarray(v) for m, v in batch["_mask"].items()}
  audio_rows = batch["_source"][:, 0]
  np.testing.assert_array_equal(masks["audio"], audio_rows)
  np.testing.assert_array_equal(masks["video"], ~audio_rows)
  params = experiment.fresh_state(assembly).params
  emb = {m: np.asarray(e) for m, e in assembly.model.apply({"params": params}, batch,
                                                             train=False).items()}
  scale = float(np.exp(params["logit_scale"]))
  loss, _ = contrastive.contrastive_loss(emb, scale, masks=masks)
  expected_pairs, per_source, weight = [], np.zeros(2), np.zeros(2)
  for m, n in itertools.combinations(emb, 2):
    both = masks[m] & masks[n]
    if not both.any():
      continue
    rows = (numpy_pair_rows(emb[m], emb[n], scale, masks[n])
            + numpy_pair_rows(emb[n], emb[m], scale, masks[m])) / 2
    expected_pairs.append(rows[both].mean())
    for s in range(2):
      per_source[s] += rows[both & batch["_source"][:, s]].sum()
      weight[s] += (both & batch["_source"][:, s]).sum()
  np.testing.assert_allclose(loss, np.mean(expected_pairs), rtol=1e-5)
  got = contrastive.source_losses(emb, scale, batch["_source"], masks=masks)
  np.testing.assert_allclose(got, per_source / weight, rtol=1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda c: [c.data.sources[n].update(weight=0.0) for n in c.data.sources],
     "weights sum to 0"),
    (lambda c: c.data.sources.webvid.update(weight=-1.0), r"sources.webvid.weight=-1.0"),
    (lambda c: c.data.sources.webvid.update(features={"depth": "depth", "text": "text"}),
     r"sources.webvid.features names \['depth'\]"),
    (lambda c: c.data.sources.valor.update(weight=0.0), r"provides the modalities"),
])
def test_bad_mixtures_are_config_errors_naming_the_field(change, message):
  config = avt_config.get_config("tiny,mixture")
  config.data.sources.audiocaps.weight = 0.0 if "provides" in message else 0.05
  change(config)
  with pytest.raises(ValueError, match=message):
    schema.resolve(config, 1)


def test_source_tally_turns_rows_into_fractions():
  tally = metrics_lib.SourceTally(["a", "b"])
  for rows in ([3, 1], [2, 2]):
    tally.add({"source_rows": np.array(rows)})
  out = tally.pop({"source_rows": np.array([2, 0]), "source_loss": np.array([1.5, 0.0])})
  assert out == {"source/a/fraction": 5 / 8, "source/a/rows": 5, "source/a/loss": 1.5,
                 "source/b/fraction": 3 / 8, "source/b/rows": 3}


@pytest.mark.slow
def test_tiny_mixture_trains_logs_shares_and_evaluates_a_second_dataset(digit_data_dir,
                                                                         tmp_path):
  config = tiny_mixture(digit_data_dir)
  workdir = str(tmp_path / "run")
  experiment.train(config, workdir)
  records = metrics_lib.read_records(f"{workdir}/metrics.jsonl")
  rows = {name: sum(r.get(f"train/source/{name}/rows", 0) for r in records)
          for name in avt_config.MIXTURE}
  total = sum(rows.values())
  assert total == config.total_steps * config.batch_size
  for name, (weight, _) in avt_config.MIXTURE.items():
    assert abs(rows[name] / total - weight) <= 4 * np.sqrt(weight * (1 - weight) / total)
  final = [r for r in records if "speech/test/audio->text/R@1" in r][-1]
  assert not any(k.startswith("speech/test/") and "video" in k for k in final)
  run = experiment.setup(config, workdir, require_checkpoint=True)
  other = run.embedder.for_dataset({"name": "digit_sequences", "data_dir": digit_data_dir},
                                   {"audio": "audio", "text": "text"})
  embedded = other.split(run.state.params, "test")
  for query, gallery in (("audio", "text"), ("text", "audio")):
    q, g = embedded.masks[query], embedded.masks[gallery]
    scores = embedded.emb[query][q].astype(np.float64) @ embedded.emb[gallery][g].T
    top = embedded.ids[g][scores.argmax(1)]
    expected = 100.0 * np.mean(top == embedded.ids[q])
    np.testing.assert_allclose(final[f"speech/test/{query}->{gallery}/R@1"], expected,
                               atol=1e-6)
