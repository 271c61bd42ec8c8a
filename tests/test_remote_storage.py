"""Runs whose files live behind a filesystem scheme: the run's own files and the offset index
on TensorFlow's in-memory ram://, and a dataset built, then trained on with the tiny config,
preempted, resumed, evaluated and exported entirely under gs:// on a local Cloud Storage
emulator."""

import os
import signal
import subprocess
import sys
import threading

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

import fixtures
import gcs_emulator
from conftest import CONFIG, REPO, run_launcher, xla_flags
from xmodal_jax import files
from xmodal_jax.data import pipeline, random_access
from xmodal_jax.eval import export
from xmodal_jax.train import metrics as metrics_lib


def write_tfrecords(path, records):
  with tf.io.TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)


def test_offset_index_reads_what_tfrecord_dataset_reads(monkeypatch):
  """Records by index from TFRecord shards on ram:// through their offset indexes, against
  tf.data's own reader: shuffled, repeated, runs across shards, and a record longer than
  the index's read block."""
  monkeypatch.setattr(random_access, "_BLOCK", 4096)
  rng = np.random.default_rng(0)
  shards = []
  for shard in range(3):
    path = f"ram://offsets/shard-{shard}.tfrecord"
    sizes = rng.integers(0, 3000, 40 + shard).tolist() + ([20_000] if shard == 1 else [])
    write_tfrecords(path, [rng.bytes(n) for n in sizes])
    files.save_array(f"{path}.offsets.npy", random_access.record_offsets(path))
    shards.append(path)
  reference = [r.numpy() for r in tf.data.TFRecordDataset(shards)]
  source = random_access._IndexedTFRecords(  # pylint: disable=protected-access
      shards, [f"{p}.offsets.npy" for p in shards])
  for indices in (rng.permutation(len(reference)), np.arange(len(reference)),
                  rng.integers(0, len(reference), 50), [39, 39, 40, 41, 81, 82, 0]):
    assert source.__getitems__(list(indices)) == [reference[i] for i in indices]


def test_offset_index_refuses_a_truncated_shard():
  write_tfrecords("ram://offsets/whole.tfrecord", [b"a" * 100, b"b" * 100])
  data = tf.io.gfile.GFile("ram://offsets/whole.tfrecord", "rb").read()
  tf.io.gfile.GFile("ram://offsets/cut.tfrecord", "wb").write(data[:-30])
  with pytest.raises(ValueError, match=r"ram://offsets/cut.tfrecord: truncated record"):
    random_access.record_offsets("ram://offsets/cut.tfrecord")


def test_metrics_events_and_export_on_a_scheme():
  """metrics.jsonl (resume drops later steps), TensorBoard events (read back by
  TensorFlow's own reader) and an export, on ram://."""
  workdir = "ram://run/work"
  writer = metrics_lib.MetricWriter(workdir)
  for step in (1, 2, 3):
    writer.write(step, {"train/loss": 1.0 / step})
  writer = metrics_lib.MetricWriter(workdir, start_step=2)  # resumed from step 2
  writer.write(3, {"train/loss": 0.25})
  records = metrics_lib.read_records(f"{workdir}/metrics.jsonl")
  assert [(r["step"], r["train/loss"]) for r in records] == [(1, 1.0), (2, 0.5), (3, 0.25)]
  events = tf.io.gfile.glob(f"{workdir}/events.out.tfevents.*")
  assert events
  scalars = [(e.step, v.tag) for path in events
             for e in tf.compat.v1.train.summary_iterator(path) for v in e.summary.value]
  assert (3, "train/loss") in scalars

  out = "ram://run/export"
  signature = {"step": 3}
  export.check_signature(out, signature)
  shard_meta = {"split": "test", "step": 3}
  for name, keys, emb, mask in (("0000-00000", [b"a/1", "é".encode()], np.eye(2),
                                 [True, False]),
                                ("0000-00001", [b"c"], np.ones([1, 2]), [True])):
    rows = {"_key": np.array(keys, object), "_id": np.arange(len(keys)),
            "emb": {"text": np.asarray(emb, np.float32)}, "_mask": {"text": np.array(mask)}}
    export.write_shard(out, name, rows, "float16", shard_meta)
  export.finish(out, signature, "float16")
  exported = export.read_export(out)
  assert exported.keys().tolist() == ["a/1", "é", "c"] and exported.count == 3
  assert [exported.row_of_key(k) for k in ("é", "c", "a/1", "d")] == [1, 2, 0, None]
  assert exported.keys_at([2, 0]).tolist() == ["c", "a/1"]
  assert exported.mask("text").tolist() == [1, 0, 1]
  np.testing.assert_array_equal(exported.embeddings("text"), [[1, 0], [0, 0], [1, 1]])
  with pytest.raises(ValueError, match="holds shards of another export"):
    export.check_signature(out, {"step": 4})


