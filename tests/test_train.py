"""Training end to end: launch/train.py's files and resume (after finishing and after
SIGKILL), 1 vs 8 devices, config errors, the objective variants sharded."""

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import CONFIG, REPO, run_train, xla_flags
from configs import audio_video_text
from xmodal_jax import parallel
from xmodal_jax import experiment as experiment_lib
from xmodal_jax.parallel import sharding
from xmodal_jax.train import event_file
from xmodal_jax.train import metrics as metrics_lib
from xmodal_jax.train import step as step_lib


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def tiny_config(data_dir, variant="tiny"):
  config = audio_video_text.get_config(variant)
  config.data.data_dir = data_dir
  return config


@pytest.mark.slow
def test_sigkill_midway_then_rerun_resumes_and_logs_each_step_once(digit_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  args = [f"--config={CONFIG}:tiny", f"--workdir={workdir}",
          f"--config.data.data_dir={digit_data_dir}", "--config.total_steps=80",
          "--config.checkpoint_every=10", "--config.log_every=5",
          "--config.evals.retrieval.every=80", "--config.evals.retrieval.fused=none"]
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, "launch", "train.py"), *args],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoints = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline:
    steps = [int(d) for d in os.listdir(checkpoints) if d.isdigit()] if os.path.isdir(
        checkpoints) else []
    if steps and max(steps) >= 20:
      break
    assert proc.poll() is None, "training ended before it could be killed"
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(r["step"] for r in read_metrics(workdir))
  assert killed_at < 80
  out = run_train(args).stdout
  resumed_from = int(out.split("Resuming from the checkpoint of step ")[1].split(".")[0])
  assert 20 <= resumed_from < 80
  steps = [r["step"] for r in read_metrics(workdir) if "train/loss" in r]
  assert steps == list(range(5, 81, 5)), "each logged step must appear exactly once"
  assert "test/video->text/R@1" in read_metrics(workdir)[-1]


@pytest.mark.slow
def test_eight_devices_and_fsdp_give_the_one_device_loss_curve(digit_data_dir, tmp_path):
  """The same train step from the same state on the same batches on 1 device, on 8 (data=8:
  every device scores its rows against the gathered batch) and on data=2 x fsdp=4 (the
  state split 4 ways by config.sharding): the same losses, and fsdp holds a quarter of the
  state per device."""
  config = tiny_config(digit_data_dir)
  experiment = experiment_lib.setup(config, str(tmp_path))
  batches = experiment.source.train_batches()
  batches = [next(batches) for _ in range(6)]
  total = sum(x.nbytes for x in jax.tree.leaves(experiment.state))
  meshes = {"one": parallel.make_mesh(jax.devices()[:1]), "data": parallel.make_mesh(),
            "fsdp": parallel.make_mesh(shape=dict(data=2, fsdp=4))}
  curves = {}
  for name, mesh in meshes.items():
    shardings = sharding.state_shardings(experiment.state, mesh, config.sharding)
    state = jax.device_put(experiment.state, shardings)
    held = sharding.bytes_per_device(state)
    assert held == total if name != "fsdp" else held <= 0.26 * total, (name, held, total)
    train_fn = jax.jit(functools.partial(
        step_lib.train_step, model=experiment.model, tx=experiment.tx,
        loss_config=config.loss, mesh=mesh, seed=config.seed),
        out_shardings=(shardings, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec())))
    curves[name] = []
    for batch in batches:
      state, metrics = train_fn(state, parallel.shard_batch(batch, mesh))
      curves[name].append(float(metrics["loss"]))
    assert sharding.bytes_per_device(state) == held  # the step keeps the state's sharding
  assert curves["one"][-1] < curves["one"][0]
  np.testing.assert_allclose(curves["data"], curves["one"], rtol=2e-5)
  np.testing.assert_allclose(curves["fsdp"], curves["data"], rtol=1e-5)


def test_unknown_config_key_stops_the_launcher_naming_it(tmp_path):
  proc = run_train([f"--config={CONFIG}:tiny", f"--workdir={tmp_path}",
                    "--config.bogus_key=1"], check=False)
  assert proc.returncode != 0
  assert "bogus_key" in proc.stdout + proc.stderr
  assert "parameters;" not in proc.stdout  # Nothing was built or compiled.