@pytest.fixture(scope="module")
def bucket():
  """A fresh emulated bucket, gs://xmodal; this process and the launchers reach it."""
  with gcs_emulator.Emulator() as emulator:
    emulator.create_bucket("xmodal")
    saved = {k: os.environ.get(k) for k in emulator.env}
    os.environ.update(emulator.env)
    try:
      yield emulator
    finally:
      for key, value in saved.items():
        if value is None:
          os.environ.pop(key, None)
        else:
          os.environ[key] = value


def read_metrics(workdir):
  return metrics_lib.read_records(f"{workdir}/metrics.jsonl")


@pytest.mark.slow
def test_tiny_config_builds_trains_resumes_and_exports_under_gs(bucket, tmp_path):
  """A manifest of local files is built into the bucket (the digit items, 40 train and 10
  test), trained from it with the workdir there, preempted (SIGTERM) mid-run, resumed from
  the bucket's checkpoint, and exported there; the export's embeddings give the run's own
  retrieval metrics. Nothing is written locally but the files and the compilation cache."""
  root = "gs://xmodal"
  fixtures.digit_manifest(tmp_path)
  built = fixtures.build_cli(f"--manifest={tmp_path / 'items.jsonl'}", *fixtures.DIGIT_FLAGS,
                             f"--data_dir={root}/tfds").stderr
  assert f"50 examples written to {root}/tfds/digit_records/1.0.0" in built, built
  workdir = f"{root}/run"
  data = ["--config.data.name=digit_records", f"--config.data.data_dir={root}/tfds"]
  args = [f"--config={CONFIG}:tiny", *data, f"--workdir={workdir}", "--config.total_steps=24",
          "--config.checkpoint_every=100", "--config.log_every=2",
          "--config.evals.retrieval.every=24"]
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, "launch", "train.py"), *args],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  printed, watchdog = [], threading.Timer(300, proc.kill)  # A hung run ends the output.
  watchdog.start()
  try:
    for line in proc.stdout:  # SIGTERM once step 4 is logged, 20 steps before the end.
      printed.append(line)
      if line.startswith("step 4/24"):
        break
    else:
      raise AssertionError(f"training ended before it could be stopped:\n{''.join(printed)}")
  finally:
    watchdog.cancel()
  proc.send_signal(signal.SIGTERM)
  printed = "".join(printed) + proc.communicate(timeout=300)[0]
  assert proc.returncode == 128 + signal.SIGTERM, printed
  saved = int(printed.split("preempted (SIGTERM) at step ")[1].split(":")[0])
  assert 4 <= max(r["step"] for r in read_metrics(workdir)) <= saved < 24

  resumed = run_launcher("train.py", args).stdout
  assert f"Resuming from the checkpoint of step {saved}." in resumed  # No periodic one.
  records = read_metrics(workdir)
  assert [r["step"] for r in records if "train/loss" in r] == list(range(2, 25, 2))
  final = records[-1]
  assert final["step"] == 24 and "test/audio->text/R@1" in final

  out = f"{root}/export"
  run_launcher("export.py", [f"--config={CONFIG}:tiny", *data, f"--workdir={workdir}",
                             f"--out={out}"])
  exported = export.read_export(out)
  meta, ids = exported.meta, exported.ids()
  emb = {m: exported.embeddings(m) for m in exported.modalities}
  assert meta["step"] == 24 and meta["workdir"] == workdir and len(ids) == meta["count"]
  for q, g in [("audio", "text"), ("text", "video"), ("video", "audio")]:
    ranks = fixtures.numpy_ranks(emb[q], emb[g], ids, ids)
    assert final[f"test/{q}->{g}/R@1"] == pytest.approx(100 * np.mean(ranks <= 1))
    assert final[f"test/{q}->{g}/MnR"] == pytest.approx(np.mean(ranks), rel=1e-5)

  # Training read the split by position through the offset index: TFDS's order.
  builder = pipeline.get_builder(ml_collections.ConfigDict(
      dict(name="digit_records", data_dir=f"{root}/tfds")))
  reader = random_access.Reader(builder, "train[10:30]")
  reference = [ex["id"] for ex in builder.as_dataset(
      split="train[10:30]", shuffle_files=False).as_numpy_iterator()]
  positions = np.random.default_rng(0).permutation(reader.size)
  assert [builder.info.features.deserialize_example(r)["id"].numpy()
          for r in reader.read(positions)] == [reference[p] for p in positions]

  objects = bucket.objects("xmodal")
  for name in ("run/config.json", "run/checkpoints/24/commit_success.txt",
               "export/meta.json", "tfds/digit_records/1.0.0/dataset_info.json"):
    assert name in objects, sorted(objects)
  assert any(n.startswith("run/events.out.tfevents") for n in objects)
  assert any(n.startswith("tfds/digit_records/1.0.0/random_access/") and
             n.endswith(".offsets.npy") for n in objects)