@pytest.mark.parametrize("change, error, message", [
    (dict(data_dir="/no/such/folder"), FileNotFoundError, "/no/such/folder"),
    (dict(feature="speech"), ValueError, "config.modalities.audio.feature='speech'"),
    (dict(workdir="gs://bucket/run"), ImportError,
     "--workdir=gs://bucket/run: checkpoints in Cloud Storage need google-cloud-storage"),
])
def test_bad_data_config_stops_before_building_the_model(digit_data_dir, tmp_path,
                                                         monkeypatch, change, error, message):
  config = tiny_config(change.get("data_dir", digit_data_dir))
  if "feature" in change:
    config.modalities.audio.feature = change["feature"]
  monkeypatch.setattr("xmodal_jax.models.towers.build_model", None)  # Never reached.
  monkeypatch.setitem(sys.modules, "google.cloud.storage", None)  # the gcs extra missing
  with pytest.raises(error, match=message):
    experiment_lib.setup(config, change.get("workdir", str(tmp_path)))


@pytest.mark.slow
@pytest.mark.parametrize("variant, impl", [("tiny,regression", "blockwise"),
                                           ("tiny,sigmoid", "ring")])
def test_objective_variants_train_sharded(digit_data_dir, tmp_path, variant, impl):
  """Six steps of each variant on 8 devices, the loss streamed in tiles of one column."""
  config = tiny_config(digit_data_dir, variant)
  config.loss.impl, config.loss.block_size = impl, 1
  config.evals.retrieval.fused = "none"
  experiment_lib.train(config, str(tmp_path))
  records = [r for r in read_metrics(str(tmp_path)) if "train/loss" in r]
  assert len(records) == 3 and all(np.isfinite(r["train/loss"]) for r in records)
  if "regression" in variant:
    assert "train/regression/audio-video/regression" in records[-1]
    assert "train/contrastive" not in records[-1]
  else:
    assert "train/logit_bias" in records[-1]
    assert records[0]["train/logit_bias"] == pytest.approx(-10.0, abs=0.1)


def test_tensorboard_events_read_back_by_tensorflow(tmp_path):
  """The scalars a run logs, read back by TensorFlow's own event reader (which checks every
  record's CRC-32C); the checksum against the standard's check value."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  assert event_file.crc32c(b"123456789") == 0xE3069283
  writer = metrics_lib.MetricWriter(str(tmp_path))
  logged = {1: {"train/loss": 2.5, "train/lr": 1e-4, "train/lengths": [3, 4]},
            200: {"train/loss": 0.125, "test/text->video/R@1": 41.7}}
  for step, metrics in logged.items():
    writer.write(step, metrics)
  [name] = [n for n in os.listdir(tmp_path) if n.startswith("events.out.tfevents.")]
  events = list(tf.compat.v1.train.summary_iterator(str(tmp_path / name)))
  assert events[0].file_version == "brain.Event:2"
  read = {e.step: {v.tag: v.simple_value for v in e.summary.value} for e in events[1:]}
  assert read == {step: {tag: pytest.approx(value, rel=1e-6) for tag, value in metrics.items()
                         if not isinstance(value, list)}
                  for step, metrics in logged.items()}


def test_metrics_file_survives_a_torn_last_line_and_names_a_corrupt_one(tmp_path):
  """A kill mid-write leaves a torn last line: a resume drops it (and the steps after the
  checkpoint) and rewrites the file whole; a bad line elsewhere is an error naming it."""
  path = tmp_path / "metrics.jsonl"
  lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in (1, 2, 3)]
  path.write_text("\n".join(lines) + "\n" + '{"step": 4, "train/lo')
  writer = metrics_lib.MetricWriter(str(tmp_path), start_step=2)
  writer.write(3, {"train/loss": 0.5})
  assert read_metrics(str(tmp_path)) == [{"step": 1, "train/loss": 1.0},
                                         {"step": 2, "train/loss": 0.5},
                                         {"step": 3, "train/loss": 0.5}]
  assert not os.path.exists(str(path) + ".tmp")
  path.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
  with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line"):
    metrics_lib.MetricWriter(str(tmp_path), start_step=2)


HOLD_THE_LOCK = """
import sys, time
from xmodal_jax.train import run_lock
with run_lock.hold(sys.argv[1]):
  print("held", flush=True)
  time.sleep(600)
"""


def test_a_second_run_in_a_workdir_is_refused_until_the_first_ends(tmp_path):
  """While a process holds the workdir, train.py exits naming its PID and writes nothing;
  once the holder is SIGKILLed (no clean-up), the lock is free again."""
  from xmodal_jax.train import run_lock  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, workdir],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
  try:
    assert holder.stdout.readline().strip() == "held"
    proc = run_train([f"--config={CONFIG}:tiny", f"--workdir={workdir}"], check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"another run trains here (host {socket.gethostname()}, PID {holder.pid}" in (
        proc.stderr)
    assert os.listdir(workdir) == [run_lock.LOCK_FILE]  # no config.json, no checkpoints
  finally:
    holder.kill()
    holder.wait()
  with run_lock.hold(workdir):  # a killed holder leaves no stale lock
    second = subprocess.run([sys.executable, "-c", HOLD_THE_LOCK, workdir], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
  assert second.returncode and f"PID {os.getpid()}" in second.stderr, second.stderr[-2000:]


def test_peak_flops_and_throughput_from_a_faked_clock():
  assert metrics_lib.peak_flops("TPU v5 lite") == 197e12
  assert metrics_lib.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert metrics_lib.peak_flops("cpu") is None
  now = [10.0]
  throughput = metrics_lib.Throughput(256, 197e12, chips=4, clock=lambda: now[0])
  throughput.flops = 1e15
  assert throughput.pop() == {}  # not started: the first step compiles
  throughput.start()
  for _ in range(4):
    throughput.add_step()
  now[0] = 12.0
  got = throughput.pop()
  assert got["examples_per_s"] == pytest.approx(4 / 2 * 256)
  assert got["mfu"] == pytest.approx(2 * 1e15 / (4 * 197e12))


# Profiles a jitted step 300 times while 16 tf.data threads call numpy_function, as the
# readers do: with jax's Python tracer on (python_tracer_level=1) this process died of a
# segmentation fault in 6 of 11 runs on a 2-core machine (none with it off).
PROFILE_BESIDE_TF_DATA = """
import sys
import jax, numpy as np, tensorflow as tf
from xmodal_jax.train import metrics
read = lambda i: np.full((64,), i, np.float32)
ds = tf.data.Dataset.range(10**9).map(lambda i: tf.numpy_function(read, [i], tf.float32),
                                      num_parallel_calls=16).batch(16).prefetch(4)
options = tf.data.Options()
options.threading.private_threadpool_size = 16
batches = ds.with_options(options).as_numpy_iterator()
step = jax.jit(lambda x: jax.numpy.tanh(x @ x.T).sum())
profiler = metrics.Profiler((1, 1), sys.argv[1])
for _ in range(300):
  profiler.before(1)
  step(next(batches)).block_until_ready()
  profiler.after(1)
"""


@pytest.mark.slow
def test_profiling_beside_tf_data_threads_does_not_crash(tmp_path):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", PROFILE_BESIDE_TF_DATA, str(tmp_path)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("profile of steps 1-1") == 300


@pytest.mark.slow  # trains the tiny config (about 20 s); the full suite runs it
def test_logged_steps_carry_throughput_mfu_and_a_profile(digit_data_dir, tmp_path, monkeypatch):
  """A tiny run on a device kind faked to a 1 TFLOP/s peak: every logged step has
  examples/s and MFU (the step's FLOPs from XLA), and steps 2-3 are traced into
  {workdir}/profile."""
  monkeypatch.setattr(metrics_lib, "peak_flops", lambda kind: 1e12)
  config = tiny_config(digit_data_dir)
  config.update_from_flattened_dict({"total_steps": 4, "log_every": 2, "profile": (2, 3),
                                     "evals.retrieval.every": 4})
  experiment_lib.train(config, str(tmp_path))
  logged = [r for r in read_metrics(str(tmp_path)) if "train/loss" in r]
  assert [r["step"] for r in logged] == [2, 4]
  for record in logged:
    assert record["train/examples_per_s"] > 0 and 0 < record["train/mfu"] < 10, record
  traces = [os.path.join(d, f) for d, _, names in os.walk(tmp_path / "profile") for f in names]
  assert any(t.endswith(".xplane.pb") for t in traces), traces
